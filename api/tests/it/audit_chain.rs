//! The audit trail's integrity: the hash chain detects edits and deletions, the services'
//! database role can append but not rewrite or shorten it, verification sees an intact chain
//! while rows are appended, and pruning re-anchors the chain.

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use switchyard_store::AuditEntry;

use crate::support::{spawn_api_only, TestApp};

pub(crate) fn entry(app: &TestApp, i: i32) -> AuditEntry {
    AuditEntry {
        tenant_id: app.tenant,
        at: chrono::Utc::now(),
        actor: "key:test".into(),
        action: "POST /v1/jobs".into(),
        target: format!("/v1/jobs/{i}"),
        outcome: 202,
        request_id: format!("r{i}"),
        source: "10.0.0.1".into(),
        details: json!({"n": i}),
    }
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn the_chain_detects_edits_and_deletions(pool: PgPool) {
    let app = spawn_api_only(pool.clone()).await;
    let s = &app.store;
    s.append_audit((1..=5).map(|i| entry(&app, i)).collect())
        .await
        .unwrap();
    s.append_audit((6..=8).map(|i| entry(&app, i)).collect())
        .await
        .unwrap();
    assert_eq!(s.verify_audit(app.tenant).await.unwrap().first_broken, None);
    // the table refuses changes
    let e = sqlx::query("UPDATE audit_events SET outcome = 200 WHERE seq = 3")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("append-only"), "{e}");
    assert!(sqlx::query("DELETE FROM audit_events WHERE seq = 3")
        .execute(&pool)
        .await
        .is_err());
    // someone with the power to bypass it edits a row...
    sqlx::query("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE audit_events SET outcome = 200 WHERE tenant_id = $1 AND seq = 3")
        .bind(app.tenant)
        .execute(&pool)
        .await
        .unwrap();
    let v = s.verify_audit(app.tenant).await.unwrap();
    assert_eq!(v.first_broken, Some(3), "{v:?}");
    assert_eq!(v.checked, 2);
    sqlx::query("UPDATE audit_events SET outcome = 202 WHERE tenant_id = $1 AND seq = 3")
        .bind(app.tenant)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(s.verify_audit(app.tenant).await.unwrap().first_broken, None);
    // ... or deletes one
    sqlx::query("DELETE FROM audit_events WHERE tenant_id = $1 AND seq = 6")
        .bind(app.tenant)
        .execute(&pool)
        .await
        .unwrap();
    let v = s.verify_audit(app.tenant).await.unwrap();
    assert_eq!(v.first_broken, Some(6), "{v:?}");
    // ... or the newest one (the head no longer matches)
    sqlx::query("DELETE FROM audit_events WHERE tenant_id = $1 AND seq >= 6")
        .bind(app.tenant)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        s.verify_audit(app.tenant).await.unwrap().first_broken,
        Some(6)
    );
    app.stop().await;
}

/// Lets pruning delete rows of any age (the owner's setting; 30 days by default).
pub(crate) async fn no_minimum_retention(pool: &PgPool) {
    sqlx::query("UPDATE audit_settings SET min_retention = '0'")
        .execute(pool)
        .await
        .unwrap();
}

/// The services' role may append to the trail but not rewrite it: no deleting rows (setting
/// the pruning flag itself no longer opens the trigger), no moving a head back or its anchor,
/// no new hash without a new row, no pruning of rows younger than the owner's minimum
/// retention; retention still prunes (as the owner, through a function).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn the_services_role_cannot_rewrite_the_trail(pool: PgPool) {
    let app = spawn_api_only(pool.clone()).await;
    let s = &app.store;
    s.append_audit((1..=5).map(|i| entry(&app, i)).collect())
        .await
        .unwrap();
    let mut c = pool.acquire().await.unwrap();
    sqlx::query("SET ROLE switchyard_app")
        .execute(&mut *c)
        .await
        .unwrap();
    sqlx::query("SET switchyard.audit_prune = 'on'")
        .execute(&mut *c)
        .await
        .unwrap();
    let tries = [
        "DELETE FROM audit_events WHERE tenant_id = $1 AND seq >= 4",
        "UPDATE audit_events SET outcome = 500 WHERE tenant_id = $1 AND seq = 4",
        "UPDATE audit_heads SET seq = 3 WHERE tenant_id = $1",
        "UPDATE audit_heads SET hash = '\\x00' WHERE tenant_id = $1",
        "UPDATE audit_heads SET anchor_seq = 5, anchor_hash = hash WHERE tenant_id = $1",
        "DELETE FROM audit_heads WHERE tenant_id = $1",
    ];
    for sql in tries {
        let r = sqlx::query(sql).bind(app.tenant).execute(&mut *c).await;
        assert!(r.is_err(), "the services' role could run: {sql}");
    }
    sqlx::query("RESET ROLE").execute(&mut *c).await.unwrap();
    drop(c);
    let v = s.verify_audit(app.tenant).await.unwrap();
    assert_eq!((v.checked, v.first_broken), (5, None), "{v:?}");
    // nor prune what is younger than the minimum retention (30 days, owner-only)
    let everything = chrono::Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(s.prune_audit(app.tenant, everything).await.unwrap(), 0);
    let mut c = pool.acquire().await.unwrap();
    sqlx::query("SET ROLE switchyard_app")
        .execute(&mut *c)
        .await
        .unwrap();
    assert!(sqlx::query("UPDATE audit_settings SET min_retention = '0'")
        .execute(&mut *c)
        .await
        .is_err());
    sqlx::query("RESET ROLE").execute(&mut *c).await.unwrap();
    drop(c);
    // retention, as the store runs it (the services' role), still prunes and re-anchors
    // what the owner lets it
    no_minimum_retention(&pool).await;
    assert_eq!(s.prune_audit(app.tenant, everything).await.unwrap(), 5);
    s.append_audit(vec![entry(&app, 6)]).await.unwrap();
    let v = s.verify_audit(app.tenant).await.unwrap();
    assert_eq!((v.checked, v.first_broken), (1, None), "{v:?}");
    app.stop().await;
}

