//! Clients that are not ours drive the real `fhirstore serve`:
//! - a third-party FHIR client from PyPI (fhirpy): create, read, update, search with paging, a
//!   transaction Bundle, delete; then SIGTERM, and the server must stop cleanly;
//! - the external FHIR TestScript probe set in `../shared/conformance` (MIT, from mock.health),
//!   run by its own runner.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The fhirpy release the check was written against.
const FHIRPY: &str = "fhirpy==2.3.1";

fn required() -> bool {
    std::env::var("FHIRSTORE_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// A virtualenv with fhirpy, made once per target directory.
fn venv() -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fhirpy-venv");
    let python = dir.join("bin/python");
    let marker = dir.join(FHIRPY);
    if marker.exists() {
        return Ok(python);
    }
    let run = |cmd: &mut Command| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)))
        }
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&dir))?;
    run(Command::new(&python).args(["-m", "pip", "install", "--quiet", FHIRPY]))?;
    std::fs::write(&marker, b"").map_err(|e| e.to_string())?;
    Ok(python)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn healthy(port: u16) -> bool {
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = c.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let mut reply = String::new();
    let _ = c.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200")
}

/// `fhirstore serve` on a free loopback port over `data`, once it answers `/health`.
fn start_server(data: &Path) -> (Server, u16) {
    let port = free_port();
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_fhirstore"))
            .arg("--data-dir")
            .arg(data)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start the server"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !healthy(port) {
        assert!(Instant::now() < deadline, "the server did not come up");
        assert!(
            server.0.try_wait().expect("wait").is_none(),
            "the server exited"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (server, port)
}

/// The probes this server fails on purpose, with the reason. `MUST/silent-ignore` wants a 4xx
/// for an unknown search parameter; R4 (search.html#errors) says a server SHOULD ignore unknown
/// parameters unless the client sends `Prefer: handling=strict`, and this server does that (the
/// HTTP tests check both behaviours).
const EXPECTED_FAILURES: [&str; 1] = ["fhir-r4-base/MUST/silent-ignore.json"];

/// The probe set and its runner: `FHIRSTORE_CONFORMANCE_DIR` (which must then hold them), else
/// `shared/conformance` beside the checkout, when it is there.
fn conformance_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FHIRSTORE_CONFORMANCE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance");
    beside.join("run_testscripts.py").exists().then_some(beside)
}

#[test]
fn external_testscript_probes_pass() {
    // The probe set is not part of the repository: a checkout without it skips this test.
    let Some(dir) = conformance_dir() else {
        eprintln!("skipping: no ../shared/conformance beside the checkout");
        return;
    };
    let runner = dir.join("run_testscripts.py");
    assert!(
        runner.exists(),
        "no conformance runner at {}",
        runner.display()
    );
    let data = tempfile::tempdir().expect("temp dir");
    let (_server, port) = start_server(data.path());
    let out = Command::new("python3")
        .arg(&runner)
        .arg(format!("http://127.0.0.1:{port}/fhir"))
        .arg(dir.join("testscripts"))
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // One `FAIL <script> :: …` line per failed assert; the last line holds the totals.
    let failed: std::collections::BTreeSet<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("FAIL "))
        .filter_map(|l| l.split(" :: ").next())
        .collect();
    let expected: std::collections::BTreeSet<&str> = EXPECTED_FAILURES.into_iter().collect();
    assert_eq!(failed, expected, "{report}");
    let totals = stdout.lines().last().unwrap_or("");
    let passed: usize = totals
        .split(" passed")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(passed >= 20, "too few probes passed: {report}");
    assert!(totals.contains(" 0 skipped"), "{report}");
}

#[test]
fn fhirpy_drives_the_server() {
    let python = match venv() {
        Ok(p) => p,
        Err(e) if !required() => {
            eprintln!("skipping: cannot install {FHIRPY}: {e}");
            return;
        }
        Err(e) => panic!("cannot install {FHIRPY}: {e}"),
    };
    let data = tempfile::tempdir().expect("temp dir");
    let (mut server, port) = start_server(data.path());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/client/fhirpy_check.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(format!("http://127.0.0.1:{port}/fhir/client-test"))
        .output()
        .expect("run the client");
    assert!(
        out.status.success(),
        "fhirpy check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let pid = server.0.id().to_string();
    let term = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = server.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the server exited with {status}");
}
