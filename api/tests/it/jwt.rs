//! End users' JWTs: HS256 per tenant, RS256/ES256 from JWKS (file and URL, with rotation),
//! the attacks a verifier must refuse (`alg: none`, algorithm confusion, forged, expired, early,
//! foreign audience or issuer), and end users seeing only what they created.

use std::sync::{Arc, Mutex};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use switchyard_core::jwt_config::JwtIssuer;

use crate::support::{openapi_operations, spawn_app_with, ws_connect, Opts, TestApp};
use crate::tenancy::send;

const HS_ISSUER: &str = "https://acme.example/auth";
const PLATFORM_ISSUER: &str = "https://idp.example";
const FILE_ISSUER: &str = "https://acme-sso.example";

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/it/fixtures/jwt/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Standard claims for `sub` from `iss`, valid for an hour.
pub(crate) fn claims(iss: &str, sub: &str) -> Value {
    json!({"iss": iss, "sub": sub, "aud": "switchyard", "exp": now() + 3600, "iat": now()})
}

pub(crate) fn hs256(secret: &str, claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn signed(alg: Algorithm, kid: &str, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.to_string());
    let pem = fixture(&format!("{kid}.pem"));
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
        _ => EncodingKey::from_ec_pem(&pem).unwrap(),
    };
    encode(&h, claims, &key).unwrap()
}

