//! Test support (feature `test-support`): a private Redis server on a free port, for tests that
//! stop, flush or reconfigure their Redis; and a private three-primary Redis Cluster
//! (`redis-server --cluster-enabled yes` joined by `redis-cli --cluster create`), for the
//! cluster tests of the API crate and the binary.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;

/// A private Redis server without persistence; stopped (and its files removed) on drop.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    dir: std::path::PathBuf,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port)
    }

    /// A server on `port` (e.g. again after [`PrivateRedis::stop`]: it comes back empty).
    pub fn start_on(port: u16) -> PrivateRedis {
        let dir = std::env::temp_dir().join(format!("sy-redis-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        PrivateRedis {
            port,
            child: Some(child),
            dir,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (its data is gone).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private Redis Cluster of three primaries; stopped (and its files removed) on drop.
pub struct PrivateCluster {
    pub url: String,
    pub ports: Vec<u16>,
    children: Vec<Child>,
    dir: std::path::PathBuf,
}

fn free_port() -> u16 {
    // a cluster node also listens on port + 10000 (the cluster bus): keep both free
    loop {
        let p = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli is installed (scripts/test.sh installs redis-server and redis-tools)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl PrivateCluster {
    pub fn start() -> PrivateCluster {
        let dir = std::env::temp_dir().join(format!("sy-cluster-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let p = free_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let mut children = Vec::new();
        for p in &ports {
            let child = Command::new("redis-server")
                .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{p}.conf")])
                .args(["--cluster-node-timeout", "5000"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed (scripts/test.sh installs it)");
            children.push(child);
        }
        let cluster = PrivateCluster {
            url: format!(
                "redis+cluster://{}",
                ports
                    .iter()
                    .map(|p| format!("127.0.0.1:{p}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            ports: ports.clone(),
            children,
            dir,
        };
        let t = Instant::now();
        for p in &ports {
            while redis_cli(*p, &["PING"]).trim() != "PONG" {
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "node {p} never came up"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // every node agrees that all slots are served
        for p in &ports {
            while !redis_cli(*p, &["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "cluster never became ok"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        cluster
    }

    /// The port of the primary that serves `key`.
    pub fn node_of(&self, key: &str) -> u16 {
        let slot: u16 = redis_cli(self.ports[0], &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap();
        let shards = redis_cli(self.ports[0], &["CLUSTER", "SLOTS"]);
        // CLUSTER SLOTS prints: start, end, ip, port, id per range (redis-cli raw output)
        let lines: Vec<&str> = shards.lines().map(str::trim).collect();
        let mut i = 0;
        while i + 3 < lines.len() {
            if let (Ok(a), Ok(b)) = (lines[i].parse::<u16>(), lines[i + 1].parse::<u16>()) {
                if (a..=b).contains(&slot) && lines[i + 2] == "127.0.0.1" {
                    return lines[i + 3].parse().unwrap();
                }
            }
            i += 1;
        }
        panic!("no node serves slot {slot}: {shards}");
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
