//! The audit trail: state-changing requests are recorded (who, action, target, outcome,
//! request id, source), never secrets; job state changes are chained in batches and retention
//! prunes them (the chain's integrity: `audit_chain.rs`).

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::support::{spawn_api_only, TestApp};

async fn audit_rows(app: &TestApp, at_least: usize) -> Vec<Value> {
    let t = std::time::Instant::now();
    loop {
        let page: Value = app.get_json("/v1/audit?limit=1000").await;
        let rows = page["data"].as_array().cloned().unwrap_or_default();
        if rows.len() >= at_least {
            return rows;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "audit rows: {page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn state_changing_requests_are_audited_without_secrets(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let job = app
        .submit(json!({"kind": "system.noop", "input": {}}))
        .await;
    let id = job["id"].as_str().unwrap();
    let r = app
        .auth(app.http.post(app.url(&format!("/v1/jobs/{id}/cancel"))))
        .header("x-request-id", "req-audit-1")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let created: Value = app
        .auth(app.http.post(app.url("/v1/api-keys")))
        .json(&json!({"name": "audited", "role": "viewer"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = created["secret"].as_str().unwrap().to_string();
    // a forbidden attempt is audited too (the caller is known)
    let r = app
        .http
        .post(app.url("/v1/jobs"))
        .bearer_auth(&secret)
        .json(&json!({"kind": "system.noop", "input": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // reads are not
    app.get_job(id.parse().unwrap()).await;

    let rows = audit_rows(&app, 4).await;
    let summary: Vec<(String, String, i64)> = rows
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_string(),
                r["target"].as_str().unwrap().to_string(),
                r["outcome"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(summary.len(), 4, "{summary:?}");
    assert_eq!(
        summary[0],
        ("POST /v1/jobs".into(), format!("/v1/jobs/{id}"), 202)
    );
    assert_eq!(
        summary[1],
        (
            "POST /v1/jobs/{id}/cancel".into(),
            format!("/v1/jobs/{id}/cancel"),
            200
        )
    );
    assert_eq!(summary[2].0, "POST /v1/api-keys");
    assert_eq!(
        summary[2].1,
        format!("/v1/api-keys/{}", created["id"].as_str().unwrap())
    );
    assert_eq!(
        (summary[3].0.as_str(), summary[3].2),
        ("POST /v1/jobs", 403)
    );
    assert_eq!(rows[1]["request_id"], "req-audit-1");
    assert_eq!(rows[0]["source"], "127.0.0.1");
    assert!(rows[0]["actor"].as_str().unwrap().starts_with("key:"));
    assert_ne!(rows[3]["actor"], rows[0]["actor"]);
    let all = serde_json::to_string(&rows).unwrap();
    assert!(!all.contains(&secret), "a secret reached the audit trail");
    let v = app.store.verify_audit(app.tenant).await.unwrap();
    assert_eq!((v.checked, v.first_broken), (4, None));
    // viewers do not read the audit trail
    let r = app
        .http
        .get(app.url("/v1/audit"))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // filters Postgres cannot compare (NUL; found by schemathesis) are refused, naming the field
    for (q, field) in [("actor=k%00x", "actor"), ("action=%00", "action")] {
        let r = app
            .auth(app.http.get(app.url(&format!("/v1/audit?{q}"))))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{q}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_parameter");
        assert_eq!(v["error"]["field"], field);
    }
    app.stop().await;
}

/// A client's own request id is kept only when it is one plain token; others (too long,
/// spaces, several) are replaced by an issued UUID, in the response and the audit trail.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_client_request_id_is_kept_only_when_plain(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let long = "x".repeat(300);
    let tries: [&[&str]; 4] = [&["trace-42:abc/7"], &[&long], &["two words"], &["a", "b"]];
    let mut echoed = Vec::new();
    for ids in tries {
        let mut rb = app
            .auth(app.http.post(app.url("/v1/jobs")))
            .json(&json!({"kind": "system.noop", "input": {}}));
        for id in ids {
            rb = rb.header("x-request-id", *id);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 202);
        let all: Vec<_> = r.headers().get_all("x-request-id").iter().collect();
        assert_eq!(all.len(), 1, "{all:?}");
        echoed.push(all[0].to_str().unwrap().to_string());
    }
    assert_eq!(echoed[0], "trace-42:abc/7");
    for issued in &echoed[1..] {
        assert!(uuid::Uuid::parse_str(issued).is_ok(), "{issued}");
    }
    let rows = audit_rows(&app, 4).await;
    let audited: Vec<&str> = rows
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(audited, echoed);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn job_state_changes_are_chained_and_retention_prunes_them(pool: PgPool) {
    crate::audit_chain::no_minimum_retention(&pool).await;
    let app = crate::support::spawn_app(pool).await;
    let id = app.submit_noop(json!({})).await;
    app.wait_status(id, "succeeded", Duration::from_secs(10))
        .await;
    // the scheduler moves the trigger's outbox rows into the chain
    let target = format!("job:{id}");
    let t = std::time::Instant::now();
    let mine = loop {
        let rows = audit_rows(&app, 1).await;
        let mine: Vec<Value> = rows
            .into_iter()
            .filter(|r| r["target"] == target.as_str())
            .collect();
        if mine.iter().any(|r| r["action"] == "job.succeeded") {
            break mine;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{mine:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let actions: Vec<&str> = mine.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["job.queued", "job.running", "job.succeeded"]);
    assert!(mine[0]["actor"].as_str().unwrap().starts_with("key:"));
    assert!(mine[1]["actor"].as_str().unwrap().starts_with("worker:"));
    assert_eq!(mine[2]["details"]["from"], "running");
    // no prompt or input is copied into the trail
    assert!(!mine.iter().any(|r| r["details"].get("input").is_some()));
    let v = app.store.verify_audit(app.tenant).await.unwrap();
    assert_eq!(v.first_broken, None);
    assert!(v.checked >= 3);

    // retention: a scheduler keeping nothing older than now prunes the trail and re-anchors
    let opts = switchyard_scheduler::SchedulerOptions {
        audit_retention: Some(Duration::ZERO),
        ..app.scheduler_opts()
    };
    let sched = app.scheduler(opts).await;
    let report = sched.pass().await.unwrap();
    assert!(report.audit_pruned >= 3, "{report:?}");
    let v = app.store.verify_audit(app.tenant).await.unwrap();
    assert_eq!((v.checked, v.first_broken), (0, None));
    // the chain goes on from its anchor
    let next = app.submit_noop(json!({})).await;
    app.wait_status(next, "succeeded", Duration::from_secs(10))
        .await;
    let t = std::time::Instant::now();
    loop {
        sched.pass().await.unwrap();
        let v = app.store.verify_audit(app.tenant).await.unwrap();
        assert_eq!(v.first_broken, None, "{v:?}");
        if v.checked >= 3 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

/// (batch rows, changes they hold) as the triggers left them.
async fn outbox(app: &TestApp) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), COALESCE(sum(n), 0) FROM job_audit_changes")
        .fetch_one(app.store.pool())
        .await
        .unwrap()
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_batch_statement_writes_one_outbox_row_per_tenant_and_each_job_is_chained(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let s = &app.store;
    let other = s.create_tenant("other").await.unwrap().id;
    // one INSERT statement with jobs of two tenants
    let mut jobs: Vec<_> = (0..6)
        .map(|_| crate::support::new_job(app.tenant))
        .collect();
    jobs.extend((0..4).map(|_| crate::support::new_job(other)));
    s.insert_jobs(&jobs).await.unwrap();
    assert_eq!(outbox(&app).await, (2, 10));
    // one claim statement: a row per tenant again
    let ids: Vec<_> = jobs.iter().map(|j| j.id).collect();
    let claimed = s
        .claim_many(&ids, "w-audit", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 10);
    assert_eq!(outbox(&app).await, (4, 20));
    // updates that change no status leave nothing: a heartbeat, a dispatch mark
    assert_eq!(
        s.heartbeat(ids[0], 1, Duration::from_secs(30))
            .await
            .unwrap(),
        Some(false)
    );
    s.mark_dispatched(&ids, 7).await.unwrap();
    assert_eq!(outbox(&app).await, (4, 20));
    // one run-end statement: the second job fails with an error code the details keep
    let ends = [
        switchyard_store::RunEnd::Succeeded(json!({"ok": true})),
        switchyard_store::RunEnd::Failed(switchyard_core::JobError::new("boom", "no", false)),
    ];
    let writes: Vec<_> = ids[..2]
        .iter()
        .zip(ends)
        .map(|(id, end)| switchyard_store::RunEndWrite {
            id: *id,
            attempt: 1,
            end,
            seq: 3,
            tokens: 0,
        })
        .collect();
    assert_eq!(s.end_runs(&writes).await.unwrap().len(), 2);
    assert_eq!(outbox(&app).await, (5, 22));
    // a batch in the JSON shape written before the arrays (its own table) still chains
    sqlx::query(
        "INSERT INTO job_audit_batches (tenant_id, n, entries) VALUES ($1, 1, jsonb_build_array(
             jsonb_build_object('actor', 'system', 'action', 'job.legacy_batch',
                                'target', 'job:legacy', 'details', '{\"attempt\": 2}'::jsonb)))",
    )
    .bind(other)
    .execute(s.pool())
    .await
    .unwrap();
    // a row in the format written before batches still chains
    sqlx::query(
        "INSERT INTO audit_outbox (tenant_id, actor, action, target, details)
         VALUES ($1, 'system', 'job.legacy', 'job:legacy', '{\"attempt\": 1}')",
    )
    .bind(app.tenant)
    .execute(s.pool())
    .await
    .unwrap();

    // while another scheduler chains, this one does nothing
    let mut other_chainer = s.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(switchyard_store::JOB_AUDIT_CHAIN_LOCK)
        .execute(&mut *other_chainer)
        .await
        .unwrap();
    assert_eq!(s.chain_job_audit(1000).await.unwrap().changes, 0);
    other_chainer.rollback().await.unwrap();
    // the single change left from before batches goes first, then the JSON batch
    let single = s.chain_job_audit(1).await.unwrap();
    assert_eq!((single.changes, single.more), (1, true));
    assert_eq!(s.chain_job_audit(1).await.unwrap().changes, 1);
    // a limit below a batch's size still takes that one batch whole; then batches are taken
    // whole while they fit (the batches of one statement come in no fixed tenant order)
    let first = s.chain_job_audit(1).await.unwrap();
    assert!(first.changes == 6 || first.changes == 4, "{first:?}");
    assert!(first.more, "{first:?}");
    let second = s.chain_job_audit(12).await.unwrap().changes;
    assert!((4..=12).contains(&second), "{second}");
    // the last page says nothing was left behind
    let rest = s.chain_job_audit(1000).await.unwrap();
    assert!(!rest.more, "{rest:?}");
    assert_eq!(2 + first.changes + second + rest.changes, 24);
    assert_eq!(outbox(&app).await, (0, 0));
    let json_left: i64 = sqlx::query_scalar("SELECT count(*) FROM job_audit_batches")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(json_left, 0);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_outbox")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);

    for (tenant, mine) in [(app.tenant, &jobs[..6]), (other, &jobs[6..])] {
        let rows = s
            .list_audit(
                tenant,
                &switchyard_store::AuditFilter {
                    limit: 1000,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        for j in mine {
            let target = format!("job:{}", j.id);
            let of_job: Vec<_> = rows.iter().filter(|r| r.target == target).collect();
            let actions: Vec<_> = of_job.iter().map(|r| r.action.as_str()).collect();
            let ended = if j.id == ids[0] {
                Some(("job.succeeded", json!({"from": "running", "attempt": 1})))
            } else if j.id == ids[1] {
                let details = json!({"from": "running", "attempt": 1, "error": "boom"});
                Some(("job.failed", details))
            } else {
                None
            };
            let mut expected = vec!["job.queued", "job.running"];
            expected.extend(ended.as_ref().map(|e| e.0));
            assert_eq!(actions, expected, "{target}");
            assert_eq!(of_job[0].actor, "key:test");
            assert_eq!(
                of_job[0].details,
                json!({"kind": "system.noop", "attempt": 0})
            );
            assert_eq!(of_job[1].actor, "worker:w-audit");
            assert_eq!(of_job[1].details, json!({"from": "queued", "attempt": 1}));
            if let Some((_, details)) = ended {
                assert_eq!(of_job[2].actor, "system");
                assert_eq!(of_job[2].details, details);
            }
        }
        let legacy = rows.iter().filter(|r| r.action == "job.legacy").count();
        assert_eq!(legacy, usize::from(tenant == app.tenant));
        let legacy = rows.iter().find(|r| r.action == "job.legacy_batch");
        assert_eq!(
            legacy.map(|r| (r.actor.as_str(), &r.details)),
            (tenant == other).then_some(("system", &json!({"attempt": 2}))),
        );
        let v = s.verify_audit(tenant).await.unwrap();
        assert_eq!((v.checked as usize, v.first_broken), (rows.len(), None));
    }
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_huge_statement_is_split_into_batches_of_at_most_1000_changes(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let s = &app.store;
    let jobs: Vec<_> = (0..2500)
        .map(|_| crate::support::new_job(app.tenant))
        .collect();
    s.insert_jobs(&jobs).await.unwrap();
    let sizes: Vec<i32> = sqlx::query_scalar("SELECT n FROM job_audit_changes ORDER BY n DESC")
        .fetch_all(s.pool())
        .await
        .unwrap();
    assert_eq!(sizes, [1000, 1000, 500]);
    // each page says whether it left batches behind, so a caller stops without an empty call
    let mut chained = Vec::new();
    loop {
        let c = s.chain_job_audit(1000).await.unwrap();
        chained.push(c.changes);
        assert_eq!(c.more, outbox(&app).await.0 > 0, "{c:?}");
        if !c.more {
            break;
        }
    }
    chained.sort();
    assert_eq!(chained, [500, 1000, 1000]);
    let v = s.verify_audit(app.tenant).await.unwrap();
    assert_eq!((v.checked, v.first_broken), (2500, None));
    app.stop().await;
}

/// Workers can produce state changes faster than one scheduler pass per interval chains them
/// (`max_batches` × `batch`): a pass that stops with changes left starts the next one at once,
/// so the trail catches up without waiting for the interval.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_scheduler_behind_on_the_audit_trail_chains_again_without_waiting(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    // twelve statements of five jobs: twelve outbox batches, one chained per pass
    for _ in 0..12 {
        let jobs: Vec<_> = (0..5)
            .map(|_| crate::support::new_job(app.tenant))
            .collect();
        app.store.insert_jobs(&jobs).await.unwrap();
    }
    assert_eq!(outbox(&app).await, (12, 60));
    let opts = switchyard_scheduler::SchedulerOptions {
        batch: 5,
        max_batches: 1,
        interval: Duration::from_secs(3600),
        ..app.scheduler_opts()
    };
    let sched = app.scheduler(opts).await;
    let first = sched.pass().await.unwrap();
    assert_eq!((first.audited, first.backlog), (5, true), "{first:?}");
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(sched.run(stop.clone()));
    let t = std::time::Instant::now();
    while outbox(&app).await != (0, 0) {
        // with an hour between passes, only the backlog rule can get here
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{:?}",
            outbox(&app).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = app.store.verify_audit(app.tenant).await.unwrap();
    assert_eq!(v.first_broken, None, "{v:?}");
    assert!(v.checked >= 60, "{v:?}");
    stop.cancel();
    task.await.unwrap();
    app.stop().await;
}