/// Verification while rows are appended: the head and the rows come from one snapshot, so a
/// row appended between reading the head and reading the rows is no broken chain (it was
/// reported as "the chain ends at 8 but its head says 5").
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn verifying_while_rows_are_appended_sees_an_intact_chain(pool: PgPool) {
    let app = spawn_api_only(pool.clone()).await;
    let appender = {
        let (s, batches) = (
            app.store.clone(),
            (1..=150).map(|i| vec![entry(&app, i)]).collect::<Vec<_>>(),
        );
        tokio::spawn(async move {
            for b in batches {
                s.append_audit(b).await.unwrap();
            }
        })
    };
    let mut verified = 0;
    while !appender.is_finished() {
        let v = app.store.verify_audit(app.tenant).await.unwrap();
        assert_eq!(v.first_broken, None, "{v:?}");
        verified += 1;
    }
    appender.await.unwrap();
    let v = app.store.verify_audit(app.tenant).await.unwrap();
    assert_eq!((v.checked, v.first_broken), (150, None));
    assert!(verified > 1, "no verification ran while rows were appended");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn pruning_re_anchors_the_chain(pool: PgPool) {
    no_minimum_retention(&pool).await;
    let app = spawn_api_only(pool).await;
    let s = &app.store;
    s.append_audit((1..=5).map(|i| entry(&app, i)).collect())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cut = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.append_audit((6..=7).map(|i| entry(&app, i)).collect())
        .await
        .unwrap();
    assert_eq!(s.prune_audit(app.tenant, cut).await.unwrap(), 5);
    let v = s.verify_audit(app.tenant).await.unwrap();
    assert_eq!((v.checked, v.first_broken), (2, None));
    s.append_audit(vec![entry(&app, 8)]).await.unwrap();
    let v = s.verify_audit(app.tenant).await.unwrap();
    assert_eq!((v.checked, v.first_broken), (3, None));
    app.stop().await;
}

/// Pruning deletes only the oldest stretch of rows that are all older than the cutoff: a row
/// with an old time chained after newer ones (a job change chained late, or one the services'
/// role forged) does not take the newer rows along past the retention.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn pruning_stops_at_the_first_row_younger_than_the_cutoff(pool: PgPool) {
    no_minimum_retention(&pool).await;
    let app = spawn_api_only(pool).await;
    let s = &app.store;
    let old = |i| AuditEntry {
        at: chrono::Utc::now() - chrono::Duration::days(400),
        ..entry(&app, i)
    };
    // two old rows, two of today, then one with an old time chained after them
    s.append_audit(vec![old(1), old(2)]).await.unwrap();
    s.append_audit(vec![entry(&app, 3), entry(&app, 4)])
        .await
        .unwrap();
    s.append_audit(vec![old(5)]).await.unwrap();
    let cut = chrono::Utc::now() - chrono::Duration::days(30);
    assert_eq!(s.prune_audit(app.tenant, cut).await.unwrap(), 2);
    let v = s.verify_audit(app.tenant).await.unwrap();
    assert_eq!((v.checked, v.first_broken), (3, None), "today's rows stay");
    assert_eq!(s.prune_audit(app.tenant, cut).await.unwrap(), 0);
    app.stop().await;
}
