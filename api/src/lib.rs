//! The stateless HTTP API: REST for jobs, models and usage, WebSocket/SSE for job events, health,
//! metrics and OpenAPI. Any replica can serve any request or stream; all state is in Postgres and
//! Redis.

pub mod audit;
pub mod auth;
pub mod auth_limit;
pub mod authz;
pub mod error;
pub mod feed;
pub mod jwt;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod queues;
pub mod quota;
pub mod routes;
pub mod submit;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRef};
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use switchyard_core::config::Config;
use switchyard_core::models::ModelTable;
use switchyard_core::ErrorCode;
use switchyard_queue::{EventBus, Keys, LiveHub, Queue};
use switchyard_store::Store;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::auth::{AuthCache, KeyUsage};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::submit::Submitter;

/// Settings the API reads per request.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub max_body_bytes: usize,
    pub max_job_body_bytes: usize,
    /// SHA-256 of the operator token (`None`: operator routes closed).
    pub operator_digest: Option<[u8; 32]>,
    /// `/metrics` asks for this token (or the operator's) when set.
    pub metrics_digest: Option<[u8; 32]>,
    pub enable_noop: bool,
    /// Webhook URLs may name private addresses (`webhooks.allow_private`).
    pub webhooks_allow_private: bool,
}

/// Everything handlers need; cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct AppState(Arc<AppStateInner>);

impl std::ops::Deref for AppState {
    type Target = AppStateInner;
    fn deref(&self) -> &AppStateInner {
        &self.0
    }
}

pub struct AppStateInner {
    pub store: Store,
    pub queue: Queue,
    pub bus: EventBus,
    pub live: LiveHub,
    pub submitter: Submitter,
    pub cfg: Arc<ApiConfig>,
    pub metrics: Arc<Metrics>,
    pub auth_cache: Arc<AuthCache>,
    /// Last use of API keys, written in batches (at most once a minute per key).
    pub key_usage: Arc<KeyUsage>,
    /// Audit rows of state-changing requests, written in batches.
    pub audit: crate::audit::AuditSink,
    /// Failed authentications per source address.
    pub auth_failures: Arc<crate::auth_limit::AuthFailures>,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Arc<switchyard_core::proxy::TrustedProxies>,
    /// Per-credential rates and tenant quotas.
    pub admission: Arc<crate::quota::Admission>,
    /// The model table (`GET /v1/models`), built once from `llm` at start.
    pub models: Arc<ModelTable>,
    /// The cap on named queues (`max_named_queues`) and the registry as last read.
    pub named_queues: Arc<crate::queues::NamedQueues>,
    /// Fired when the process drains: streams close (WebSocket code 1012).
    pub shutdown: CancellationToken,
    /// Fired by `serve` once the server's requests have ended: the audit writer drains.
    pub audit_stop: CancellationToken,
    /// Background tasks of this API (feeds, group commit); awaited on shutdown.
    pub tasks: TaskTracker,
}

impl FromRef<AppState> for Store {
    fn from_ref(s: &AppState) -> Store {
        s.store.clone()
    }
}

impl FromRef<AppState> for Arc<ModelTable> {
    fn from_ref(s: &AppState) -> Arc<ModelTable> {
        s.models.clone()
    }
}

