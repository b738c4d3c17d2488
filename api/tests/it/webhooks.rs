//! Webhooks: a signed POST when a job ends (HMAC-SHA256 over timestamp and body with the
//! tenant's secret), retries with backoff until the receiver accepts, deliveries listed per
//! job, the tenant's default webhook, and private addresses refused at submission and at
//! connect time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{spawn_app_with, Opts, TestApp};

const T: Duration = Duration::from_secs(30);

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    /// Answers 500 to this many requests first.
    fail_first: Arc<Mutex<usize>>,
}

/// A webhook receiver on a free loopback port; returns its base URL.
async fn receiver(fail_first: usize) -> (String, Receiver) {
    let r = Receiver::default();
    *r.fail_first.lock().unwrap() = fail_first;
    let state = r.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let state = state.clone();
            async move {
                state.got.lock().unwrap().push((headers, body));
                let mut fail = state.fail_first.lock().unwrap();
                if *fail > 0 {
                    *fail -= 1;
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("127.0.0.1:{port}"), r)
}

fn opts(allow_private: bool) -> Opts {
    Opts {
        configure: Some(Arc::new(move |cfg| {
            cfg.webhooks.allow_private = allow_private;
            cfg.webhooks.retry_base_ms = 100;
            cfg.webhooks.max_attempts = 4;
        })),
        ..Opts::default()
    }
}

async fn deliveries(app: &TestApp, id: Uuid, until: impl Fn(&Value) -> bool) -> Value {
    let mut v = Value::Null;
    for _ in 0..300 {
        v = app.get_json(&format!("/v1/jobs/{id}/deliveries")).await;
        if until(&v) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("deliveries never got there: {v}");
}

/// After a rotation, deliveries are signed with the new secret and, for 24 h, the old one
/// too (`t=…,v1=<new>,v1=<old>`), so a receiver still on the old secret keeps accepting them.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_rotated_secret_signs_beside_the_old_one_for_a_day(pool: PgPool) {
    let app = spawn_app_with(pool, opts(true)).await;
    let (addr, rx) = receiver(0).await;
    let url = format!("http://{addr}/hook");
    let old = app.store.webhook_secret(app.tenant).await.unwrap().unwrap();
    let new = app
        .store
        .rotate_webhook_secret("acme")
        .await
        .unwrap()
        .unwrap();
    assert_ne!(old, new);
    let deliver = |n: usize| {
        let (app, url, rx) = (&app, url.clone(), rx.clone());
        async move {
            let job = app
                .submit(json!({"kind": "system.noop", "input": {}, "webhook_url": url}))
                .await;
            let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
            deliveries(app, id, |v| v["data"][0]["state"] == "delivered").await;
            let got = rx.got.lock().unwrap().clone();
            assert_eq!(got.len(), n);
            let (headers, body) = got[n - 1].clone();
            let sig = headers["switchyard-signature"]
                .to_str()
                .unwrap()
                .to_string();
            let t: i64 = sig
                .strip_prefix("t=")
                .and_then(|s| s.split(',').next())
                .unwrap()
                .parse()
                .unwrap();
            (sig, t, body)
        }
    };
    let (sig, t, body) = deliver(1).await;
    assert_eq!(
        sig,
        switchyard_core::webhook::sign_with(&[&new, &old], t, &body)
    );
    let mine = switchyard_core::webhook::sign(&old, t, &body);
    assert!(sig.ends_with(mine.split_once(',').unwrap().1), "{sig}");
    // a day later only the new one signs
    sqlx::query("UPDATE tenants SET webhook_secret_previous_until = now() - interval '1 second'")
        .execute(app.store.pool())
        .await
        .unwrap();
    let (sig, t, body) = deliver(2).await;
    assert_eq!(sig, switchyard_core::webhook::sign(&new, t, &body));
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_finished_job_posts_a_signed_webhook(pool: PgPool) {
    let app = spawn_app_with(pool, opts(true)).await;
    let (addr, rx) = receiver(0).await;
    let url = format!("http://{addr}/hook");
    let job = app
        .submit(json!({"kind": "system.noop", "input": {}, "webhook_url": url}))
        .await;
    assert_eq!(job["webhook_url"], url.as_str());
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(id, "succeeded", T).await;
    let d = deliveries(&app, id, |v| v["data"][0]["state"] == "delivered").await;
    let d0 = &d["data"][0];
    assert_eq!(d0["event"], "job.succeeded");
    assert_eq!(d0["attempts"], 1);
    assert_eq!(d0["last_status"], 200);

    let got = rx.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    let (headers, body) = &got[0];
    let sig = headers["switchyard-signature"].to_str().unwrap();
    let (t, _) = sig
        .strip_prefix("t=")
        .and_then(|s| s.split_once(",v1="))
        .unwrap();
    let t: i64 = t.parse().unwrap();
    assert!(
        (chrono::Utc::now().timestamp() - t).abs() < 60,
        "fresh timestamp"
    );
    let secret = app.store.webhook_secret(app.tenant).await.unwrap().unwrap();
    assert_eq!(sig, switchyard_core::webhook::sign(&secret, t, body));
    assert_ne!(sig, switchyard_core::webhook::sign("wrong", t, body));
    let v: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["type"], "job.succeeded");
    assert_eq!(
        v["url"],
        url.as_str(),
        "the signed body names where it was sent"
    );
    assert_eq!(v["id"], d0["id"]);
    assert_eq!(v["data"]["job"]["id"], json!(id));
    assert_eq!(v["data"]["job"]["status"], "succeeded");
    assert_eq!(headers["switchyard-event"], "job.succeeded");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn failed_deliveries_are_retried_and_the_tenants_webhook_is_the_default(pool: PgPool) {
    let app = spawn_app_with(pool, opts(true)).await;
    let (addr, rx) = receiver(2).await;
    let url = format!("http://{addr}/hook");
    assert!(app
        .store
        .set_tenant_webhook("acme", Some(&url))
        .await
        .unwrap());
    let id = app.submit_noop(json!({"fail_fatal": true})).await;
    app.wait_status(id, "failed", T).await;
    assert_eq!(app.get_job(id).await["webhook_url"], url.as_str());
    let d = deliveries(&app, id, |v| v["data"][0]["state"] == "delivered").await;
    let d0 = &d["data"][0];
    assert_eq!(d0["event"], "job.failed");
    assert_eq!(d0["attempts"], 3, "{d}");
    let statuses: Vec<Value> = d0["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].clone())
        .collect();
    assert_eq!(statuses, [json!(500), json!(500), json!(200)]);
    assert_eq!(rx.got.lock().unwrap().len(), 3);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn private_addresses_are_refused_at_submission_and_at_connect_time(pool: PgPool) {
    let app = spawn_app_with(pool, opts(false)).await;
    let (addr, rx) = receiver(0).await;
    for bad in [
        format!("http://{addr}/hook"),
        "http://169.254.169.254/latest/meta-data".to_string(),
        "http://[::1]/x".to_string(),
        "ftp://example.com/x".to_string(),
    ] {
        let r = app
            .auth(app.http.post(app.url("/v1/jobs")))
            .json(&json!({"kind": "system.noop", "input": {}, "webhook_url": bad}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{bad}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["field"], "webhook_url", "{bad}: {v}");
    }
    // a name is accepted, but it resolves to loopback: refused when connecting, never sent
    let port = addr.rsplit(':').next().unwrap();
    let job = app
        .submit(json!({"kind": "system.noop", "input": {},
                       "webhook_url": format!("http://localhost:{port}/hook")}))
        .await;
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(id, "succeeded", T).await;
    let d = deliveries(&app, id, |v| v["data"][0]["state"] == "failed").await;
    let d0 = &d["data"][0];
    assert_eq!(d0["attempts"], 4, "{d}");
    assert!(
        d0["last_error"].as_str().unwrap().contains("refused"),
        "{d}"
    );
    assert!(
        rx.got.lock().unwrap().is_empty(),
        "nothing reached the receiver"
    );
    app.stop().await;
}

/// A job with a webhook, ended by `end` (an UPDATE of the job `$1`): its delivery is due.
async fn ended_with_webhook(app: &TestApp, end: &str) -> switchyard_store::NewJob {
    ended_with_webhook_to(app, end, "http://127.0.0.1:9/hook").await
}

/// [`ended_with_webhook`] with its webhook at `url`.
async fn ended_with_webhook_to(app: &TestApp, end: &str, url: &str) -> switchyard_store::NewJob {
    let job = switchyard_store::NewJob {
        webhook_url: Some(url.into()),
        ..crate::support::new_job(app.tenant)
    };
    app.store
        .insert_jobs(std::slice::from_ref(&job))
        .await
        .unwrap();
    sqlx::query(end)
        .bind(job.id)
        .execute(app.store.pool())
        .await
        .unwrap();
    job
}

/// A scheduler whose claim ran out (another one claimed the delivery again) cannot overwrite
/// the newer attempt's outcome with its late one: the late attempt only joins the log.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_late_attempt_never_overwrites_a_newer_claims_outcome(pool: PgPool) {
    use switchyard_store::DeliveryOutcome;
    let app = crate::support::spawn_api_only(pool).await;
    let s = &app.store;
    let job = ended_with_webhook(
        &app,
        "UPDATE jobs SET status = 'succeeded', finished_at = now() WHERE id = $1",
    )
    .await;
    let first = s.claim_deliveries(10, 10, 0.05, 8).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].attempt, 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // the first claim's lease ran out: another scheduler takes the delivery
    let second = s.claim_deliveries(10, 10, 60.0, 8).await.unwrap();
    assert_eq!((second.len(), second[0].attempt), (1, 2));
    let id = first[0].id;
    let retry = DeliveryOutcome::Retry {
        at: chrono::Utc::now() + chrono::Duration::seconds(30),
    };
    let late = json!({"attempt": 1, "status": 200});
    let written = s
        .record_delivery(id, 1, Some(200), None, &late, &DeliveryOutcome::Delivered)
        .await
        .unwrap();
    assert!(!written, "the late attempt's outcome is not written");
    let newer = json!({"attempt": 2, "status": 500});
    let written = s
        .record_delivery(id, 2, Some(500), Some("HTTP 500"), &newer, &retry)
        .await
        .unwrap();
    assert!(written);
    let d = app
        .get_json(&format!("/v1/jobs/{}/deliveries", job.id))
        .await;
    let d0 = &d["data"][0];
    assert_eq!(d0["state"], "pending", "{d}");
    assert_eq!(d0["last_status"], 500, "{d}");
    assert_eq!(d0["log"], json!([late, newer]), "{d}");
    app.stop().await;
}

/// A round claims at most a few deliveries of each tenant: a tenant with many due (its
/// receiver down, every attempt waiting out the timeout) leaves room for the others'.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn deliveries_are_claimed_a_few_per_tenant(pool: PgPool) {
    let app = crate::support::spawn_api_only(pool).await;
    let s = &app.store;
    let quiet = s.create_tenant("quiet").await.unwrap();
    for (tenant, n) in [(app.tenant, 30), (quiet.id, 1)] {
        sqlx::query(
            "INSERT INTO webhook_deliveries (tenant_id, job_id, url, event)
             SELECT $1, gen_random_uuid(), 'http://127.0.0.1:9/', 'job.succeeded'
             FROM generate_series(1, $2)",
        )
        .bind(tenant)
        .bind(n)
        .execute(s.pool())
        .await
        .unwrap();
    }
    let claimed = s.claim_deliveries(10, 4, 60.0, 8).await.unwrap();
    let busy = claimed.iter().filter(|d| d.tenant_id == app.tenant).count();
    let other = claimed.iter().filter(|d| d.tenant_id == quiet.id).count();
    assert_eq!((busy, other), (4, 1));
    app.stop().await;
}

/// A delivery whose every claim ended without an outcome (its scheduler killed during the
/// attempt, say by the delivery itself) is given up once its attempts are used, not claimed
/// for ever.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_delivery_whose_claims_never_end_is_given_up(pool: PgPool) {
    let app = crate::support::spawn_api_only(pool).await;
    let s = &app.store;
    let job = ended_with_webhook(
        &app,
        "UPDATE jobs SET status = 'succeeded', finished_at = now() WHERE id = $1",
    )
    .await;
    for attempt in 1..=2 {
        let claimed = s.claim_deliveries(10, 10, 0.05, 2).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].attempt, attempt);
        // the claim runs out with nothing recorded
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(s
        .claim_deliveries(10, 10, 60.0, 2)
        .await
        .unwrap()
        .is_empty());
    let d = app
        .get_json(&format!("/v1/jobs/{}/deliveries", job.id))
        .await;
    let d0 = &d["data"][0];
    assert_eq!(d0["state"], "failed", "{d}");
    assert_eq!(d0["attempts"], 2, "{d}");
    assert!(
        d0["last_error"].as_str().unwrap().contains("given up"),
        "{d}"
    );
    app.stop().await;
}

