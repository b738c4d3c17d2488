//! API keys with roles, scopes and expiry; the authorization table covers every route.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use switchyard_core::authz::{Permission, Role};

use crate::support::{documented_access, openapi_operations, spawn_api_only, TestApp};

async fn key(app: &TestApp, role: Role, scopes: Option<&[Permission]>) -> String {
    app.store
        .create_scoped_api_key(app.tenant, "t", role, scopes, None)
        .await
        .unwrap()
        .1
}

async fn call(
    app: &TestApp,
    key: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut rb = app
        .http
        .request(method.parse().unwrap(), app.url(path))
        .bearer_auth(key);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.unwrap();
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn every_route_is_in_the_authorization_table(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let mut n = 0;
    for (method, path) in openapi_operations(&app).await {
        assert!(
            documented_access(&method, &path).is_some(),
            "{method} {path} is not in authz::ROUTES"
        );
        n += 1;
    }
    assert!(n >= 20, "only {n} operations in the document");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn roles_and_scopes_decide_with_403(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let job = json!({"kind": "system.noop", "input": {}});
    let viewer = key(&app, Role::Viewer, None).await;
    assert_eq!(call(&app, &viewer, "GET", "/v1/jobs", None).await.0, 200);
    let (s, e) = call(&app, &viewer, "POST", "/v1/jobs", Some(job.clone())).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("jobs:write"),
        "{e}"
    );
    // OpenAI's error shape on the front door
    let (s, e) = call(
        &app,
        &viewer,
        "POST",
        "/v1/chat/completions",
        Some(json!({"model": "mock-echo", "messages": [{"role": "user", "content": "x"}]})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(e["error"]["type"], "permission_error", "{e}");

    let dev = key(&app, Role::Developer, None).await;
    assert_eq!(
        call(&app, &dev, "POST", "/v1/jobs", Some(job.clone()))
            .await
            .0,
        202
    );
    assert_eq!(call(&app, &dev, "GET", "/v1/api-keys", None).await.0, 403);

    let scoped = key(&app, Role::Owner, Some(&[Permission::JobsRead])).await;
    assert_eq!(call(&app, &scoped, "GET", "/v1/jobs", None).await.0, 200);
    assert_eq!(
        call(&app, &scoped, "POST", "/v1/jobs", Some(job)).await.0,
        403
    );
    assert_eq!(call(&app, &scoped, "GET", "/v1/usage", None).await.0, 403);
    // public routes need nothing
    assert_eq!(
        app.http
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn admins_manage_keys_within_their_role_and_tenant(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let admin = key(&app, Role::Admin, None).await;
    // create: the secret once, a developer by default
    let (s, created) = call(
        &app,
        &admin,
        "POST",
        "/v1/api-keys",
        Some(json!({"name": "ci", "scopes": ["jobs:read", "jobs:write"]})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(created["role"], "developer");
    let secret = created["secret"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(secret.starts_with(created["prefix"].as_str().unwrap()));
    assert_eq!(call(&app, &secret, "GET", "/v1/jobs", None).await.0, 200);
    // listed without secrets; last use recorded (batched, within seconds)
    let t = std::time::Instant::now();
    loop {
        let (s, list) = call(&app, &admin, "GET", "/v1/api-keys", None).await;
        assert_eq!(s, 200);
        assert!(!list.to_string().contains(&secret));
        let k = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id.as_str())
            .unwrap()
            .clone();
        if !k["last_used_at"].is_null() {
            assert_eq!(k["scopes"], json!(["jobs:read", "jobs:write"]));
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "last_used_at never set: {k}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // no escalation: an admin cannot mint an owner, nor grant what it lacks
    let (s, e) = call(
        &app,
        &admin,
        "POST",
        "/v1/api-keys",
        Some(json!({"role": "owner"})),
    )
    .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    let (s, e) = call(
        &app,
        &admin,
        "POST",
        "/v1/api-keys",
        Some(json!({"scopes": ["jobs:fly"]})),
    )
    .await;
    assert_eq!(
        (s.as_u16(), e["error"]["field"].as_str()),
        (422, Some("scopes[0]"))
    );
    let (s, e) = call(
        &app,
        &admin,
        "POST",
        "/v1/api-keys",
        Some(json!({"rol": "viewer"})),
    )
    .await;
    assert_eq!(
        (s.as_u16(), e["error"]["code"].as_str()),
        (422, Some("unknown_field"))
    );
    // revoke: refused at once on this replica
    let (s, k) = call(&app, &admin, "DELETE", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(s, 200);
    assert!(!k["revoked_at"].is_null());
    assert_eq!(call(&app, &secret, "GET", "/v1/jobs", None).await.0, 401);
    // another tenant's admin sees none of it
    let other = app.store.create_tenant("other").await.unwrap();
    let (_, other_admin) = app
        .store
        .create_scoped_api_key(other.id, "x", Role::Admin, None, None)
        .await
        .unwrap();
    assert_eq!(
        call(
            &app,
            &other_admin,
            "GET",
            &format!("/v1/api-keys/{id}"),
            None
        )
        .await
        .0,
        404
    );
    assert_eq!(
        call(
            &app,
            &other_admin,
            "DELETE",
            &format!("/v1/api-keys/{id}"),
            None
        )
        .await
        .0,
        404
    );
    let (_, list) = call(&app, &other_admin, "GET", "/v1/api-keys", None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn expired_keys_stop_working(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let admin = key(&app, Role::Admin, None).await;
    let (s, created) = call(
        &app,
        &admin,
        "POST",
        "/v1/api-keys",
        Some(json!({"role": "viewer", "expires_in_s": 1})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let secret = created["secret"].as_str().unwrap().to_string();
    assert_eq!(call(&app, &secret, "GET", "/v1/jobs", None).await.0, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(call(&app, &secret, "GET", "/v1/jobs", None).await.0, 401);
    let (s, e) = call(
        &app,
        &admin,
        "POST",
        "/v1/api-keys",
        Some(json!({"expires_in_s": 0})),
    )
    .await;
    assert_eq!(
        (s.as_u16(), e["error"]["field"].as_str()),
        (422, Some("expires_in_s"))
    );
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn failed_authentication_is_rate_limited_per_source(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let bad = "sy_aaaaaaaa_0123456789abcdefghij0123456789ABCDEFGHIJ";
    // the default quota: 30 failures a minute per address
    for i in 0..30 {
        let (s, _) = call(&app, bad, "GET", "/v1/jobs", None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    let r = app
        .http
        .get(app.url("/v1/jobs"))
        .bearer_auth(bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "rate_limited");
    // while blocked, a valid key from the same address is refused too (no oracle)
    assert_eq!(call(&app, &app.key, "GET", "/v1/jobs", None).await.0, 429);
    app.stop().await;
}

/// A key never gets, nor keeps past its maker, what the key that made it lacks: a key scoped
/// to `keys:manage` that asks for no scopes gets that scope only (it made an unscoped admin
/// key before), a key made by an expiring key expires with it, and a scoped key cannot revoke
/// a key holding permissions it lacks.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_key_never_outgrows_the_key_that_made_it(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let rotator = key(&app, Role::Admin, Some(&[Permission::KeysManage])).await;
    let (s, made) = call(
        &app,
        &rotator,
        "POST",
        "/v1/api-keys",
        Some(json!({"role": "admin"})),
    )
    .await;
    assert_eq!(s, 201, "{made}");
    assert_eq!(made["scopes"], json!(["keys:manage"]), "{made}");
    let secret = made["secret"].as_str().unwrap();
    assert_eq!(call(&app, secret, "GET", "/v1/audit", None).await.0, 403);
    // a key made by an expiring key expires no later
    let (_, hourly) = app
        .store
        .create_scoped_api_key(
            app.tenant,
            "hourly",
            Role::Admin,
            None,
            Some(chrono::Utc::now() + chrono::Duration::hours(1)),
        )
        .await
        .unwrap();
    let (s, made) = call(
        &app,
        &hourly,
        "POST",
        "/v1/api-keys",
        Some(json!({"name": "forever"})),
    )
    .await;
    assert_eq!(s, 201, "{made}");
    let until: chrono::DateTime<chrono::Utc> = made["expires_at"]
        .as_str()
        .expect("an expiry")
        .parse()
        .unwrap();
    assert!(
        until <= chrono::Utc::now() + chrono::Duration::hours(1),
        "{made}"
    );
    // revoking: not a key with permissions the caller lacks
    let (_, full) = call(
        &app,
        &hourly,
        "POST",
        "/v1/api-keys",
        Some(json!({"role": "admin"})),
    )
    .await;
    let id = full["id"].as_str().unwrap();
    let (s, e) = call(
        &app,
        &rotator,
        "DELETE",
        &format!("/v1/api-keys/{id}"),
        None,
    )
    .await;
    assert_eq!(s, 403, "{e}");
    // a role of which the caller holds nothing: refused, not a key that can do nothing
    let (s, e) = call(
        &app,
        &rotator,
        "POST",
        "/v1/api-keys",
        Some(json!({"role": "viewer"})),
    )
    .await;
    assert_eq!(s, 403, "{e}");
    app.stop().await;
}

/// Behind a trusted proxy, failed authentication counts against the client its
/// `X-Forwarded-For` names, not the proxy: one client guessing keys no longer locks every
/// tenant behind the proxy out (a client that claims to be forwarded without coming from a
/// trusted proxy is counted by its own address: `switchyard_core::proxy`'s unit tests).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn behind_a_trusted_proxy_each_client_has_its_own_failures(pool: PgPool) {
    let opts = crate::support::Opts {
        worker: false,
        scheduler: false,
        configure: Some(std::sync::Arc::new(|cfg| {
            cfg.trusted_proxies = vec!["127.0.0.0/8".into()];
        })),
        ..Default::default()
    };
    let app = crate::support::spawn_app_with(pool, opts).await;
    let bad = "sy_aaaaaaaa_0123456789abcdefghij0123456789ABCDEFGHIJ";
    let get = |key: &str, client: &str| {
        app.http
            .get(app.url("/v1/jobs"))
            .bearer_auth(key)
            .header("x-forwarded-for", client)
            .send()
    };
    for i in 0..31 {
        let s = get(bad, "198.51.100.1").await.unwrap().status();
        assert!(s == 401 || (i == 30 && s == 429), "attempt {i}: {s}");
    }
    assert_eq!(get(&app.key, "198.51.100.1").await.unwrap().status(), 429);
    // another client through the same proxy is not affected
    assert_eq!(get(&app.key, "198.51.100.2").await.unwrap().status(), 200);
    // a forged first header line does not hide the line the proxy added after it
    let r = app
        .http
        .get(app.url("/v1/jobs"))
        .bearer_auth(&app.key)
        .header("x-forwarded-for", "9.9.9.9")
        .header("x-forwarded-for", "198.51.100.1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    app.stop().await;
}

/// A key revoked on one API replica is refused by the others at once: the revocation is
/// announced over Redis and every replica drops its cached lookups (here they would
/// otherwise keep it for an hour, `auth_cache_ttl_s`).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_key_revoked_on_one_replica_is_refused_by_the_others(pool: PgPool) {
    let app = crate::support::spawn_app_with(
        pool,
        crate::support::Opts {
            worker: false,
            scheduler: false,
            configure: Some(std::sync::Arc::new(|cfg| cfg.auth_cache_ttl_s = 3600)),
            ..Default::default()
        },
    )
    .await;
    let other = app.spawn_api_replica().await;
    let (key_id, secret) = app.developer_key("t").await;
    let on_other = || {
        app.http
            .get(format!("{other}/v1/jobs"))
            .bearer_auth(&secret)
            .send()
    };
    // the other replica has it cached
    assert_eq!(on_other().await.unwrap().status(), 200);
    app.revoke_key(key_id).await;
    let t = std::time::Instant::now();
    loop {
        let s = on_other().await.unwrap().status();
        if s == 401 {
            break;
        }
        assert_eq!(s, 200);
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the other replica still accepts the revoked key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}
