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
