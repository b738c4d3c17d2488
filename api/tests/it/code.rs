//! `code.exec` through the API: output, streamed stdout/stderr events, limits capped by the
//! tenant's maximum, validation errors with field paths, cancellation.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{spawn_app_with, Opts, TestApp};

async fn code_app(pool: PgPool) -> TestApp {
    spawn_app_with(
        pool,
        Opts {
            code: true,
            ..Opts::default()
        },
    )
    .await
}

async fn submit_code(app: &TestApp, input: Value) -> Uuid {
    let v = app
        .submit(json!({"kind": "code.exec", "input": input}))
        .await;
    assert_eq!(v["queue"], "code");
    v["id"].as_str().unwrap().parse().unwrap()
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn python_runs_and_streams_its_output(pool: PgPool) {
    let app = code_app(pool).await;
    let mut ws = app.ws().await;
    let id = submit_code(
        &app,
        json!({"language": "python",
               "code": "import sys\nprint(sys.stdin.read() * 2)\nprint('oops', file=sys.stderr)\nsys.exit(2)",
               "stdin": "ab", "limits": {"wall_ms": 5000}}),
    )
    .await;
    ws.subscribe(id, 0).await;
    let events = ws.until_terminal(id, Duration::from_secs(60)).await;
    let text = |kind: &str| -> String {
        events
            .iter()
            .filter(|e| e["type"] == kind)
            .map(|e| e["data"]["text"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(text("stdout"), "abab\n");
    assert_eq!(text("stderr"), "oops\n");
    let last = events.last().unwrap();
    assert_eq!(last["type"], "succeeded", "{events:?}");
    let job = app.get_job(id).await;
    let out = &job["output"];
    assert_eq!(job["status"], "succeeded");
    assert_eq!(out["exit_code"], 2);
    assert_eq!(out["stdout"], "abab\n");
    assert_eq!(out["stderr"], "oops\n");
    assert_eq!(out["sandbox"], "wasm");
    assert_eq!(out["killed_by"], Value::Null);
    assert_eq!(out["truncated"], json!({"stdout": false, "stderr": false}));
    assert_eq!(out["limits"]["wall_ms"], 5000);
    // counted for /metrics (cluster-wide, through Redis)
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(
            r#"switchyard_code_runs{tier="wasm",language="python",outcome="exit_nonzero"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(r#"switchyard_code_run_seconds_sum{tier="wasm",language="python"}"#));
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn limits_end_runs_that_still_succeed_and_are_capped(pool: PgPool) {
    let app = code_app(pool).await;
    // the tenant's own maximum: 20 s wall (the default maximum is 10 s)
    app.store
        .set_tenant_code_limits(
            "acme",
            Some(&switchyard_core::code::LimitsRequest {
                wall_ms: Some(20_000),
                ..Default::default()
            }),
        )
        .await
        .unwrap();

    let id = submit_code(
        &app,
        json!({"language": "javascript", "code": "for (;;) {}",
               "limits": {"wall_ms": 60000, "cpu_ms": 300}}),
    )
    .await;
    let job = app
        .wait_status(id, "succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(job["output"]["killed_by"], "cpu");
    assert_eq!(job["output"]["exit_code"], Value::Null);
    assert_eq!(job["output"]["limits"]["wall_ms"], 20000);

    let id = submit_code(
        &app,
        json!({"language": "python", "code": "print('x' * 50)", "limits": {"wall_ms": 60000, "output_bytes": 20}}),
    )
    .await;
    let job = app
        .wait_status(id, "succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(job["output"]["limits"]["wall_ms"], 20000);
    assert_eq!(job["output"]["killed_by"], "output");
    assert_eq!(job["output"]["stdout"], "x".repeat(20));
    assert_eq!(job["output"]["truncated"]["stdout"], true);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn bad_input_is_a_422_naming_the_field(pool: PgPool) {
    let app = code_app(pool).await;
    for (input, field) in [
        (json!({"language": "cobol", "code": "x"}), "input.language"),
        (json!({"language": "python"}), "input.code"),
        (
            json!({"language": "python", "code": "1", "files": {"../etc/x": "y"}}),
            "input.files.../etc/x",
        ),
        (
            json!({"language": "wasm", "module_base64": "!!"}),
            "input.module_base64",
        ),
        (
            json!({"language": "python", "code": "1", "limits": {"wall_ms": 0}}),
            "input.limits.wall_ms",
        ),
        (
            json!({"language": "python", "code": "1", "sandbox": "docker"}),
            "input.sandbox",
        ),
    ] {
        let r = app
            .auth(app.http.post(app.url("/v1/jobs")))
            .json(&json!({"kind": "code.exec", "input": input}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{input}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "invalid_input", "{e}");
        assert_eq!(e["error"]["field"], field, "{e}");
    }
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn cancelling_stops_the_sandbox(pool: PgPool) {
    let app = code_app(pool).await;
    let mut ws = app.ws().await;
    let id = submit_code(
        &app,
        json!({"language": "python", "code": "print('started', flush=True)\nwhile True:\n    pass"}),
    )
    .await;
    ws.subscribe(id, 0).await;
    // wait until it runs (its first output)
    loop {
        let e = ws.next(Duration::from_secs(60)).await.expect("event");
        if e["type"] == "stdout" {
            break;
        }
    }
    let t = std::time::Instant::now();
    let r = app
        .auth(app.http.post(app.url(&format!("/v1/jobs/{id}/cancel"))))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let job = app
        .wait_status(id, "cancelled", Duration::from_secs(10))
        .await;
    assert_eq!(job["status"], "cancelled");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // the sandbox time it used is charged all the same (a cancel just before the end was a
    // way past the daily sandbox quota)
    app.wait_usage_above("sandbox_cpu_seconds_today", 0.0).await;
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn code_jobs_may_be_larger_than_other_bodies(pool: PgPool) {
    let app = code_app(pool).await;
    // 3 MiB of files: over the 1 MiB body limit of other routes, within the jobs route's own
    let big = "x".repeat(3 * 1024 * 1024);
    let id = submit_code(
        &app,
        json!({"language": "python", "code": "import os\nprint(os.path.getsize('big.txt'))",
               "files": {"big.txt": big}}),
    )
    .await;
    let job = app
        .wait_status(id, "succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(job["output"]["stdout"], format!("{}\n", 3 * 1024 * 1024));
    let r = app
        .auth(app.http.post(app.url("/v1/conversations")))
        .json(&json!({"system": "x".repeat(2 * 1024 * 1024)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    app.stop().await;
}
