//! The test cluster: an isolated database and Redis prefix, child processes of the
//! `switchyard` binary (API replicas, workers, scheduler, mock LLM) that die with it, and
//! helpers to submit and wait for jobs.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use switchyard_store::Store;
use uuid::Uuid;

pub const T: Duration = Duration::from_secs(40);

pub fn env_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn env_redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One isolated system: its own database and Redis prefix; child processes die with it.
pub struct Cluster {
    pub admin_url: String,
    pub db_name: String,
    pub db_url: String,
    pub redis_url: String,
    pub prefix: String,
    pub mock_url: String,
    pub key: String,
    pub store: Store,
    pub children: Vec<(String, Child)>,
    pub http: reqwest::Client,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.clear_redis();
        // drop this test's database (Drop is sync: use a small runtime on a plain thread)
        let (admin, name) = (self.admin_url.clone(), self.db_name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let opts: PgConnectOptions = admin.parse().unwrap();
                if let Ok(mut c) = opts.connect().await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut c)
                        .await;
                }
            })
        })
        .join();
    }
}

impl Cluster {
    pub async fn new() -> Cluster {
        Cluster::on(&env_database_url(), &env_redis_url()).await
    }

    /// A cluster on the Postgres server of `base` (a fresh database in it) and `redis_url`.
    pub async fn on(base: &str, redis_url: &str) -> Cluster {
        let (base, redis_url) = (base.to_string(), redis_url.to_string());
        let name = format!("sy_e2e_{}", Uuid::new_v4().simple());
        let opts: PgConnectOptions = base.parse().unwrap();
        let mut c = opts.connect().await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        let db_url = opts.clone().database(&name).to_url_lossy().to_string();
        let mut cluster = Cluster {
            admin_url: base.clone(),
            db_name: name.clone(),
            db_url: db_url.clone(),
            redis_url,
            prefix: format!("e2e{}", Uuid::new_v4().simple()),
            mock_url: String::new(),
            key: String::new(),
            store: Store::connect_lazy(&db_url, 4, Some(switchyard_store::SERVICE_ROLE)).unwrap(),
            children: Vec::new(),
            http: reqwest::Client::new(),
        };
        let st = cluster.command(&["migrate"]).status().unwrap();
        assert!(st.success());
        let t = cluster.store.create_tenant("e2e").await.unwrap();
        cluster.key = cluster
            .store
            .create_api_key(t.id, "e2e", None)
            .await
            .unwrap()
            .1;
        let mock_port = free_port();
        cluster.spawn(
            "mock",
            &["mock-llm", "--listen", &format!("127.0.0.1:{mock_port}")],
        );
        cluster.mock_url = format!("http://127.0.0.1:{mock_port}/v1");
        wait_port(mock_port).await;
        cluster
    }

    /// Removes this test's Redis keys (SCAN, never KEYS, on a shared Redis).
    pub fn clear_redis(&self) {
        if let Ok(mut r) =
            redis::Client::open(self.redis_url.as_str()).and_then(|c| c.get_connection())
        {
            let pattern = format!("*{}*", self.prefix);
            let mut cursor: u64 = 0;
            while let Ok((next, keys)) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(10_000)
                .query::<(u64, Vec<String>)>(&mut r)
            {
                if !keys.is_empty() {
                    let _ = redis::cmd("DEL").arg(&keys).query::<()>(&mut r);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.args(args)
            .env("DATABASE_URL", &self.db_url)
            .env("REDIS_URL", &self.redis_url)
            .env("SWITCHYARD_REDIS_PREFIX", &self.prefix)
            .env("SWITCHYARD_ENABLE_NOOP", "true")
            .env("SWITCHYARD_LEASE_S", "2")
            .env("SWITCHYARD_SHUTDOWN_GRACE_S", "20")
            .env("SWITCHYARD_LOG", "warn")
            .env("SWITCHYARD_DATABASE_MAX_CONNECTIONS", "4")
            .env("SWITCHYARD_LLM__MOCK_BASE_URL", &self.mock_url)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        cmd
    }

    pub fn spawn(&mut self, name: &str, args: &[&str]) -> usize {
        let child = self.command(args).spawn().unwrap();
        self.children.push((name.to_string(), child));
        self.children.len() - 1
    }

    pub async fn api(&mut self) -> String {
        let port = free_port();
        self.spawn("api", &["api", "--listen", &format!("127.0.0.1:{port}")]);
        wait_port(port).await;
        format!("http://127.0.0.1:{port}")
    }

    pub fn worker(&mut self, concurrency: usize) -> usize {
        self.spawn(
            "worker",
            &["worker", "--concurrency", &concurrency.to_string()],
        )
    }

    pub async fn submit(&self, api: &str, body: Value) -> Uuid {
        let r = self
            .http
            .post(format!("{api}/v1/jobs"))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let v: Value = r.json().await.unwrap();
        v["id"].as_str().unwrap().parse().unwrap()
    }

    /// Submits `n` `system.noop` jobs that each sleep `ms`.
    pub async fn submit_sleepers(&self, api: &str, n: usize, ms: u64) -> Vec<Uuid> {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            let body = json!({"kind": "system.noop", "input": {"sleep_ms": ms}});
            ids.push(self.submit(api, body).await);
        }
        ids
    }

    pub async fn job(&self, api: &str, id: Uuid) -> Value {
        self.http
            .get(format!("{api}/v1/jobs/{id}"))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn wait_status(&self, api: &str, id: Uuid, status: &str) -> Value {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let j = self.job(api, id).await;
            if j["status"] == status {
                return j;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} never reached {status}: {j}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub async fn wait_port(port: u16) {
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on port {port}");
}