/// A delivery describes the ending it announces, though the job moved on (a retry) before
/// the delivery went out: the trigger keeps the row as it ended.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_delivery_carries_the_job_as_it_ended(pool: PgPool) {
    let app = crate::support::spawn_api_only(pool).await;
    let s = &app.store;
    let job = ended_with_webhook(
        &app,
        "UPDATE jobs SET status = 'failed', attempt = 1, finished_at = now(),
             error = '{\"code\": \"boom\", \"message\": \"x\", \"retryable\": false}' WHERE id = $1",
    )
    .await;
    // retried before its delivery went out: queued again, the error cleared
    sqlx::query(
        "UPDATE jobs SET status = 'queued', error = NULL, finished_at = NULL WHERE id = $1",
    )
    .bind(job.id)
    .execute(s.pool())
    .await
    .unwrap();
    let tasks = s.claim_deliveries(10, 10, 60.0, 8).await.unwrap();
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].event, "job.failed");
    let ended = tasks[0].job.as_ref().expect("the snapshot").to_job();
    assert_eq!(ended.status.as_str(), "failed");
    assert_eq!(ended.attempt, 1);
    let v = serde_json::to_value(&ended).unwrap();
    assert_eq!(v["error"]["code"], "boom", "{v}");
    assert!(v["finished_at"].is_string(), "{v}");
    assert_eq!(app.get_job(job.id).await["status"], "queued");
    app.stop().await;
}