fn b64(v: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

/// A JWKS server whose document the test can swap (key rotation).
async fn jwks_server(doc: Arc<Mutex<Vec<u8>>>) -> String {
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let doc = doc.clone();
            async move { doc.lock().unwrap().clone() }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    format!("http://{addr}/jwks.json")
}

async fn spawn(pool: PgPool, jwks_url: Option<String>) -> (TestApp, String) {
    let opts = Opts {
        scheduler: false,
        configure: Some(Arc::new(move |cfg| {
            cfg.jwt.jwks_min_refresh_s = 0;
            cfg.jwt.issuers.push(JwtIssuer {
                issuer: FILE_ISSUER.into(),
                jwks_file: Some(
                    format!(
                        "{}/tests/it/fixtures/jwt/jwks1.json",
                        env!("CARGO_MANIFEST_DIR")
                    )
                    .into(),
                ),
                jwks_url: None,
                tenant: Some("acme".into()),
                audience: None,
            });
            if let Some(url) = &jwks_url {
                cfg.jwt.issuers.push(JwtIssuer {
                    issuer: PLATFORM_ISSUER.into(),
                    jwks_file: None,
                    jwks_url: Some(url.clone()),
                    tenant: None,
                    audience: Some("platform".into()),
                });
            }
        })),
        ..Opts::default()
    };
    let app = spawn_app_with(pool, opts).await;
    let secret = switchyard_core::apikey::random_secret(48);
    assert!(app
        .store
        .set_tenant_jwt("acme", Some((HS_ISSUER, &secret)))
        .await
        .unwrap());
    (app, secret)
}

/// The tenant of the job a submission created.
async fn tenant_of(app: &TestApp, r: reqwest::Response) -> uuid::Uuid {
    let job: Value = r.json().await.unwrap();
    let id = job["id"].as_str().unwrap().parse().unwrap();
    app.store
        .get_job_unscoped(id)
        .await
        .unwrap()
        .unwrap()
        .tenant_id
}

pub(crate) async fn status_of(app: &TestApp, token: &str) -> (StatusCode, Value) {
    let r = app
        .http
        .get(app.url("/v1/jobs"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn assert_refused(app: &TestApp, token: &str, why: &str) {
    let (s, body) = status_of(app, token).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{why}: {body}");
    assert_eq!(body["error"]["code"], "unauthorized", "{why}");
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn end_users_see_only_what_they_created(pool: PgPool) {
    let (app, secret) = spawn(pool, None).await;
    let token = |sub: &str, role: Option<&str>| {
        let mut c = claims(HS_ISSUER, sub);
        if let Some(r) = role {
            c["role"] = json!(r);
        }
        hs256(&secret, &c)
    };
    let (alice, bob) = (token("alice", None), token("bob", None));
    let carol = token("carol", Some("admin"));
    let viewer = token("victor", Some("viewer"));

    // alice (developer by default) submits a job and opens a conversation
    let submit = |who: &str, key: &str| {
        app.http
            .post(app.url("/v1/jobs"))
            .bearer_auth(who)
            .header("idempotency-key", key)
            .json(&json!({"kind": "system.noop", "input": {"sleep_ms": 60000}}))
            .send()
    };
    let r = submit(&alice, "order-1").await.unwrap();
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    let job_id = job["id"].as_str().unwrap().to_string();
    // bob's Idempotency-Keys are his own: the same key makes his own job, then replays it
    let mut bobs = Vec::new();
    for _ in 0..2 {
        let r = submit(&bob, "order-1").await.unwrap();
        assert_eq!(r.status(), 202);
        let body = r.text().await.unwrap();
        assert!(!body.contains(&job_id), "{body}");
        bobs.push(serde_json::from_str::<Value>(&body).unwrap()["id"].clone());
    }
    assert_eq!(bobs[0], bobs[1]);
    assert_eq!(job["created_by"], "user:alice");
    let conv: Value = app
        .http
        .post(app.url("/v1/conversations"))
        .bearer_auth(&alice)
        .json(&json!({"model": "mock-echo"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conv_id = conv["id"].as_str().unwrap().to_string();

    // bob, of the same tenant, walks every route against alice's objects: 404, none of her data
    let mut walked = 0;
    for (method, path) in openapi_operations(&app).await {
        let concrete = if path.starts_with("/v1/jobs/{id}") {
            path.replace("{id}", &job_id)
        } else if path.starts_with("/v1/conversations/{id}") {
            path.replace("{id}", &conv_id)
        } else {
            continue;
        };
        let (s, body) = send(&app, &bob, &method, &path, &concrete).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{method} {path}: {body}");
        assert!(!body.contains(&job_id) && !body.contains(&conv_id));
        walked += 1;
    }
    assert!(walked >= 6, "walked {walked}");
    // ... and over a WebSocket subscription
    let mut ws = ws_connect(&app.base, &bob).await;
    ws.subscribe(job_id.parse().unwrap(), 0).await;
    let frame = ws.next(std::time::Duration::from_secs(5)).await.unwrap();
    assert_eq!(frame["error"]["code"], "not_found", "{frame}");
    for list in ["/v1/jobs", "/v1/conversations"] {
        let (s, body) = send(&app, &bob, "GET", list, list).await;
        assert_eq!(s, 200);
        assert!(
            !body.contains(&job_id) && !body.contains(&conv_id),
            "{body}"
        );
        // alice sees hers
        let (s, body) = send(&app, &alice, "GET", list, list).await;
        assert_eq!(s, 200);
        assert!(body.contains(&job_id) || body.contains(&conv_id), "{body}");
    }
    // her objects are untouched, and an admin token and the tenant's key see them
    for who in [&alice, &carol, &app.key] {
        let p = format!("/v1/jobs/{job_id}");
        let (s, body) = send(&app, who, "GET", "/v1/jobs/{id}", &p).await;
        assert_eq!(s, 200, "{body}");
        assert!(
            body.contains("\"queued\"") || body.contains("\"running\""),
            "{body}"
        );
        let p = format!("/v1/conversations/{conv_id}");
        let (s, _) = send(&app, who, "GET", "/v1/conversations/{id}", &p).await;
        assert_eq!(s, 200);
    }
    // roles from the token hold: a viewer may read but not submit
    let (s, body) = send(&app, &viewer, "POST", "/v1/jobs", "/v1/jobs").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    // scopes narrow a token further
    let mut c = claims(HS_ISSUER, "dave");
    c["scope"] = json!("jobs:read");
    let dave = hs256(&secret, &c);
    assert_eq!(status_of(&app, &dave).await.0, 200);
    let (s, _) = send(&app, &dave, "POST", "/v1/jobs", "/v1/jobs").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // usage, too, is an end user's own: alice's chat counts for her and the tenant, not bob
    sqlx::query(
        "INSERT INTO jobs (id, tenant_id, created_by, kind, queue, status, attempt, max_attempts,
                           input, output, created_at, started_at, finished_at)
         VALUES ($1, $2, 'user:alice', 'llm.chat', 'llm', 'succeeded', 1, 3, '{\"model\": \"m\"}',
                 '{\"model\": \"m\", \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 4}}',
                 now(), now(), now())",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(app.tenant)
    .execute(app.store.pool())
    .await
    .unwrap();
    for (who, n) in [(&alice, 1), (&bob, 0), (&app.key, 1)] {
        let (s, body) = send(&app, who, "GET", "/v1/usage", "/v1/usage").await;
        assert_eq!(s, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["total"]["requests"], n, "{body}");
    }
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn forged_and_confused_tokens_are_refused(pool: PgPool) {
    let (app, secret) = spawn(pool, None).await;
    let good = hs256(&secret, &claims(HS_ISSUER, "alice"));
    assert_eq!(status_of(&app, &good).await.0, 200);

    // alg none, with and without a signature
    let payload = b64(claims(HS_ISSUER, "alice").to_string().as_bytes());
    for alg in ["none", "None", "NONE"] {
        let head = b64(json!({"alg": alg, "typ": "JWT"}).to_string().as_bytes());
        assert_refused(&app, &format!("{head}.{payload}."), alg).await;
        let sig = good.rsplit('.').next().unwrap();
        assert_refused(&app, &format!("{head}.{payload}.{sig}"), alg).await;
    }
    // algorithms outside HS256/RS256/ES256, though the secret is right
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        let t = encode(
            &Header::new(alg),
            &claims(HS_ISSUER, "alice"),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        assert_refused(&app, &t, "HS384/512").await;
    }
    // wrong secret; a payload changed after signing
    assert_refused(
        &app,
        &hs256("not-the-secret", &claims(HS_ISSUER, "alice")),
        "wrong secret",
    )
    .await;
    let mut parts: Vec<String> = good.split('.').map(String::from).collect();
    parts[1] = b64(claims(HS_ISSUER, "mallory").to_string().as_bytes());
    assert_refused(&app, &parts.join("."), "tampered payload").await;
    // time: expired beyond the leeway, not yet valid; within the leeway is fine
    let mut c = claims(HS_ISSUER, "alice");
    c["exp"] = json!(now() - 120);
    assert_refused(&app, &hs256(&secret, &c), "expired").await;
    c["exp"] = json!(now() - 5);
    assert_eq!(status_of(&app, &hs256(&secret, &c)).await.0, 200);
    let mut c = claims(HS_ISSUER, "alice");
    c["nbf"] = json!(now() + 600);
    assert_refused(&app, &hs256(&secret, &c), "nbf in the future").await;
    // audience, issuer, subject, role
    let mut c = claims(HS_ISSUER, "alice");
    c["aud"] = json!("someone-else");
    assert_refused(&app, &hs256(&secret, &c), "foreign audience").await;
    assert_refused(
        &app,
        &hs256(&secret, &claims("https://evil.example", "alice")),
        "unknown issuer",
    )
    .await;
    for missing in ["exp", "sub", "aud", "iss"] {
        let mut c = claims(HS_ISSUER, "alice");
        c.as_object_mut().unwrap().remove(missing);
        assert_refused(&app, &hs256(&secret, &c), missing).await;
    }
    let mut c = claims(HS_ISSUER, "alice");
    c["role"] = json!("superuser");
    assert_refused(&app, &hs256(&secret, &c), "unknown role").await;
    // algorithm confusion: the JWKS issuer's RSA public key used as an HMAC secret
    for pubkey in ["rsa1.pub.pem", "ec1.pub.pem"] {
        let t = encode(
            &Header::new(Algorithm::HS256),
            &claims(FILE_ISSUER, "alice"),
            &EncodingKey::from_secret(&fixture(pubkey)),
        )
        .unwrap();
        assert_refused(&app, &t, "HS256 signed with a public key").await;
    }
    // ... and the reverse: an RS256 token naming the tenant's HS256 issuer
    let t = signed(Algorithm::RS256, "rsa1", &claims(HS_ISSUER, "alice"));
    assert_refused(&app, &t, "RS256 for an HS256 issuer").await;
    // garbage
    for t in ["", "a.b.c", "eyJhbGciOiJIUzI1NiJ9", "not a token at all"] {
        let (s, _) = status_of(&app, t).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{t:?}");
    }
    // a disabled issuer stops working at once for new tokens (cached ones within seconds)
    app.store.set_tenant_jwt("acme", None).await.unwrap();
    let fresh = hs256(&secret, &claims(HS_ISSUER, "zoe"));
    assert_refused(&app, &fresh, "issuer removed").await;
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn jwks_issuers_verify_rs256_and_es256_and_follow_rotation(pool: PgPool) {
    let doc = Arc::new(Mutex::new(fixture("jwks1.json")));
    let url = jwks_server(doc.clone()).await;
    let (app, _) = spawn(pool, Some(url)).await;
    let b = app.store.create_tenant("tenant-b").await.unwrap();

    // a tenant-bound issuer (JWKS file): its tokens belong to acme whatever they claim
    let mut c = claims(FILE_ISSUER, "erin");
    c["tenant"] = json!(b.id.to_string());
    for (alg, kid) in [(Algorithm::RS256, "rsa1"), (Algorithm::ES256, "ec1")] {
        let t = signed(alg, kid, &c);
        let r = app
            .http
            .post(app.url("/v1/jobs"))
            .bearer_auth(&t)
            .json(&json!({"kind": "system.noop", "input": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{alg:?}");
        assert_eq!(tenant_of(&app, r).await, app.tenant);
    }
    // a key's algorithm is fixed: an ES256 header with the RSA key's kid fails
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("rsa1".into());
    let t = encode(
        &h,
        &c,
        &EncodingKey::from_ec_pem(&fixture("ec1.pem")).unwrap(),
    )
    .unwrap();
    assert_refused(&app, &t, "ES256 under an RSA kid").await;

    // a platform-wide issuer (JWKS URL): the `tenant` claim picks the tenant; its own audience
    let mut c = claims(PLATFORM_ISSUER, "frank");
    c["aud"] = json!("platform");
    c["tenant"] = json!("tenant-b");
    let t = signed(Algorithm::RS256, "rsa1", &c);
    let r = app
        .http
        .post(app.url("/v1/jobs"))
        .bearer_auth(&t)
        .json(&json!({"kind": "system.noop", "input": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(tenant_of(&app, r).await, b.id);
    let mut no_tenant = c.clone();
    no_tenant.as_object_mut().unwrap().remove("tenant");
    assert_refused(
        &app,
        &signed(Algorithm::RS256, "rsa1", &no_tenant),
        "no tenant claim",
    )
    .await;
    let mut ghost = c.clone();
    ghost["tenant"] = json!("no-such-tenant");
    assert_refused(
        &app,
        &signed(Algorithm::RS256, "rsa1", &ghost),
        "unknown tenant",
    )
    .await;
    // a key not (yet) published
    c["sub"] = json!("gina");
    assert_refused(
        &app,
        &signed(Algorithm::RS256, "rsa2", &c),
        "unpublished kid",
    )
    .await;

    // rotation: the IdP publishes rsa2 and drops rsa1; an unknown kid makes us re-read
    *doc.lock().unwrap() = fixture("jwks2.json");
    c["sub"] = json!("hank");
    let t = signed(Algorithm::RS256, "rsa2", &c);
    assert_eq!(status_of(&app, &t).await.0, 200, "rotated key");
    c["sub"] = json!("ivy");
    assert_refused(&app, &signed(Algorithm::RS256, "rsa1", &c), "retired kid").await;
    app.stop().await;
}

/// An identity provider whose JWKS never answers holds up only its own tokens: another
/// issuer's tokens verify while the read waits, and once it gives up the stalled issuer's
/// tokens are refused (401), not an error.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_stalled_jwks_holds_up_only_its_own_issuer(pool: PgPool) {
    use tokio::io::AsyncReadExt;
    let stall = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", stall.local_addr().unwrap());
    let (accepted_tx, accepted_rx) = tokio::sync::oneshot::channel();
    let (closed_tx, closed_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let (mut sock, _) = stall.accept().await.unwrap();
        let _ = accepted_tx.send(());
        // read the request, never answer; note when the client gives up
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        let _ = closed_tx.send(true);
    });
    let (app, _) = spawn(pool, Some(url)).await;
    let mut c = claims(PLATFORM_ISSUER, "frank");
    c["aud"] = json!("platform");
    c["tenant"] = json!("acme");
    let stalled = signed(Algorithm::RS256, "rsa1", &c);
    let stuck = tokio::spawn({
        let (http, url) = (app.http.clone(), app.url("/v1/jobs"));
        async move {
            http.get(url)
                .bearer_auth(stalled)
                .send()
                .await
                .map(|r| r.status())
        }
    });
    accepted_rx.await.unwrap();
    let t = signed(Algorithm::RS256, "rsa1", &claims(FILE_ISSUER, "erin"));
    assert_eq!(status_of(&app, &t).await.0, 200);
    assert!(
        !*closed_rx.borrow(),
        "the other issuer's token waited for the stalled JWKS read"
    );
    assert!(!stuck.is_finished());
    assert_eq!(stuck.await.unwrap().unwrap(), StatusCode::UNAUTHORIZED);
    app.stop().await;
}

/// When an issuer's keys are only old (re-read every time here) and the identity provider
/// stops answering, one request waits for the re-read and the others go on with the cached
/// keys.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn old_keys_serve_while_one_request_re_reads_them(pool: PgPool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let idp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", idp.local_addr().unwrap());
    let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel();
    let (closed_tx, closed_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        // the first read is answered
        let (mut sock, _) = idp.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = sock.read(&mut buf).await;
        let body = fixture("jwks1.json");
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        sock.write_all(&body).await.unwrap();
        drop(sock);
        // the next is not
        let (mut sock, _) = idp.accept().await.unwrap();
        let _ = stalled_tx.send(());
        while let Ok(n) = sock.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        let _ = closed_tx.send(true);
    });
    let opts = Opts {
        scheduler: false,
        configure: Some(Arc::new(move |cfg| {
            cfg.jwt.jwks_refresh_s = 0;
            cfg.jwt.jwks_min_refresh_s = 0;
            cfg.jwt.issuers.push(JwtIssuer {
                issuer: PLATFORM_ISSUER.into(),
                jwks_file: None,
                jwks_url: Some(url.clone()),
                tenant: Some("acme".into()),
                audience: None,
            });
        })),
        ..Opts::default()
    };
    let app = spawn_app_with(pool, opts).await;
    let token = |sub: &str| signed(Algorithm::RS256, "rsa1", &claims(PLATFORM_ISSUER, sub));
    assert_eq!(status_of(&app, &token("first")).await.0, 200);
    let waiting = tokio::spawn({
        let (http, url, t) = (app.http.clone(), app.url("/v1/jobs"), token("second"));
        async move {
            http.get(url)
                .bearer_auth(t)
                .send()
                .await
                .map(|r| r.status())
        }
    });
    stalled_rx.await.unwrap();
    assert_eq!(status_of(&app, &token("third")).await.0, 200);
    assert!(
        !*closed_rx.borrow(),
        "a request whose key was cached waited for the re-read"
    );
    // the re-read gives up; the keys it had still verify
    assert_eq!(waiting.await.unwrap().unwrap(), StatusCode::OK);
    app.stop().await;
}
