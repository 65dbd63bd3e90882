//! A third-party FHIR client from PyPI (fhirpy) drives the real `fhirstore serve`: create,
//! read, update, search with paging, a transaction Bundle, delete. Then SIGTERM, and the
//! server must stop cleanly.

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
    let port = free_port();
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_fhirstore"))
            .arg("--data-dir")
            .arg(data.path())
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
