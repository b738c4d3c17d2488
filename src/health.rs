//! Health endpoints of the roles without an HTTP API (worker, scheduler) on `health_listen`:
//! `/healthz` answers while the process runs (liveness), `/readyz` only while Postgres and
//! Redis answer and the role is not draining (readiness). Also `switchyard probe`, the
//! container health check, which needs no shell or curl in the image.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use switchyard_queue::RedisConn;
use switchyard_store::Store;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone)]
struct Probes {
    store: Store,
    redis: RedisConn,
    draining: CancellationToken,
}

/// Serves the endpoints on `addr` until `done` fires. `draining` turns readiness red.
pub async fn spawn(
    addr: SocketAddr,
    store: Store,
    redis: RedisConn,
    draining: CancellationToken,
    done: CancellationToken,
    tasks: &TaskTracker,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding health_listen {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(Probes {
            store,
            redis,
            draining,
        });
    tasks.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { done.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "health endpoint stopped");
        }
    });
    tracing::info!(addr = %local, "health endpoints listening");
    Ok(local)
}

async fn ready(State(p): State<Probes>) -> (StatusCode, Json<Value>) {
    let pg = tokio::time::timeout(Duration::from_secs(2), p.store.ping())
        .await
        .is_ok_and(|r| r.is_ok());
    let mut conn = p.redis.clone();
    let redis = tokio::time::timeout(
        Duration::from_secs(2),
        redis::cmd("PING").query_async::<()>(&mut conn),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let draining = p.draining.is_cancelled();
    let ok = pg && redis && !draining;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |up: bool| if up { "ok" } else { "unreachable" };
    (
        status,
        Json(json!({
            "status": if ok { "ready" } else if draining { "draining" } else { "unavailable" },
            "postgres": word(pg),
            "redis": word(redis),
        })),
    )
}

/// `switchyard probe [URL]`: exits 0 if `URL` (or, without one, this host's health endpoint
/// or API at their configured addresses: `health_listen`, `listen`) answers 200 within 3 s.
/// An API started with `--listen` is probed with its URL (or set `SWITCHYARD_LISTEN` instead).
pub async fn probe(url: Option<String>, cfg: &switchyard_core::config::Config) -> bool {
    let urls: Vec<String> = match url {
        Some(u) => vec![u],
        None => {
            // the configured address, or loopback where it names every interface (a
            // listener bound to one interface does not answer on 127.0.0.1)
            let at = |a: std::net::SocketAddr| {
                let host = match a.ip() {
                    ip if ip.is_unspecified() => "127.0.0.1".to_string(),
                    std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                    ip => ip.to_string(),
                };
                format!("http://{host}:{}/healthz", a.port())
            };
            let mut v = Vec::new();
            if let Some(h) = cfg.health_listen {
                v.push(at(h));
            }
            v.push(at(cfg.listen));
            v
        }
    };
    let Ok(http) = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
    else {
        return false;
    };
    for u in urls {
        if let Ok(r) = http.get(&u).send().await {
            if r.status().is_success() {
                return true;
            }
        }
    }
    false
}
