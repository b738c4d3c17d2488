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
    sqlx::query("DELETE FROM jobs WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
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
