//! Row-level security: the services' role can neither bypass nor own its way around the
//! policies, and inside a tenant's transaction even queries without any tenant filter see and
//! change only that tenant's rows (defence in depth behind the store's own filters).

use serde_json::json;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::support::spawn_api_only;

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn the_service_role_is_bound_by_row_level_security(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let db = app.store.pool();
    // the app really connects as the service role, which cannot bypass RLS and owns nothing
    let (user, sup, bypass): (String, bool, bool) = sqlx::query_as(
        "SELECT current_user::text, r.rolsuper, r.rolbypassrls FROM pg_roles r
         WHERE r.rolname = current_user",
    )
    .fetch_one(db)
    .await
    .unwrap();
    assert_eq!(
        (user.as_str(), sup, bypass),
        (switchyard_store::SERVICE_ROLE, false, false)
    );
    let owned: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner
         WHERE r.rolname = $1",
    )
    .bind(switchyard_store::SERVICE_ROLE)
    .fetch_one(db)
    .await
    .unwrap();
    assert_eq!(owned, 0);
    let unprotected: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class
         WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'
           AND NOT relrowsecurity
           AND relname NOT IN ('system_state', '_sqlx_migrations', 'audit_settings')",
    )
    .fetch_all(db)
    .await
    .unwrap();
    assert!(
        unprotected.is_empty(),
        "tables without RLS: {unprotected:?}"
    );

    // two tenants with jobs, a conversation with a message, keys
    let a = app.tenant;
    let b = app.store.create_tenant("tenant-b").await.unwrap().id;
    for (t, n) in [(a, 2), (b, 3)] {
        let jobs: Vec<_> = (0..n).map(|_| crate::support::new_job(t)).collect();
        app.store.insert_jobs(&jobs).await.unwrap();
        app.store
            .create_scoped_api_key(t, "k", switchyard_core::authz::Role::Viewer, None, None)
            .await
            .unwrap();
    }
    let conv = app
        .store
        .create_conversation(
            b,
            "key:x",
            &switchyard_store::NewConversation {
                model: None,
                system: None,
                metadata: json!({}),
                context_strategy: "drop_oldest".into(),
            },
        )
        .await
        .unwrap();
    app.store
        .post_message(b, conv.id, "hello", "mock-echo", |_| {
            crate::support::new_job(b)
        })
        .await
        .unwrap()
        .unwrap();

    // inside A's transaction, statements without any tenant filter see only A
    let mut tx = db
        .begin_with(format!("BEGIN; SET LOCAL switchyard.tenant = '{a}'"))
        .await
        .unwrap();
    let count = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql);
    assert_eq!(
        count("SELECT count(*) FROM jobs")
            .fetch_one(&mut *tx)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        count("SELECT count(*) FROM tenants")
            .fetch_one(&mut *tx)
            .await
            .unwrap(),
        1
    );
    for table in ["conversations", "conversation_messages"] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, 0, "{table}");
    }
    let keys: Vec<Uuid> = sqlx::query_scalar("SELECT tenant_id FROM api_keys")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert!(!keys.is_empty() && keys.iter().all(|t| *t == a), "{keys:?}");
    // B's rows can be neither changed nor deleted, and no row can be written for B
    let changed = sqlx::query("UPDATE jobs SET metadata = '{\"x\": 1}' WHERE tenant_id = $1")
        .bind(b)
        .execute(&mut *tx)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(changed, 0);
    let deleted = sqlx::query("DELETE FROM conversations")
        .execute(&mut *tx)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(deleted, 0);
    let e = sqlx::query("UPDATE jobs SET tenant_id = $1")
        .bind(b)
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("row-level security"), "{e}");
    tx.rollback().await.unwrap();
    let mut tx = db
        .begin_with(format!("BEGIN; SET LOCAL switchyard.tenant = '{a}'"))
        .await
        .unwrap();
    let e = sqlx::query(
        "INSERT INTO jobs (id, tenant_id, created_by, kind, queue, status, input)
         VALUES ($1, $2, 'x', 'system.noop', 'system', 'queued', '{}')",
    )
    .bind(Uuid::now_v7())
    .bind(b)
    .execute(&mut *tx)
    .await
    .unwrap_err();
    assert!(e.to_string().contains("row-level security"), "{e}");
    tx.rollback().await.unwrap();

    // internal work (no tenant set) sees everything, as workers and the scheduler must
    let all: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(db)
        .await
        .unwrap();
    assert_eq!(all, 2 + 3 + 1);
    let row = sqlx::query("SELECT count(*) AS n FROM conversation_messages")
        .fetch_one(db)
        .await
        .unwrap();
    assert_eq!(row.get::<i64, _>("n"), 1);
    // and the store's scoped reads go through the same policies
    let visible = app
        .store
        .list_jobs(
            a,
            &switchyard_store::JobFilter {
                status: None,
                kind: None,
                before: None,
                limit: 100,
            },
        )
        .await
        .unwrap();
    assert_eq!(visible.len(), 2);
    app.stop().await;
}

/// The one-statement scoped read (`switchyard_job_scoped`, migration 22) sets the tenant only
/// for its own statement: the connection it ran on sees every tenant again right after.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_scoped_job_read_sets_the_tenant_for_its_statement_only(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let a = app.tenant;
    let b = app.store.create_tenant("tenant-b").await.unwrap().id;
    let (ja, jb) = (crate::support::new_job(a), crate::support::new_job(b));
    app.store
        .insert_jobs(&[ja.clone(), jb.clone()])
        .await
        .unwrap();
    let mut conn = app.store.pool().acquire().await.unwrap();
    let read = |tenant: Uuid, id: Uuid, creator: Option<&'static str>| {
        sqlx::query_scalar::<_, Uuid>("SELECT id FROM switchyard_job_scoped($1, $2, $3)")
            .bind(tenant)
            .bind(id)
            .bind(creator)
    };
    assert_eq!(
        read(a, ja.id, None).fetch_all(&mut *conn).await.unwrap(),
        [ja.id]
    );
    assert!(read(a, jb.id, None)
        .fetch_all(&mut *conn)
        .await
        .unwrap()
        .is_empty());
    // an end user sees only the jobs it created
    assert!(read(a, ja.id, Some("user:someone-else"))
        .fetch_all(&mut *conn)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        read(a, ja.id, Some("key:test"))
            .fetch_all(&mut *conn)
            .await
            .unwrap(),
        [ja.id]
    );
    // the setting did not outlive the statement: this connection sees both tenants again
    let setting: Option<String> =
        sqlx::query_scalar("SELECT NULLIF(current_setting('switchyard.tenant', true), '')")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(setting, None);
    let all: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(all, 2);
    // inside the function the policy is in force: a tenant set there hides other rows even
    // from a query without a tenant filter (checked through the same setting)
    let mut tx = app.store.pool().begin().await.unwrap();
    read(a, ja.id, None).fetch_all(&mut *tx).await.unwrap();
    let in_tx: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(
        in_tx, 1,
        "the function's setting is the tenant's, as for SET LOCAL"
    );
    tx.rollback().await.unwrap();
    // and through the store
    assert!(app.store.get_job(a, jb.id).await.unwrap().is_none());
    assert_eq!(
        app.store.get_job(b, jb.id).await.unwrap().unwrap().id,
        jb.id
    );
    app.stop().await;
}
