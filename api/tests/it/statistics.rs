//! Planner statistics: the store keeps them fresh as `jobs` grows, so Postgres' cached plans
//! are re-planned for the table's size (see ARCHITECTURE.md, "Plans follow the table").

use std::time::Duration;

use sqlx::PgPool;
use switchyard_store::NewJob;

use crate::support::{new_job, spawn_api_only};

/// The store refreshes the statistics of `jobs` once enough of it changed, whatever autovacuum
/// does (as the services' role, through the owner's function), so plans cached while the table
/// was empty are re-planned as it grows.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn the_statistics_of_jobs_follow_its_growth(pool: PgPool) {
    let app = spawn_api_only(pool.clone()).await;
    assert!(!app.store.refresh_statistics(1000, 0.1).await.unwrap());
    let jobs: Vec<NewJob> = (0..3000).map(|_| new_job(app.tenant)).collect();
    for chunk in jobs.chunks(500) {
        app.store.insert_jobs(chunk).await.unwrap();
    }
    // the change counters reach the statistics views within a second or two
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut refreshed = false;
    loop {
        refreshed |= app.store.refresh_statistics(1000, 0.1).await.unwrap();
        let (tuples, auto): (f32, bool) = sqlx::query_as(
            "SELECT c.reltuples, s.last_autoanalyze IS NOT NULL FROM pg_class c
             JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE c.oid = 'jobs'::regclass",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if tuples >= 2000.0 && (refreshed || auto) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never analyzed: {tuples} rows"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // change counters still arriving may ask for one more; then, with nothing changing, none
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while app.store.refresh_statistics(1000, 0.1).await.unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "analyzed over and over"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!app.store.refresh_statistics(1000, 0.1).await.unwrap());
    app.stop().await;
}

/// The batched claim, end and dispatch-mark statements run on sessions that always use generic
/// plans (a custom plan per execution cost more than running them for a small batch) and no
/// nested loops (the run end's join was quadratic in the batch), as the
/// same role as the rest of the store; plans cached while `jobs` was empty keep claiming and
/// ending jobs once it has grown and its statistics were refreshed.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn batched_statements_run_generic_plans_as_the_services_role(pool: PgPool) {
    use switchyard_store::{RunEnd, RunEndWrite};
    let app = spawn_api_only(pool.clone()).await;
    let show = |p: &PgPool| {
        let p = p.clone();
        async move {
            sqlx::query_as::<_, (String, String, String)>(
                "SELECT current_setting('plan_cache_mode'), current_setting('enable_nestloop'),
                        current_user::text",
            )
            .fetch_one(&p)
            .await
            .unwrap()
        }
    };
    let (batch_mode, batch_nestloop, batch_role) = show(app.store.batch_pool()).await;
    let (main_mode, main_nestloop, main_role) = show(app.store.pool()).await;
    assert_eq!(batch_mode, "force_generic_plan");
    assert_eq!(batch_nestloop, "off");
    assert_eq!(main_mode, "auto", "only the batch sessions are forced");
    assert_eq!(main_nestloop, "on");
    assert_eq!(batch_role, main_role);
    assert_eq!(batch_role, switchyard_store::SERVICE_ROLE);
    // every service session is bounded server-side: a stalled statement is cancelled
    for p in [app.store.pool(), app.store.batch_pool()] {
        let (st, idle): (String, String) = sqlx::query_as(
            "SELECT current_setting('statement_timeout'),
                    current_setting('idle_in_transaction_session_timeout')",
        )
        .fetch_one(p)
        .await
        .unwrap();
        assert_eq!((st.as_str(), idle.as_str()), ("1min", "1min"));
    }

    // plans made on an empty table
    let lease = Duration::from_secs(30);
    for _ in 0..8 {
        let none = app
            .store
            .claim_many(&[uuid::Uuid::now_v7()], "w1", lease)
            .await
            .unwrap();
        assert!(none.is_empty());
        assert!(app.store.end_runs(&[]).await.unwrap().is_empty());
    }
    let jobs: Vec<NewJob> = (0..3000).map(|_| new_job(app.tenant)).collect();
    for chunk in jobs.chunks(500) {
        app.store.insert_jobs(chunk).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !app.store.refresh_statistics(1000, 0.1).await.unwrap() {
        assert!(std::time::Instant::now() < deadline, "never analyzed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ids: Vec<uuid::Uuid> = jobs[1000..1003].iter().map(|j| j.id).collect();
    let claimed = app.store.claim_many(&ids, "w1", lease).await.unwrap();
    assert_eq!(claimed.len(), 3);
    assert!(claimed
        .iter()
        .all(|r| r.attempt == 1 && r.lease_owner.as_deref() == Some("w1")));
    let ends: Vec<RunEndWrite> = claimed
        .iter()
        .map(|r| RunEndWrite {
            id: r.id,
            attempt: r.attempt,
            end: RunEnd::Succeeded(serde_json::json!({ "ok": true })),
            seq: 3,
            tokens: 0,
        })
        .collect();
    let mut done = app.store.end_runs(&ends).await.unwrap();
    done.sort();
    let mut want: Vec<(uuid::Uuid, i32)> = ends.iter().map(|e| (e.id, e.attempt)).collect();
    want.sort();
    assert_eq!(done, want);
    // a second end of the same runs is fenced out
    assert!(app.store.end_runs(&ends).await.unwrap().is_empty());

    // the dispatch marks find their rows by primary key on these sessions (a join with the id
    // list was planned as a scan of the whole table)
    let mut c = app.store.batch_pool().acquire().await.unwrap();
    let list = |ids: &[uuid::Uuid]| {
        format!(
            "'{{{}}}'",
            ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    let ids: Vec<uuid::Uuid> = jobs[2000..2200].iter().map(|j| j.id).collect();
    let zeros = format!("'{{{}}}'", vec!["0"; ids.len()].join(","));
    for (i, sql) in switchyard_store::Store::mark_statements()
        .iter()
        .enumerate()
    {
        sqlx::raw_sql(&format!("PREPARE mark{i}(uuid[], bigint, int4[]) AS {sql}"))
            .execute(&mut *c)
            .await
            .unwrap();
        let plan: Vec<String> = sqlx::query_scalar(&format!(
            "EXPLAIN EXECUTE mark{i}({}, 99, {zeros})",
            list(&ids)
        ))
        .fetch_all(&mut *c)
        .await
        .unwrap();
        let plan = plan.join("\n");
        assert!(!plan.contains("Seq Scan on jobs"), "{plan}");
        assert!(plan.contains("jobs_pkey"), "{plan}");
        sqlx::raw_sql(&format!("DEALLOCATE mark{i}"))
            .execute(&mut *c)
            .await
            .unwrap();
    }
    drop(c);
    app.stop().await;
}
