//! The platform operator manages tenants; tenants' keys cannot.

use serde_json::{json, Value};
use sqlx::PgPool;
use switchyard_store::AuditFilter;

use crate::support::{spawn_api_only, OPERATOR_TOKEN};

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn the_operator_creates_tenants_and_tenant_keys_cannot(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let post = |token: Option<&str>, body: Value| {
        let mut rb = app.http.post(app.url("/v1/tenants")).json(&body);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        rb.send()
    };
    let r = post(Some(OPERATOR_TOKEN), json!({"name": "globex"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let t: Value = r.json().await.unwrap();
    let owner = t["owner_key"].as_str().unwrap().to_string();
    // the new tenant's owner key works, and is an owner
    let r = app
        .http
        .get(app.url("/v1/api-keys"))
        .bearer_auth(&owner)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // listed beside the test tenant
    let list: Value = app
        .http
        .get(app.url("/v1/tenants"))
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"globex") && names.contains(&"acme"),
        "{names:?}"
    );
    // taken and invalid names
    let r = post(Some(OPERATOR_TOKEN), json!({"name": "globex"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        (e["error"]["code"].as_str(), e["error"]["field"].as_str()),
        (Some("conflict"), Some("name"))
    );
    let r = post(Some(OPERATOR_TOKEN), json!({"name": "Bad Name"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    // tenants' keys (even owners) are refused; wrong or missing tokens are 401
    assert_eq!(
        post(Some(&owner), json!({"name": "x"}))
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        post(Some(&app.key), json!({"name": "x"}))
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        post(
            Some("operator-token-for-tests-wrong-wrong-wrong"),
            json!({"name": "x"})
        )
        .await
        .unwrap()
        .status(),
        401
    );
    assert_eq!(
        post(None, json!({"name": "x"})).await.unwrap().status(),
        401
    );
    // the creation opens the new tenant's audit trail
    let tenant_id = t["id"].as_str().unwrap().parse().unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let rows = app
            .store
            .list_audit(
                tenant_id,
                &AuditFilter {
                    limit: 10,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        if let Some(r) = rows.first() {
            assert_eq!(
                (r.actor.as_str(), r.action.as_str()),
                ("operator", "POST /v1/tenants")
            );
            break;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    app.stop().await;
}