/// A scheduler that stops lets the attempt in flight finish and starts no other; the rest
/// stay due at once with no attempt counted (it claims only what it starts), instead of being
/// held for a round that outlasts the shutdown's grace period.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_stopping_scheduler_gives_back_the_deliveries_it_did_not_start(pool: PgPool) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let app = crate::support::spawn_api_only(pool).await;
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let slow = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1500)).await;
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, slow).await });
    let end = "UPDATE jobs SET status = 'succeeded', finished_at = now() WHERE id = $1";
    for _ in 0..3 {
        ended_with_webhook_to(&app, end, &url).await;
    }
    let cfg = switchyard_core::webhook::WebhookConfig {
        allow_private: true,
        concurrency: 1,
        ..Default::default()
    };
    let deliverer = switchyard_scheduler::webhooks::Deliverer::new(app.store.clone(), cfg).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(deliverer.run(stop.clone()));
    let t = std::time::Instant::now();
    while hits.load(Ordering::SeqCst) == 0 {
        assert!(t.elapsed() < T, "no delivery started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the deliverer stops")
        .unwrap();
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "no attempt started after the stop"
    );
    let states: Vec<(String, i32)> =
        sqlx::query_as("SELECT state, attempts FROM webhook_deliveries ORDER BY state, attempts")
            .fetch_all(app.store.pool())
            .await
            .unwrap();
    assert_eq!(
        states,
        vec![
            ("delivered".to_string(), 1),
            ("pending".to_string(), 0),
            ("pending".to_string(), 0)
        ],
        "the attempt in flight finished; the others were given back"
    );
    let again = app.store.claim_deliveries(10, 10, 60.0, 8).await.unwrap();
    assert_eq!(again.len(), 2, "due at once");
    assert!(again.iter().all(|t| t.attempt == 1));
    app.stop().await;
}