impl AppState {
    /// Connects to Redis and starts the API's background tasks.
    pub async fn build(
        cfg: &Config,
        store: Store,
        shutdown: CancellationToken,
    ) -> anyhow::Result<AppState> {
        let client = switchyard_queue::RedisClient::open(cfg.redis_url())
            .map_err(|e| anyhow::anyhow!("invalid REDIS_URL: {e}"))?;
        let conn = switchyard_queue::connect_retrying(&client).await?;
        let keys = Keys::new(&cfg.redis_prefix);
        let keys_for_quotas = keys.clone();
        let tasks = TaskTracker::new();
        let queue = Queue::new(keys.clone(), conn.clone()).with_lane_depth(cfg.queue_lane_depth);
        let bus = EventBus::new(
            keys.clone(),
            conn.clone(),
            Duration::from_secs(cfg.event_ttl_s),
        );
        let live = LiveHub::start(client.clone(), keys.clone(), shutdown.clone(), &tasks);
        let submit_conn = switchyard_queue::connect_retrying(&client).await?;
        let submitter = Submitter::start(
            store.clone(),
            queue.clone(),
            submit_conn,
            Duration::from_millis(cfg.dispatch_mark_linger_ms),
            &tasks,
        );
        // stopped by `serve` once the requests in flight are done (they still record)
        let audit_stop = CancellationToken::new();
        let audit = crate::audit::AuditSink::start(
            store.clone(),
            audit_stop.clone(),
            shutdown.clone(),
            &tasks,
        );
        let auth_cache = Arc::new(AuthCache::new(
            cfg.jwt.clone(),
            Duration::from_secs(cfg.auth_cache_ttl_s),
        ));
        {
            // a key revoked or a tenant changed anywhere: cached lookups go at once
            let (cache, mut changes, stop) = (
                auth_cache.clone(),
                live.credential_changes(),
                shutdown.clone(),
            );
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        r = changes.changed() => {
                            if r.is_err() {
                                return;
                            }
                            cache.clear();
                        }
                    }
                }
            });
        }
        let key_usage = Arc::new(KeyUsage::default());
        {
            let (usage, store, stop) = (key_usage.clone(), store.clone(), shutdown.clone());
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => {
                            usage.flush(&store).await;
                            return;
                        }
                        _ = tokio::time::sleep(Duration::from_secs(1)) => usage.flush(&store).await,
                    }
                }
            });
        }
        Ok(AppState(Arc::new(AppStateInner {
            store,
            queue,
            bus,
            live,
            submitter,
            cfg: Arc::new(ApiConfig {
                max_body_bytes: cfg.max_body_bytes,
                max_job_body_bytes: cfg.max_job_body_bytes,
                operator_digest: cfg.operator_token.as_ref().map(|t| {
                    switchyard_core::apikey::digest(secrecy::ExposeSecret::expose_secret(t))
                }),
                metrics_digest: cfg.metrics_token.as_ref().map(|t| {
                    switchyard_core::apikey::digest(secrecy::ExposeSecret::expose_secret(t))
                }),
                enable_noop: cfg.enable_noop,
                webhooks_allow_private: cfg.webhooks.allow_private,
            }),
            metrics: Arc::new(Metrics::new()),
            auth_cache,
            key_usage,
            audit,
            auth_failures: Arc::new(crate::auth_limit::AuthFailures::new(
                cfg.auth_failures_per_minute,
            )),
            // validated when the configuration loads
            trusted_proxies: Arc::new(
                switchyard_core::proxy::TrustedProxies::parse(&cfg.trusted_proxies)
                    .unwrap_or_default(),
            ),
            admission: Arc::new(crate::quota::Admission::new(
                &cfg.quotas,
                switchyard_queue::Quotas::new(keys_for_quotas, conn.clone()),
            )),
            models: Arc::new(cfg.llm.table()),
            named_queues: Arc::new(crate::queues::NamedQueues::new(
                cfg.max_named_queues,
                cfg.max_named_queues_per_tenant,
                cfg.worker
                    .queues
                    .iter()
                    .chain(cfg.queue_limits.keys())
                    .cloned(),
            )),
            shutdown,
            audit_stop,
            tasks,
        })))
    }
}

/// Routes of OpenAI's API that Switchyard does not serve: an OpenAI SDK pointed here gets its
/// own error shape for them.
const OPENAI_ONLY: &[&str] = &[
    "/v1/embeddings",
    "/v1/completions",
    "/v1/responses",
    "/v1/audio",
    "/v1/images",
    "/v1/files",
    "/v1/uploads",
    "/v1/moderations",
    "/v1/batches",
    "/v1/fine_tuning",
    "/v1/assistants",
    "/v1/threads",
    "/v1/vector_stores",
    "/v1/realtime",
];

async fn not_found(uri: axum::http::Uri) -> Response {
    let path = uri.path();
    let openai = OPENAI_ONLY
        .iter()
        .any(|p| path == *p || path.strip_prefix(p).is_some_and(|r| r.starts_with('/')));
    if openai {
        return openai::error::OaiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "{path} is not served here: Switchyard's OpenAI-compatible API is /v1/chat/completions and /v1/models"
            ),
        )
        .into_response();
    }
    ApiError::new(ErrorCode::NotFound, "no such route").into_response()
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this route",
    )
}

