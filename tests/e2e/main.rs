//! Multi-process tests of the `switchyard` binary: two API replicas and two workers sharing
//! Postgres and Redis, a worker killed with SIGKILL mid-job, SIGTERM draining, the admin
//! commands, `dev`, and a conversation that survives SIGKILL of every process.

mod chaos;
mod cluster;
mod ops;
mod redis_cluster;

use std::process::{Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::cluster::{free_port, wait_port, Cluster, T};
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_on_one_replica_stream_from_the_other() {
    replicas_stream_each_others_jobs(Cluster::new().await).await;
}

/// Two API replicas, two workers and a scheduler on `c`: jobs submitted to one replica stream
/// their tokens, in order and whole, over a WebSocket of the other.
async fn replicas_stream_each_others_jobs(mut c: Cluster) {
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

/// A second SIGTERM during a drain ends the worker at once (exit 130) instead of waiting for
/// its jobs; they are not lost: their leases run out and they run again elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_drain_at_once() {
    let mut c = Cluster::new().await;
    let api = c.api().await;
    let w = c.worker(4);
    let ids = c.submit_sleepers(&api, 1, 60_000).await;
    c.wait_status(&api, ids[0], "running").await;
    let pid = c.children[w].1.id() as i32;
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking({
        let mut child = c.children.remove(w).1;
        move || child.wait().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    // (a drain would have waited for the minute-long job)
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
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
    // a bad flag changes nothing: the secret is not rotated (and lost) before the error
    let (ok, out) = run(&[
        "admin",
        "set-tenant",
        "globex",
        "--webhook-secret",
        "rotate",
        "--quotas",
        "bogus=1",
    ]);
    assert!(!ok && !out.contains("secret"), "{out}");
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
    // a state-changing request lands in the audit trail, whose chain the CLI verifies
    let r = c
        .http
        .post(format!("{api}/v1/jobs"))
        .bearer_auth(&key)
        .json(&json!({"kind": "system.noop", "input": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (ok, out) = run(&["admin", "audit-verify", "--tenant", "globex"]);
        assert!(ok, "{out}");
        if out.contains("intact (1 rows)") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
        // share the compiled interpreters with the other tests
        .env(
            "SWITCHYARD_CODE__WORK_DIR",
            std::env::temp_dir().join("switchyard-test-code"),
        )
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
    let chat = json!({"kind": "llm.chat", "input": {"model": "mock-echo", "messages": [{"role": "user", "content": "hello dev"}]}});
    let j = run_to_end(&http, &api, key, &chat).await;
    assert_eq!(j["output"]["text"], "Mock reply: hello dev");
    // code.exec in the wasm sandbox (built in the background when dev starts)
    let code = json!({"kind": "code.exec", "input": {"language": "javascript", "code": "console.log(6 * 7)"}});
    let j = run_to_end(&http, &api, key, &code).await;
    assert_eq!(j["output"]["stdout"], "42\n", "{j}");
    assert_eq!(j["output"]["sandbox"], "wasm");
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

/// Submits `body` and polls the job until it succeeds.
async fn run_to_end(http: &reqwest::Client, api: &str, key: &str, body: &Value) -> Value {
    let r = http
        .post(format!("{api}/v1/jobs"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
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
            return j;
        }
        assert!(
            tokio::time::Instant::now() < deadline && j["status"] != "failed",
            "job never succeeded: {j}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
