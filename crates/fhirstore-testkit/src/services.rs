//! Whether a missing service skips a test or fails it.

/// True when `FHIRSTORE_REQUIRE_SERVICES=1`: CI sets it, so a missing database fails the run
/// instead of silently skipping half the suite.
pub fn require_services() -> bool {
    std::env::var("FHIRSTORE_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Reports that `service` could not be reached: panics when services are required, otherwise
/// prints a skip notice and returns `None`.
pub fn service_unavailable<T>(service: &str, err: impl std::fmt::Display) -> Option<T> {
    if require_services() {
        panic!("{service} is required (FHIRSTORE_REQUIRE_SERVICES=1) but unavailable: {err}");
    }
    eprintln!(
        "SKIP: {service} unavailable ({err}); set FHIRSTORE_REQUIRE_SERVICES=1 to fail instead"
    );
    None
}

/// A loopback port that no socket holds now, below the kernel's ephemeral range.
///
/// Tests that kill a server and restart it on the same port need a port nothing else will take
/// in between. A port from the ephemeral range (what binding port 0 gives) can be handed to any
/// outgoing connection the test process opens meanwhile (a database pool reconnecting, say),
/// and the restarted server then fails to bind. Ports below the range are only ever taken by an
/// explicit bind.
pub fn loopback_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768)
        .clamp(12_000, 65_535);
    let span = low - 10_000;
    // Spread over the span by process id, so test binaries running side by side (two
    // checkouts, say) start far apart, and step within this process so two tests never share.
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(10_000 + offset).expect("below 65,536");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between 10000 and {low}");
}

/// A `redis-server` of a test's own on a loopback port, killed (SIGKILL) when dropped.
pub struct OwnRedis {
    port: u16,
    child: std::process::Child,
}

impl OwnRedis {
    /// Starts a server on `port` (from [`loopback_port`]) and waits until it answers `PING`.
    /// `None` (skip) when `redis-server` is not installed and services are not required; a
    /// server that exits or does not answer within ten seconds is a test failure naming why.
    pub fn start(port: u16) -> Option<Self> {
        use std::io::{Read, Write};
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => return service_unavailable("redis-server binary", e),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "redis-server on port {port} exited at start ({status}); is the port taken?"
                );
            }
            // Connecting is not enough: it must be our server answering, not whatever else
            // might hold the port.
            let pong = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
                s.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
                s.write_all(b"PING\r\n")?;
                let mut buf = [0u8; 7];
                s.read_exact(&mut buf)?;
                Ok(&buf == b"+PONG\r\n")
            });
            if matches!(pong, Ok(true)) {
                return Some(OwnRedis { port, child });
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("redis-server on port {port} did not answer PING within 10 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, for signals (`SIGSTOP`, `SIGCONT`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL, so a paused one dies too) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
