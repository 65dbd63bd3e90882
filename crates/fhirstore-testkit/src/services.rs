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

/// A Redis Cluster of a test's own: `masters` masters with `replicas` replicas each, every
/// node a `redis-server` on a loopback port, all killed (SIGKILL) and their directories removed
/// when dropped.
pub struct OwnRedisCluster {
    nodes: Vec<ClusterNode>,
    dir: std::path::PathBuf,
}

struct ClusterNode {
    port: u16,
    child: Option<std::process::Child>,
}

/// A port for a cluster node: free, and so is its cluster bus port (the port plus 10,000),
/// both below the ephemeral range.
fn cluster_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    for _ in 0..10_000 {
        let port = loopback_port();
        let bus = u32::from(port) + 10_000;
        if bus < low
            && std::net::TcpListener::bind(("127.0.0.1", u16::try_from(bus).unwrap_or(0))).is_ok()
        {
            return port;
        }
    }
    panic!("no loopback port whose cluster bus port is free too");
}

fn redis_cli(port: u16, args: &[&str]) -> std::io::Result<std::process::Output> {
    std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
}

impl OwnRedisCluster {
    /// Starts the nodes, joins them (`redis-cli --cluster create`), and waits until every node
    /// reports the cluster ok. `None` (skip) when `redis-server` is not installed and services
    /// are not required; a cluster that does not form within 30 s is a test failure.
    pub fn start(masters: usize, replicas: usize) -> Option<Self> {
        let dir = std::env::temp_dir().join(format!(
            "fhirstore-cluster-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("cluster directory");
        let mut cluster = OwnRedisCluster {
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..masters * (1 + replicas) {
            let port = cluster_port();
            match cluster.spawn(port) {
                Ok(child) => cluster.nodes.push(ClusterNode {
                    port,
                    child: Some(child),
                }),
                Err(e) => return service_unavailable("redis-server binary", e),
            }
        }
        for n in &cluster.nodes {
            cluster.wait_for(n.port, "PING", "PONG");
        }
        let mut create = vec!["--cluster".to_owned(), "create".to_owned()];
        create.extend(
            cluster
                .nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port)),
        );
        create.extend([
            "--cluster-replicas".to_owned(),
            replicas.to_string(),
            "--cluster-yes".to_owned(),
        ]);
        let args: Vec<&str> = create.iter().map(String::as_str).collect();
        let out = redis_cli(cluster.nodes[0].port, &args).expect("redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for n in &cluster.nodes {
            cluster.wait_for(n.port, "CLUSTER INFO", "cluster_state:ok");
        }
        Some(cluster)
    }

    fn spawn(&self, port: u16) -> std::io::Result<std::process::Child> {
        let dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&dir)?;
        std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
            // A replica takes over however long it was cut off: the test kills a master on
            // purpose and wants the failover.
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
    }

    /// Waits until `command` on the node at `port` answers with text containing `expect`.
    fn wait_for(&self, port: u16, command: &str, expect: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let args: Vec<&str> = command.split(' ').collect();
        loop {
            if let Ok(out) = redis_cli(port, &args) {
                if String::from_utf8_lossy(&out.stdout).contains(expect) {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis node {port} did not answer {command} with {expect} within 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,…` naming every node, with `query` (e.g.
    /// `?replicas=1`) appended.
    pub fn url(&self, query: &str) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}{query}", nodes.join(","))
    }

    /// Every node's port.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The ports of the nodes that are masters now (`ROLE`), among those still running.
    pub fn masters(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .filter(|n| {
                redis_cli(n.port, &["ROLE"])
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with("master"))
            })
            .map(|n| n.port)
            .collect()
    }

    /// Kills the node at `port` (SIGKILL) and reaps it.
    pub fn kill(&mut self, port: u16) {
        for n in &mut self.nodes {
            if n.port == port {
                if let Some(mut c) = n.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
    }

    /// Waits until every running node reports the cluster ok, and no slot is served by a
    /// node that is down: after a failover, once a replica has taken over.
    pub fn wait_until_ok(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let down: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_none())
            .map(|n| format!("127.0.0.1:{}@", n.port))
            .collect();
        loop {
            let ok = self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                let info = redis_cli(n.port, &["CLUSTER", "INFO"]);
                let nodes = redis_cli(n.port, &["CLUSTER", "NODES"]);
                let (Ok(info), Ok(nodes)) = (info, nodes) else {
                    return false;
                };
                // `CLUSTER NODES`: id, address, flags, master, ping, pong, epoch, link, then
                // the slots the node serves.
                let serves_down = String::from_utf8_lossy(&nodes.stdout).lines().any(|l| {
                    let words: Vec<&str> = l.split_whitespace().collect();
                    words.len() > 8 && down.iter().any(|d| words[1].starts_with(d.as_str()))
                });
                String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") && !serves_down
            });
            if ok {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the cluster did not settle within 30 s after losing {down:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for OwnRedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
