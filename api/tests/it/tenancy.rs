//! Tenant isolation over every route of the OpenAPI document: tenant B's owner key against
//! tenant A's objects gets 404 and none of A's data; a key of tenant A without permissions
//! gets 403 on every non-public route; A's objects are untouched afterwards.

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use switchyard_core::authz::Role;

use crate::support::{documented_access, openapi_operations, spawn_api_only, spawn_app, TestApp};

/// A valid body for each POST route (so only authorization and tenancy decide).
pub fn body_for(path: &str) -> Option<Value> {
    Some(match path {
        "/v1/jobs" => json!({"kind": "system.noop", "input": {}}),
        "/v1/conversations" => json!({"model": "mock-echo"}),
        "/v1/conversations/{id}/messages" => json!({"content": "x"}),
        "/v1/chat/completions" => {
            json!({"model": "mock-echo", "messages": [{"role": "user", "content": "x"}]})
        }
        "/v1/api-keys" => json!({"name": "b"}),
        _ => return None,
    })
}

pub async fn send(
    app: &TestApp,
    key: &str,
    method: &str,
    path: &str,
    concrete: &str,
) -> (StatusCode, String) {
    let mut rb = app
        .http
        .request(method.parse().unwrap(), app.url(concrete))
        .bearer_auth(key);
    if method == "POST" {
        if let Some(b) = body_for(path) {
            rb = rb.json(&b);
        }
    }
    let r = rb.send().await.unwrap();
    let s = r.status();
    (s, r.text().await.unwrap_or_default())
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn tenant_b_sees_nothing_of_tenant_a_on_any_route(pool: PgPool) {
    // with a worker and the mock provider, so `/v1/chat/completions` completes
    let app = spawn_app(pool).await;
    // tenant A's objects
    let a = app.key.clone();
    let job = app
        .submit(json!({"kind": "system.noop", "input": {"sleep_ms": 60000}}))
        .await;
    let job_id = job["id"].as_str().unwrap().to_string();
    let conv: Value = app
        .auth(app.http.post(app.url("/v1/conversations")))
        .json(&json!({"model": "mock-echo"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conv_id = conv["id"].as_str().unwrap().to_string();
    let (key_rec, _) = app
        .store
        .create_scoped_api_key(app.tenant, "a-admin", Role::Admin, None, None)
        .await
        .unwrap();
    let key_id = key_rec.id.to_string();
    let a_ids = [
        job_id.clone(),
        conv_id.clone(),
        key_id.clone(),
        app.tenant.to_string(),
    ];
    // tenant B's owner
    let b_tenant = app.store.create_tenant("tenant-b").await.unwrap();
    let (_, b) = app
        .store
        .create_scoped_api_key(b_tenant.id, "b", Role::Owner, None, None)
        .await
        .unwrap();

    let mut walked = 0;
    for (method, path) in openapi_operations(&app).await {
        let concrete = if path.starts_with("/v1/jobs/{id}") {
            path.replace("{id}", &job_id)
        } else if path.starts_with("/v1/conversations/{id}") {
            path.replace("{id}", &conv_id)
        } else if path.starts_with("/v1/api-keys/{id}") {
            path.replace("{id}", &key_id)
        } else if path.contains('{') {
            // `/v1/models/{id}`: models are configuration, not tenant data
            continue;
        } else {
            path.clone()
        };
        if path == "/v1/ws" {
            continue; // a WebSocket upgrade; its subscriptions are checked in streaming tests
        }
        let (s, body) = send(&app, &b, &method, &path, &concrete).await;
        walked += 1;
        if path == "/v1/audit" {
            // B's own trail: it may record the ids B itself sent in its failed attempts, but
            // no row of A
            let page: Value = serde_json::from_str(&body).unwrap();
            for row in page["data"].as_array().unwrap() {
                assert_eq!(row["tenant_id"], b_tenant.id.to_string(), "{row}");
            }
            assert!(!body.contains(&app.tenant.to_string()));
        } else {
            for id in &a_ids {
                assert!(
                    !body.contains(id.as_str()),
                    "{method} {path} showed A's {id}: {body}"
                );
            }
        }
        if path.contains("{id}") {
            assert_eq!(s, StatusCode::NOT_FOUND, "{method} {concrete}: {body}");
            let e: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(e["error"]["code"], "not_found", "{method} {path}");
        } else {
            assert!(s.as_u16() < 500, "{method} {path}: {s} {body}");
        }
    }
    assert!(walked >= 15, "walked only {walked} operations");

    // A's objects are untouched
    let j = app.get_job(job_id.parse().unwrap()).await;
    assert!(j["status"] == "queued" || j["status"] == "running", "{j}");
    let (s, _) = send(
        &app,
        &a,
        "GET",
        "/v1/conversations/{id}",
        &format!("/v1/conversations/{conv_id}"),
    )
    .await;
    assert_eq!(s, 200);
    let k = app
        .store
        .get_tenant_api_key(app.tenant, key_rec.id)
        .await
        .unwrap()
        .unwrap();
    assert!(k.revoked_at.is_none());
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_key_without_permissions_gets_403_on_every_protected_route(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let job = app
        .submit(json!({"kind": "system.noop", "input": {}}))
        .await;
    let job_id = job["id"].as_str().unwrap().to_string();
    let (_, none) = app
        .store
        .create_scoped_api_key(app.tenant, "nothing", Role::Owner, Some(&[]), None)
        .await
        .unwrap();
    let mut checked = 0;
    for (method, path) in openapi_operations(&app).await {
        let access = documented_access(&method, &path).unwrap();
        if access == switchyard_api::authz::Access::Public {
            continue;
        }
        let concrete = path.replace("{id}", &job_id);
        let (s, body) = send(&app, &none, &method, &path, &concrete).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{method} {path}: {body}");
        checked += 1;
    }
    assert!(checked >= 15, "checked only {checked}");
    app.stop().await;
}