/// The router with all routes and layers.
pub fn router(state: AppState) -> Router {
    use routes::{
        api_keys, audit, conversations, dead, deliveries, health, job_batch, jobs, models, quotas,
        schedules, stream, tenants, usage, workers,
    };
    let max_body = state.cfg.max_body_bytes;
    let max_job_body = state.cfg.max_job_body_bytes;
    Router::new()
        .route(
            "/v1/jobs",
            // its own body limit: code.exec jobs carry modules and files
            post(jobs::create_job)
                .layer(DefaultBodyLimit::max(max_job_body))
                .get(jobs::list_jobs),
        )
        .route(
            "/v1/jobs/batch",
            post(job_batch::create_batch).layer(DefaultBodyLimit::max(max_job_body)),
        )
        .route("/v1/jobs/{id}", get(jobs::get_job))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel_job))
        .route("/v1/jobs/{id}/retry", post(dead::retry_job))
        .route("/v1/jobs/{id}/events", get(stream::sse))
        .route("/v1/jobs/{id}/deliveries", get(deliveries::list))
        .route("/v1/ws", get(stream::ws))
        .route(
            "/v1/conversations",
            post(conversations::create).get(conversations::list),
        )
        .route(
            "/v1/conversations/{id}",
            get(conversations::get).delete(conversations::delete),
        )
        // prompts as large as a job's (a 1 MiB limit refused prompts `/v1/jobs` takes)
        .route(
            "/v1/conversations/{id}/messages",
            post(conversations::post_message).layer(DefaultBodyLimit::max(max_job_body)),
        )
        .route(
            "/v1/chat/completions",
            post(crate::openai::chat_completions).layer(DefaultBodyLimit::max(max_job_body)),
        )
        .route("/v1/models", get(models::list_models))
        .route("/v1/models/{*id}", get(models::get_model))
        .route("/v1/usage", get(usage::get_usage))
        .route("/v1/quotas", get(quotas::get_quotas))
        .route(
            "/v1/schedules",
            post(schedules::create).get(schedules::list),
        )
        .route(
            "/v1/schedules/{id}",
            get(schedules::get)
                .patch(schedules::update)
                .delete(schedules::delete),
        )
        .route("/v1/api-keys", post(api_keys::create).get(api_keys::list))
        .route(
            "/v1/api-keys/{id}",
            get(api_keys::get).delete(api_keys::revoke),
        )
        .route("/v1/audit", get(audit::list))
        .route("/v1/tenants", post(tenants::create).get(tenants::list))
        .route("/v1/workers", get(workers::list))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(health::openapi))
        .route("/docs", get(routes::docs::docs))
        // every matched route: authenticate and check its permission (authz::ROUTES)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authz::authorize,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                let rid = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                // the path only: `?token=` must never reach the logs
                tracing::info_span!(
                    "request",
                    method = %req.method(),
                    path = %req.uri().path(),
                    request_id = %rid,
                    trace_id = tracing::field::Empty,
                )
            }),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(axum::middleware::map_request(plain_request_id))
        .with_state(state)
}

/// Longest `x-request-id` a client may choose.
const MAX_REQUEST_ID: usize = 128;

/// A client's own `x-request-id` is kept (echoed, logged, audited) when it is one plain token:
/// at most 128 letters, digits and `-_.:/`. Anything else (a kilobyte of text, spaces, several
/// values) is dropped and the request-id layer issues a UUID instead.
async fn plain_request_id(mut req: axum::extract::Request) -> axum::extract::Request {
    let mut ids = req.headers().get_all("x-request-id").iter();
    let plain = match (ids.next(), ids.next()) {
        (None, _) => true,
        (Some(v), None) => {
            let b = v.as_bytes();
            !b.is_empty()
                && b.len() <= MAX_REQUEST_ID
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.:/".contains(c))
        }
        _ => false,
    };
    if !plain {
        req.headers_mut().remove("x-request-id");
    }
    req
}

/// Serves until `state.shutdown` fires, then stops accepting, closes streams and waits for
/// in-flight requests and background tasks.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> anyhow::Result<()> {
    let shutdown = state.shutdown.clone();
    let audit_stop = state.audit_stop.clone();
    let tasks = state.tasks.clone();
    let app = router(state);
    // small frames (events, 202s) go out at once instead of waiting for Nagle's algorithm
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
    });
    // the peer address feeds the failed-authentication limit
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await?;
    // every request has ended: the audit writer drains what they recorded
    audit_stop.cancel();
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), tasks.wait()).await;
    Ok(())
}
