//! Operating the roles: health endpoints of workers and the scheduler through a drain,
//! `switchyard probe`, and OTLP trace export.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cluster::{free_port, wait_port, Cluster, T};

/// Workers and the scheduler serve `/healthz` and `/readyz` on `health_listen`: ready while
/// Postgres and Redis answer; during a drain readiness turns red while liveness stays green;
/// `switchyard probe` (the image's health check) reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_follow_the_drain() {
    let mut c = Cluster::new().await;
    let api = c.api().await;
    let (wport, sport) = (free_port(), free_port());
    let child = c
        .command(&["worker", "--concurrency", "4"])
        .env("SWITCHYARD_HEALTH_LISTEN", format!("127.0.0.1:{wport}"))
        .spawn()
        .unwrap();
    c.children.push(("worker".into(), child));
    let w = c.children.len() - 1;
    let child = c
        .command(&["scheduler"])
        .env("SWITCHYARD_HEALTH_LISTEN", format!("127.0.0.1:{sport}"))
        .spawn()
        .unwrap();
    c.children.push(("scheduler".into(), child));
    wait_port(wport).await;
    wait_port(sport).await;
    let get = |port: u16, path: &'static str| {
        let http = c.http.clone();
        async move {
            let r = http
                .get(format!("http://127.0.0.1:{port}{path}"))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    };
    for port in [wport, sport] {
        assert_eq!(get(port, "/healthz").await.0, 200);
        let (status, body) = get(port, "/readyz").await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["postgres"], "ok");
        assert_eq!(v["redis"], "ok");
    }
    let probe = |url: String| {
        let mut cmd = c.command(&["probe", &url]);
        cmd.stderr(Stdio::null());
        cmd.status().unwrap()
    };
    assert!(probe(format!("http://127.0.0.1:{wport}/readyz")).success());
    assert!(!probe(format!("http://127.0.0.1:{}/healthz", free_port())).success());
    // without a URL: the configured health address (loopback when it names every interface)
    let configured = |listen: String| {
        let mut cmd = c.command(&["probe"]);
        cmd.env("SWITCHYARD_HEALTH_LISTEN", listen)
            .stderr(Stdio::null());
        cmd.status().unwrap()
    };
    assert!(configured(format!("127.0.0.1:{wport}")).success());
    let closed = free_port();
    assert!(!configured(format!("0.0.0.0:{closed}")).success());

    // a drain: in-flight jobs keep the worker alive for a while, not ready but live
    let ids = c.submit_sleepers(&api, 2, 3000).await;
    for id in &ids {
        c.wait_status(&api, *id, "running").await;
    }
    unsafe {
        libc::kill(c.children[w].1.id() as i32, libc::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (status, body) = get(wport, "/readyz").await;
        if status == 503 {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["status"], "draining");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never red: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        get(wport, "/healthz").await.0,
        200,
        "a drain is not a failure"
    );
    let status = tokio::task::spawn_blocking({
        let mut child = c.children.remove(w).1;
        move || child.wait().unwrap()
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    for id in &ids {
        assert_eq!(c.job(&api, *id).await["status"], "succeeded");
    }
}

/// With an OTLP endpoint, a role exports its spans (OTLP/HTTP protobuf) and flushes them when
/// it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_are_exported_to_an_otlp_collector() {
    use axum::http::HeaderMap;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, usize)>(64);
    let collector = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let tx = tx.clone();
            async move {
                let ct = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let _ = tx.send((ct, body.len())).await;
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, collector).await });

    let mut c = Cluster::new().await;
    let port = free_port();
    let child = c
        .command(&["api", "--listen", &format!("127.0.0.1:{port}")])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .spawn()
        .unwrap();
    c.children.push(("api".into(), child));
    let at = c.children.len() - 1;
    wait_port(port).await;
    let api = format!("http://127.0.0.1:{port}");
    c.submit(&api, json!({"kind": "system.noop", "input": {}}))
        .await;
    unsafe {
        libc::kill(c.children[at].1.id() as i32, libc::SIGTERM);
    }
    let status = tokio::task::spawn_blocking({
        let mut child = c.children.remove(at).1;
        move || child.wait().unwrap()
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    let (ct, len) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no spans reached the collector")
        .unwrap();
    assert_eq!(ct, "application/x-protobuf");
    assert!(len > 0);
    server.abort();
}
