//! Cron schedules: the API (create, read, list, pause, delete, errors with field paths) and
//! firing: each fire time enqueues exactly one job with two scheduler replicas, and a schedule
//! that missed many fire times while nothing ran gets one catch-up run; runs are held to the
//! tenant's limits and the creator's key.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{spawn_app, TestApp};

/// Posts `body` to `path` with the app's key: the status and the body (`null` if not JSON).
pub(crate) async fn post(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    post_as(app, &app.key, path, body).await
}

/// [`post`] with another key.
pub(crate) async fn post_as(app: &TestApp, key: &str, path: &str, body: Value) -> (u16, Value) {
    let r = app
        .http
        .post(app.url(path))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn noop_schedule() -> Value {
    json!({"name": "nightly", "cron": "0 3 * * *", "timezone": "Europe/Paris",
           "job": {"kind": "system.noop", "input": {}, "priority": 4}})
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn schedules_are_created_read_paused_and_deleted(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (status, s) = post(&app, "/v1/schedules", noop_schedule()).await;
    assert_eq!(status, 201, "{s}");
    let id = s["id"].as_str().unwrap().to_string();
    let next: DateTime<Utc> = s["next_run_at"].as_str().unwrap().parse().unwrap();
    assert!(next > Utc::now());
    // 03:00 in Paris is 01:00 or 02:00 UTC
    assert!(
        matches!(next.format("%H:%M").to_string().as_str(), "01:00" | "02:00"),
        "{next}"
    );
    assert_eq!(s["timezone"], "Europe/Paris");
    assert_eq!(s["paused"], false);
    // the stored template is a complete job body
    assert_eq!(s["job"]["queue"], "system");
    assert_eq!(s["job"]["priority"], 4);

    let got = app.get_json(&format!("/v1/schedules/{id}")).await;
    assert_eq!(got["runs"], json!([]), "{got}");
    let list = app.get_json("/v1/schedules").await;
    assert_eq!(list["data"][0]["id"], id.as_str());

    let r = app
        .auth(app.http.patch(app.url(&format!("/v1/schedules/{id}"))))
        .json(&json!({"paused": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["paused"], true);

    let r = app
        .auth(app.http.delete(app.url(&format!("/v1/schedules/{id}"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = app
        .auth(app.http.get(app.url(&format!("/v1/schedules/{id}"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn bad_schedules_name_their_field(pool: PgPool) {
    let app = spawn_app(pool).await;
    let job = json!({"kind": "system.noop", "input": {}});
    for (body, field) in [
        (json!({"cron": "* * * *", "job": job}), "cron"),
        (json!({"cron": "99 * * * *", "job": job}), "cron"),
        (
            json!({"cron": "* * * * *", "timezone": "Nowhere/City", "job": job}),
            "timezone",
        ),
        (
            json!({"cron": "* * * * *", "job": {"kind": "nope", "input": {}}}),
            "job.kind",
        ),
        (
            json!({"cron": "* * * * *", "job": {"kind": "llm.chat", "input": {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}}}),
            "job.input.model",
        ),
        (
            json!({"cron": "* * * * *", "job": {"kind": "system.noop", "input": {}, "delay_s": 5}}),
            "job.delay_s",
        ),
        (json!({"cron": "* * * * *", "job": 5}), "job"),
        (
            json!({"cron": "* * * * *", "job": job, "every": 5}),
            "every",
        ),
    ] {
        let (status, v) = post(&app, "/v1/schedules", body.clone()).await;
        assert_eq!(status, 422, "{body}: {v}");
        assert_eq!(v["error"]["field"], field, "{body}: {v}");
    }
    app.stop().await;
}

async fn runs(app: &TestApp, id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM schedule_runs WHERE schedule_id = $1")
        .bind(id)
        .fetch_one(app.store.pool())
        .await
        .unwrap()
}

async fn wait_runs(app: &TestApp, id: Uuid, n: i64) {
    for _ in 0..200 {
        if runs(app, id).await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("schedule {id} never reached {n} runs");
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn two_schedulers_enqueue_each_fire_time_exactly_once(pool: PgPool) {
    let mut app = spawn_app(pool).await;
    app.start_scheduler().await; // a second replica
    let (status, s) = post(
        &app,
        "/v1/schedules",
        json!({"cron": "*/5 * * * *", "job": {"kind": "system.noop", "input": {}}}),
    )
    .await;
    assert_eq!(status, 201, "{s}");
    let id: Uuid = s["id"].as_str().unwrap().parse().unwrap();
    // five fire times come due one after another (as if the clock ran on)
    let base = Utc::now() - chrono::Duration::hours(1);
    for i in 1..=5 {
        sqlx::query("UPDATE schedules SET next_run_at = $2 WHERE id = $1")
            .bind(id)
            .bind(base + chrono::Duration::minutes(5 * i))
            .execute(app.store.pool())
            .await
            .unwrap();
        wait_runs(&app, id, i).await;
    }
    // both replicas had time to race for each of them
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(runs(&app, id).await, 5);
    let jobs: Vec<Uuid> =
        sqlx::query_scalar("SELECT job_id FROM schedule_runs WHERE schedule_id = $1")
            .bind(id)
            .fetch_all(app.store.pool())
            .await
            .unwrap();
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE tenant_id = $1")
        .bind(app.tenant)
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(total, 5, "one job per fire time");
    for j in jobs {
        app.wait_status(j, "succeeded", Duration::from_secs(20))
            .await;
    }
    let got = app.get_json(&format!("/v1/schedules/{id}")).await;
    assert_eq!(got["runs"].as_array().unwrap().len(), 5, "{got}");
    let next: DateTime<Utc> = got["next_run_at"].as_str().unwrap().parse().unwrap();
    assert!(next > Utc::now(), "{got}");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn missed_fire_times_get_one_catch_up_run_and_paused_ones_none(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (_, s) = post(
        &app,
        "/v1/schedules",
        json!({"cron": "* * * * *", "job": {"kind": "system.noop", "input": {}}}),
    )
    .await;
    let id: Uuid = s["id"].as_str().unwrap().parse().unwrap();
    let (_, paused) = post(
        &app,
        "/v1/schedules",
        json!({"cron": "* * * * *", "paused": true, "job": {"kind": "system.noop", "input": {}}}),
    )
    .await;
    let paused: Uuid = paused["id"].as_str().unwrap().parse().unwrap();
    // three hours of downtime: 180 fire times missed
    sqlx::query("UPDATE schedules SET next_run_at = now() - interval '3 hours'")
        .execute(app.store.pool())
        .await
        .unwrap();
    wait_runs(&app, id, 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // (a minute boundary may pass meanwhile: that is a new fire time, not a missed one)
    assert!(runs(&app, id).await <= 2, "one catch-up run");
    assert_eq!(runs(&app, paused).await, 0);
    let got = app.get_json(&format!("/v1/schedules/{id}")).await;
    let next: DateTime<Utc> = got["next_run_at"].as_str().unwrap().parse().unwrap();
    assert!(next > Utc::now() - chrono::Duration::seconds(5), "{got}");
    app.stop().await;
}

/// A fired run is marked dispatched with the epoch Redis had, so the reconciler does not
/// dispatch it a second time while it waits for a worker; pruning a job finds its run rows
/// by index.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_fired_run_is_dispatched_once_and_found_by_job(pool: PgPool) {
    let app = crate::support::spawn_api_only(pool).await;
    let opts = switchyard_scheduler::SchedulerOptions {
        undispatched_min_age: Duration::ZERO,
        ..app.scheduler_opts()
    };
    let sched = app.scheduler(opts).await;
    let first = sched.pass().await.unwrap();
    assert!(first.new_epoch.is_some(), "{first:?}");
    let (status, s) = post(
        &app,
        "/v1/schedules",
        json!({"cron": "* * * * *", "job": {"kind": "system.noop", "input": {}}}),
    )
    .await;
    assert_eq!(status, 201, "{s}");
    let id: Uuid = s["id"].as_str().unwrap().parse().unwrap();
    sqlx::query("UPDATE schedules SET next_run_at = now() - interval '1 minute' WHERE id = $1")
        .bind(id)
        .execute(app.store.pool())
        .await
        .unwrap();
    let fired = sched.pass().await.unwrap();
    assert_eq!(fired.scheduled, 1, "{fired:?}");
    // no worker claims it: the next passes find it dispatched in the current epoch
    tokio::time::sleep(Duration::from_millis(50)).await;
    let again = sched.pass().await.unwrap();
    assert_eq!(again.redispatched, 0, "dispatched once: {again:?}");
    let epoch: i64 = sqlx::query_scalar(
        "SELECT j.dispatch_epoch FROM jobs j JOIN schedule_runs r ON r.job_id = j.id
         WHERE r.schedule_id = $1",
    )
    .bind(id)
    .fetch_one(app.store.pool())
    .await
    .unwrap();
    assert_eq!(epoch, first.new_epoch.unwrap());

    // retention deletes run rows by job id: an index serves it
    let mut c = app.store.pool().acquire().await.unwrap();
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *c)
        .await
        .unwrap();
    let plan: Vec<String> =
        sqlx::query_scalar("EXPLAIN DELETE FROM schedule_runs WHERE job_id = ANY($1)")
            .bind(vec![Uuid::now_v7()])
            .fetch_all(&mut *c)
            .await
            .unwrap();
    sqlx::query("RESET enable_seqscan")
        .execute(&mut *c)
        .await
        .unwrap();
    assert!(
        plan.iter().any(|l| l.contains("schedule_runs_job")),
        "{plan:#?}"
    );
    app.stop().await;
}

/// Makes every schedule due, `minutes_ago` (distinct fire times per round).
async fn make_due(app: &TestApp, minutes_ago: i32) {
    sqlx::query("UPDATE schedules SET next_run_at = now() - make_interval(mins => $1)")
        .bind(minutes_ago)
        .execute(app.store.pool())
        .await
        .unwrap();
}

/// The newest run of a schedule as `GET /v1/schedules/{id}` shows it.
async fn newest_run(app: &TestApp, id: Uuid) -> Value {
    let got = app.get_json(&format!("/v1/schedules/{id}")).await;
    got["runs"][0].clone()
}

/// A cron run is held to what a submission by the schedule's creator would be held to when
/// it fires: a revoked key's schedule, a model no longer enabled for the tenant, a used-up
/// daily quota and a full backlog (`max_queued_jobs`, counting the runs of the same pass) each
/// skip the run, recorded with its reason; a schedule keeps its 20 newest skipped runs.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn cron_runs_are_held_to_the_tenants_limits_and_the_creators_key(pool: PgPool) {
    use switchyard_core::quota::QuotaLimits;
    let app = crate::support::spawn_api_only(pool).await;
    let sched = app.scheduler(app.scheduler_opts()).await;
    let id_of = |s: &Value| -> Uuid { s["id"].as_str().unwrap().parse().unwrap() };
    let (_, s) = post(
        &app,
        "/v1/schedules",
        json!({"cron": "0 0 1 1 *", "job": {"kind": "system.noop", "input": {}}}),
    )
    .await;
    let noop = id_of(&s);
    let (_, s) = post(
        &app,
        "/v1/schedules",
        json!({"cron": "0 0 1 1 *", "job": {"kind": "llm.chat", "input": {"model": "mock-echo",
               "messages": [{"role": "user", "content": "hi"}]}}}),
    )
    .await;
    let chat = id_of(&s);
    // a schedule made with a second key, which is then revoked
    let (rec, key2) = app
        .store
        .create_api_key(app.tenant, "temp", None)
        .await
        .unwrap();
    let r = app
        .http
        .post(app.url("/v1/schedules"))
        .bearer_auth(&key2)
        .json(&json!({"cron": "0 0 1 1 *", "job": {"kind": "system.noop", "input": {}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let revoked = id_of(&r.json::<Value>().await.unwrap());
    assert_eq!(app.store.revoke_api_key(&rec.prefix).await.unwrap(), 1);

    // 1: no limits; the revoked key's run is skipped
    make_due(&app, 60).await;
    assert_eq!(sched.pass().await.unwrap().scheduled, 2);
    let run = newest_run(&app, revoked).await;
    assert_eq!(run["job_id"], Value::Null, "{run}");
    assert_eq!(run["skipped"]["code"], "forbidden", "{run}");
    assert!(
        run["skipped"]["message"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{run}"
    );
    let run = newest_run(&app, noop).await;
    assert!(
        run["job_id"].is_string() && run.get("skipped").is_none(),
        "{run}"
    );

    // 2: the day's LLM tokens are used up: the chat run is skipped, the no-op is not
    let limits = QuotaLimits {
        llm_tokens_per_day: Some(10),
        ..Default::default()
    };
    app.store
        .set_tenant_quotas("acme", Some(&limits))
        .await
        .unwrap();
    let (day, _) = switchyard_core::quota::utc_day(Utc::now());
    switchyard_queue::Quotas::new(app.keys(), app.redis().await)
        .charge(app.tenant, &day, 10, 0)
        .await
        .unwrap();
    make_due(&app, 50).await;
    assert_eq!(sched.pass().await.unwrap().scheduled, 1);
    let run = newest_run(&app, chat).await;
    assert_eq!(run["skipped"]["code"], "quota_exceeded", "{run}");
    assert!(
        run["skipped"]["message"]
            .as_str()
            .unwrap()
            .contains("LLM tokens"),
        "{run}"
    );
    assert!(newest_run(&app, noop).await["job_id"].is_string());

    // 3: three jobs wait (no worker runs here) and three may; the model is no longer enabled
    let limits = QuotaLimits {
        max_queued_jobs: Some(3),
        ..Default::default()
    };
    app.store
        .set_tenant_quotas("acme", Some(&limits))
        .await
        .unwrap();
    app.store
        .set_tenant_models("acme", Some(&["other-*".to_string()]))
        .await
        .unwrap();
    make_due(&app, 40).await;
    assert_eq!(sched.pass().await.unwrap().scheduled, 0);
    let run = newest_run(&app, chat).await;
    assert_eq!(run["skipped"]["code"], "forbidden", "{run}");
    assert!(
        run["skipped"]["message"]
            .as_str()
            .unwrap()
            .contains("mock-echo"),
        "{run}"
    );
    let run = newest_run(&app, noop).await;
    assert_eq!(run["skipped"]["code"], "quota_exceeded", "{run}");
    assert!(
        run["skipped"]["message"]
            .as_str()
            .unwrap()
            .contains("max_queued_jobs"),
        "{run}"
    );

    // 4: room for one more job, two runs due in the same pass: one of them fits
    app.store.set_tenant_models("acme", None).await.unwrap();
    let limits = QuotaLimits {
        max_queued_jobs: Some(4),
        ..Default::default()
    };
    app.store
        .set_tenant_quotas("acme", Some(&limits))
        .await
        .unwrap();
    make_due(&app, 30).await;
    assert_eq!(sched.pass().await.unwrap().scheduled, 1);
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE tenant_id = $1")
        .bind(app.tenant)
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(queued, 4);

    // a schedule keeps its newest skipped runs only (fire times rising, all past)
    for round in 0..25 {
        sqlx::query(
            "UPDATE schedules SET next_run_at = now() - make_interval(secs => $2) WHERE id = $1",
        )
        .bind(revoked)
        .bind(f64::from(100 - round))
        .execute(app.store.pool())
        .await
        .unwrap();
        sched.pass().await.unwrap();
    }
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM schedule_runs WHERE schedule_id = $1 AND job_id IS NULL",
    )
    .bind(revoked)
    .fetch_one(app.store.pool())
    .await
    .unwrap();
    assert_eq!(kept, 20);

    // a schedule whose tenant's use a pass did not read is left due, with no run recorded
    make_due(&app, 10).await;
    let runs_before: i64 = sqlx::query_scalar("SELECT count(*) FROM schedule_runs")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    let batch = app.store.due_schedules(10).await.unwrap();
    let n = batch.due.len();
    assert_eq!(n, 3);
    assert!(batch
        .commit((0..n).map(|_| None).collect())
        .await
        .unwrap()
        .is_empty());
    let runs_after: i64 = sqlx::query_scalar("SELECT count(*) FROM schedule_runs")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(runs_after, runs_before);
    assert_eq!(app.store.due_schedules(10).await.unwrap().due.len(), 3);
    app.stop().await;
}

/// A schedule an end user created with a JWT stops firing once the token has expired (its
/// runs are skipped, as a revoked key's are): an end user cannot leave work running past their
/// authority. (It fired forever, even after the tenant removed its issuer.)
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn an_end_users_schedule_ends_with_their_token(pool: PgPool) {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let app = crate::support::spawn_api_only(pool).await;
    let sched = app.scheduler(app.scheduler_opts()).await;
    let secret = switchyard_core::apikey::random_secret(48);
    let issuer = "https://acme.example/users";
    assert!(app
        .store
        .set_tenant_jwt("acme", Some((issuer, &secret)))
        .await
        .unwrap());
    let exp = Utc::now().timestamp() + 3600;
    let claims = json!({"iss": issuer, "sub": "alice", "aud": "switchyard", "exp": exp,
        "iat": Utc::now().timestamp(), "role": "developer"});
    let token = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let r = app
        .http
        .post(app.url("/v1/schedules"))
        .bearer_auth(&token)
        .json(&json!({"cron": "0 0 1 1 *", "job": {"kind": "system.noop", "input": {}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id: Uuid = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let ends: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT creator_expires_at FROM schedules WHERE id = $1")
            .bind(id)
            .fetch_one(app.store.pool())
            .await
            .unwrap();
    assert_eq!(ends.map(|t| t.timestamp()), Some(exp));
    // while the token is valid, runs fire
    make_due(&app, 60).await;
    assert_eq!(sched.pass().await.unwrap().scheduled, 1);
    // the token's time has passed
    sqlx::query("UPDATE schedules SET creator_expires_at = now() - interval '1 second'")
        .execute(app.store.pool())
        .await
        .unwrap();
    make_due(&app, 30).await;
    assert_eq!(sched.pass().await.unwrap().scheduled, 0);
    let run = newest_run(&app, id).await;
    assert_eq!(run["skipped"]["code"], "forbidden", "{run}");
    assert!(
        run["skipped"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{run}"
    );
    app.stop().await;
}
