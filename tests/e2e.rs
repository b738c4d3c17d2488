//! Multi-process tests of the `switchyard` binary: two API replicas and two workers sharing
//! Postgres and Redis, a worker killed with SIGKILL mid-job, and SIGTERM draining.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use switchyard_store::Store;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const T: Duration = Duration::from_secs(40);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One isolated system: its own database and Redis prefix; child processes die with it.
struct Cluster {
    admin_url: String,
    db_name: String,
    db_url: String,
    redis_url: String,
    prefix: String,
    mock_url: String,
    key: String,
    store: Store,
    children: Vec<(String, Child)>,
    http: reqwest::Client,
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
    async fn new() -> Cluster {
        let base = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let redis_url =
            std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
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
            store: Store::connect_lazy(&db_url, 4).unwrap(),
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
    fn clear_redis(&self) {
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

    fn command(&self, args: &[&str]) -> Command {
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

    fn spawn(&mut self, name: &str, args: &[&str]) -> usize {
        let child = self.command(args).spawn().unwrap();
        self.children.push((name.to_string(), child));
        self.children.len() - 1
    }

    async fn api(&mut self) -> String {
        let port = free_port();
        self.spawn("api", &["api", "--listen", &format!("127.0.0.1:{port}")]);
        wait_port(port).await;
        format!("http://127.0.0.1:{port}")
    }

    fn worker(&mut self, concurrency: usize) -> usize {
        self.spawn(
            "worker",
            &["worker", "--concurrency", &concurrency.to_string()],
        )
    }

    async fn submit(&self, api: &str, body: Value) -> Uuid {
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
    async fn submit_sleepers(&self, api: &str, n: usize, ms: u64) -> Vec<Uuid> {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            let body = json!({"kind": "system.noop", "input": {"sleep_ms": ms}});
            ids.push(self.submit(api, body).await);
        }
        ids
    }

    async fn job(&self, api: &str, id: Uuid) -> Value {
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

    async fn wait_status(&self, api: &str, id: Uuid, status: &str) -> Value {
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

async fn wait_port(port: u16) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_on_one_replica_stream_from_the_other() {
    let mut c = Cluster::new().await;
    let api1 = c.api().await;
    let api2 = c.api().await;
    c.worker(8);
    c.worker(8);
    c.spawn("scheduler", &["scheduler"]);

    let mut req = format!("{}/v1/ws", api2.replace("http://", "ws://"))
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", c.key).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();

    let mut ids = Vec::new();
    for i in 0..6 {
        let body = json!({"kind": "llm.chat", "input": {"model": "mock-echo", "messages": [{"role": "user", "content": format!("hello replica {i}")}]}});
        let id = c.submit(&api1, body).await;
        ws.send(Message::Text(
            json!({"op": "subscribe", "job_id": id, "after": 0})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
        ids.push(id);
    }
    let mut texts: std::collections::HashMap<Uuid, String> = Default::default();
    let mut done = 0;
    while done < ids.len() {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .expect("events")
            .unwrap()
            .unwrap();
        let Message::Text(t) = m else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        let id: Uuid = v["job_id"].as_str().unwrap().parse().unwrap();
        match v["type"].as_str().unwrap() {
            "output.delta" => texts
                .entry(id)
                .or_default()
                .push_str(v["data"]["text"].as_str().unwrap()),
            "succeeded" => done += 1,
            "failed" | "cancelled" | "reset" | "error" => panic!("unexpected {v}"),
            _ => {}
        }
    }
    for (i, id) in ids.iter().enumerate() {
        let expected = switchyard_mock_llm::expected_text(
            &[("user".into(), format!("hello replica {i}"))],
            None,
        );
        assert_eq!(texts[id], expected);
        let j = c.job(&api2, *id).await;
        assert_eq!(j["output"]["text"], expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_worker_loses_nothing() {
    let mut c = Cluster::new().await;
    let api = c.api().await;
    c.spawn("scheduler", &["scheduler"]);
    let victim = c.worker(8);
    let ids = c.submit_sleepers(&api, 16, 1500).await;
    // wait until the victim has jobs in flight
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'running'")
            .fetch_one(c.store.pool())
            .await
            .unwrap();
        if n > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no job started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.children[victim].1.kill().unwrap(); // SIGKILL
    c.children[victim].1.wait().unwrap();
    c.worker(8);
    let mut retried = 0;
    for id in &ids {
        let j = c.wait_status(&api, *id, "succeeded").await;
        if j["attempt"].as_i64().unwrap() > 1 {
            retried += 1;
        }
    }
    assert!(
        retried > 0,
        "some jobs were in flight on the killed worker and ran again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_jobs() {
    let mut c = Cluster::new().await;
    let api = c.api().await;
    let w = c.worker(4);
    let ids = c.submit_sleepers(&api, 3, 1500).await;
    for id in &ids {
        c.wait_status(&api, *id, "running").await;
    }
    let pid = c.children[w].1.id() as i32;
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = tokio::task::spawn_blocking({
        let mut child = c.children.remove(w).1;
        move || child.wait().unwrap()
    })
    .await
    .unwrap();
    assert!(
        status.success(),
        "the worker exits cleanly after draining: {status:?}"
    );
    for id in &ids {
        let j = c.job(&api, *id).await;
        assert_eq!(
            j["status"], "succeeded",
            "in-flight jobs finished before exit"
        );
        assert_eq!(j["attempt"], 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_manage_tenants_and_keys() {
    let mut c = Cluster::new().await;
    let api = c.api().await;
    let run = |args: &[&str]| {
        let out = c.command(args).stdout(Stdio::piped()).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    };
    let (ok, out) = run(&["admin", "create-tenant", "globex"]);
    assert!(ok && out.contains("globex"), "{out}");
    let (ok, _) = run(&["admin", "create-tenant", "globex"]);
    assert!(!ok, "duplicate tenant names are refused");
    let (ok, out) = run(&["admin", "set-tenant", "globex", "--llm-cache", "on"]);
    assert!(ok && out.contains("llm_cache = true"), "{out}");
    let (ok, out) = run(&[
        "admin",
        "set-tenant",
        "globex",
        "--models",
        "mock-echo, mock-tool*",
    ]);
    assert!(
        ok && out.contains("models = mock-echo, mock-tool*"),
        "{out}"
    );
    let (ok, out) = run(&["admin", "set-tenant", "globex", "--models", "all"]);
    assert!(ok && out.contains("models = all"), "{out}");
    let (ok, _) = run(&["admin", "set-tenant", "nobody", "--llm-cache", "off"]);
    assert!(!ok, "unknown tenants are refused");
    let (ok, key) = run(&["admin", "create-key", "--tenant", "globex", "--name", "ci"]);
    assert!(ok && key.starts_with("sy_"), "{key}");
    let r = c
        .http
        .get(format!("{api}/v1/jobs"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (ok, list) = run(&["admin", "list-keys", "--tenant", "globex"]);
    assert!(
        ok && list.contains("active") && !list.contains(&key),
        "keys are listed by prefix only: {list}"
    );
    let prefix = &key[..11];
    let (ok, _) = run(&["admin", "revoke-key", prefix]);
    assert!(ok);
    let (ok, _) = run(&["admin", "revoke-key", prefix]);
    assert!(!ok, "nothing left to revoke");
    // the API caches lookups for a few seconds; a revoked key is refused after that
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let r = c
            .http
            .get(format!("{api}/v1/jobs"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        if r.status() == 401 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "revoked key still accepted"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `switchyard dev` with nothing reachable at DATABASE_URL / REDIS_URL starts private Postgres
/// and Redis under ./.switchyard/, serves jobs end to end, and stops them on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_starts_private_services_and_runs_jobs() {
    let dir = std::env::temp_dir().join(format!("sy-dev-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (pg_port, redis_port, api_port) = (free_port(), free_port(), free_port());
    let key = "sy_devtest1_0123456789abcdefghij0123456789ABCDEFGHIJ";
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["dev", "--listen", &format!("127.0.0.1:{api_port}")])
        .current_dir(&dir)
        .env(
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{pg_port}/switchyard"),
        )
        .env("REDIS_URL", format!("redis://127.0.0.1:{redis_port}"))
        .env("SWITCHYARD_DEV_API_KEY", key)
        .env("SWITCHYARD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let api = format!("http://127.0.0.1:{api_port}");
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(r) = http.get(format!("{api}/readyz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "switchyard dev exited early"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "switchyard dev never became ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let body = json!({"kind": "llm.chat", "input": {"model": "mock-echo", "messages": [{"role": "user", "content": "hello dev"}]}});
    let r = http
        .post(format!("{api}/v1/jobs"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let j: Value = http
            .get(format!("{api}/v1/jobs/{id}"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if j["status"] == "succeeded" {
            assert_eq!(j["output"]["text"], "Mock reply: hello dev");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job never finished: {j}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    for port in [pg_port, redis_port, api_port] {
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err(),
            "port {port} still open after dev stopped"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_survive_sigkill_of_every_process_and_a_redis_wipe() {
    let mut c = Cluster::new().await;
    let api = c.api().await;
    c.spawn("scheduler", &["scheduler"]);
    c.worker(4);
    let (http0, key0) = (c.http.clone(), c.key.clone());
    let post = move |api: String, path: String, body: Value| {
        let (http, key) = (http0.clone(), key0.clone());
        async move {
            let r = http
                .post(format!("{api}{path}"))
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let v: Value = r.json().await.unwrap();
            assert!(status.is_success(), "{path}: {v}");
            v
        }
    };
    let conv = post(
        api.clone(),
        "/v1/conversations".into(),
        json!({"model": "mock-slow", "system": "sys"}),
    )
    .await;
    let id = conv["id"].as_str().unwrap().to_string();
    let path = format!("/v1/conversations/{id}/messages");
    let first = post(
        api.clone(),
        path.clone(),
        json!({"content": "first question"}),
    )
    .await;
    let job: Uuid = first["job"]["id"].as_str().unwrap().parse().unwrap();
    c.wait_status(&api, job, "succeeded").await;
    // the second turn is in flight (mock-slow streams for about a second) when everything dies
    let words = "word ".repeat(20);
    let second = post(
        api.clone(),
        path.clone(),
        json!({"content": format!("second {words}")}),
    )
    .await;
    let job2: Uuid = second["job"]["id"].as_str().unwrap().parse().unwrap();
    c.wait_status(&api, job2, "running").await;
    for (_, child) in &mut c.children {
        if child.id() > 0 {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }
    c.children.clear();
    c.clear_redis();

    // a fresh set of processes (and a fresh mock) on the same database
    let mock_port = free_port();
    c.spawn(
        "mock",
        &["mock-llm", "--listen", &format!("127.0.0.1:{mock_port}")],
    );
    c.mock_url = format!("http://127.0.0.1:{mock_port}/v1");
    wait_port(mock_port).await;
    let api = c.api().await;
    c.spawn("scheduler", &["scheduler"]);
    c.worker(4);
    let j = c.wait_status(&api, job2, "succeeded").await;
    assert!(
        j["attempt"].as_i64().unwrap() >= 2,
        "the interrupted turn ran again: {j}"
    );
    let third = post(api.clone(), path, json!({"content": "third question"})).await;
    let job3: Uuid = third["job"]["id"].as_str().unwrap().parse().unwrap();
    c.wait_status(&api, job3, "succeeded").await;
    let conv: Value = c
        .http
        .get(format!("{api}/v1/conversations/{id}"))
        .bearer_auth(&c.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let msgs = conv["messages"].as_array().unwrap();
    let roles: Vec<&str> = msgs.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(
        roles,
        [
            "user",
            "assistant",
            "user",
            "assistant",
            "user",
            "assistant"
        ],
        "{conv}"
    );
    assert_eq!(msgs[0]["content"], "first question");
    assert!(
        msgs[3]["content"].as_str().unwrap().ends_with("word"),
        "{}",
        msgs[3]
    );
    assert_eq!(msgs[5]["content"], "Mock reply: third question");
}
