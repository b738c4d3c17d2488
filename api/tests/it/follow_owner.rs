//! A feed from the start is authorized by the owner the job's stream records (written when the
//! API dispatched it), without reading the job from Postgres; a resumption, or a job whose
//! stream records another owner, still reads it (and gets 404 when it is not the caller's).

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;

use crate::support::{spawn_api_only, ws_connect};

const T: Duration = Duration::from_secs(10);

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_follow_from_the_start_is_authorized_by_the_streams_owner(pool: PgPool) {
    let app = spawn_api_only(pool.clone()).await;
    let id = app.submit_noop(json!({})).await;
    let mut ws = app.ws().await;
    ws.subscribe(id, 0).await;
    assert_eq!(ws.next(T).await.unwrap()["seq"], 1);
    // the row is gone from Postgres (as the owner: the services' role may not delete jobs),
    // yet a follow from the start is served from the stream alone
    delete_row(&pool, id).await;
    let mut again = app.ws().await;
    again.subscribe(id, 0).await;
    let v = again.next(T).await.unwrap();
    assert_eq!(
        (v["seq"].as_u64(), v["type"].as_str()),
        (Some(1), Some("status")),
        "{v}"
    );
    // a resumption reads the job, which no longer exists
    again.subscribe(id, 1).await;
    let v = again.next(T).await.unwrap();
    assert_eq!(v["error"]["code"], "not_found", "{v}");
    // another tenant's key is refused whatever the stream holds
    let other = app.store.create_tenant("other").await.unwrap();
    let (_, key) = app.store.create_api_key(other.id, "k", None).await.unwrap();
    let mut theirs = ws_connect(&app.base, &key).await;
    theirs.subscribe(id, 0).await;
    let v = theirs.next(T).await.unwrap();
    assert_eq!(v["error"]["code"], "not_found", "{v}");
    app.stop().await;
}

/// The owner is written beside the job's INSERT, so a follow that arrives before the API's
/// dispatch wrote the stream is authorized without Postgres too; once a run has begun, a
/// missing stream means it expired or was lost (the job may have ended), and the row is read.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_follow_before_the_stream_exists_is_authorized_until_a_run_begins(pool: PgPool) {
    let app = spawn_api_only(pool.clone()).await;
    let id = app.submit_noop(json!({})).await;
    let keys = app.keys();
    let mut redis = app.redis().await;
    // as before the dispatch: the owner in the meta hash, no stream, no run
    let (tenant, creator): (Option<String>, Option<String>) = redis::pipe()
        .hget(keys.event_meta(id), "t")
        .hget(keys.event_meta(id), "c")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(tenant, Some(app.tenant.to_string()));
    assert!(creator.is_some());
    let () = redis::cmd("DEL")
        .arg(keys.events(id))
        .query_async(&mut redis)
        .await
        .unwrap();
    delete_row(&pool, id).await;
    let mut ws = app.ws().await;
    ws.subscribe(id, 0).await;
    // the feed waits for the stream: what is published next reaches it
    let bus = app.bus().await;
    let queued =
        switchyard_core::Event::status(id, 1, 0, switchyard_core::JobStatus::Queued, json!({}));
    assert_eq!(bus.publish_after(&queued, 0).await.unwrap(), Some(1));
    let v = ws.next(T).await.unwrap();
    assert_eq!(
        (v["seq"].as_u64(), v["type"].as_str()),
        (Some(1), Some("status")),
        "{v}"
    );
    // a run began and the stream is gone: the row is read (and is gone too)
    let () = redis::pipe()
        .hset(keys.event_meta(id), "attempt", 1)
        .ignore()
        .del(keys.events(id))
        .ignore()
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut again = app.ws().await;
    again.subscribe(id, 0).await;
    let v = again.next(T).await.unwrap();
    assert_eq!(v["error"]["code"], "not_found", "{v}");
    app.stop().await;
}

/// Deletes the job's row (as the owner: the services' role may not delete jobs).
async fn delete_row(pool: &PgPool, id: uuid::Uuid) {
    sqlx::query("DELETE FROM jobs WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
}
