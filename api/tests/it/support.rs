//! `spawn_app()`: the real API on port 0 against the per-test database, a unique Redis key
//! prefix, and optionally an in-process worker, scheduler and mock LLM provider.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use switchyard_core::config::Config;
use switchyard_core::job::JobKind;
use switchyard_queue::{EventBus, Keys, Queue};
use switchyard_scheduler::{Scheduler, SchedulerOptions};
use switchyard_store::Store;
use switchyard_worker::executor::ExecutorRegistry;
use switchyard_worker::llm::cache::ResponseCache;
use switchyard_worker::llm::{LlmChatExecutor, Providers};
use switchyard_worker::noop::NoopExecutor;
use switchyard_worker::{Worker, WorkerHandle, WorkerOptions};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

mod ws;
pub use ws::*;

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The platform operator's token in tests.
pub const OPERATOR_TOKEN: &str = "operator-token-for-tests-0123456789abcdef";

/// A change to the configuration a test makes before the app starts.
pub type Configure = std::sync::Arc<dyn Fn(&mut Config) + Send + Sync>;

/// Executors a test puts in its workers' registry (replacing those of the same kind).
pub type Register = std::sync::Arc<dyn Fn(&mut ExecutorRegistry) + Send + Sync>;

#[derive(Clone)]
pub struct Opts {
    pub worker: bool,
    pub scheduler: bool,
    pub lease: Duration,
    pub redis_url: String,
    pub max_body_bytes: usize,
    pub enable_noop: bool,
    /// Give the worker the wasm sandbox (`code.exec`).
    pub code: bool,
    /// Adjusts the configuration before anything starts.
    pub configure: Option<Configure>,
    /// Adjusts the workers' executors.
    pub executors: Option<Register>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            worker: true,
            scheduler: true,
            lease: Duration::from_secs(3),
            redis_url: redis_url(),
            max_body_bytes: 1024 * 1024,
            enable_noop: true,
            code: false,
            configure: None,
            executors: None,
        }
    }
}

pub struct TestApp {
    pub base: String,
    pub key: String,
    pub tenant: Uuid,
    pub store: Store,
    pub cfg: Config,
    pub http: reqwest::Client,
    pub mock_url: String,
    pub opts: Opts,
    api_stop: CancellationToken,
    workers: Vec<WorkerHandle>,
    sched_stop: CancellationToken,
    mock_stop: CancellationToken,
}

pub async fn spawn_app(pool: PgPool) -> TestApp {
    spawn_app_with(pool, Opts::default()).await
}

/// The API alone: no worker, no scheduler (jobs stay queued).
pub async fn spawn_api_only(pool: PgPool) -> TestApp {
    let opts = Opts {
        worker: false,
        scheduler: false,
        ..Opts::default()
    };
    spawn_app_with(pool, opts).await
}

/// API and scheduler, no worker (tests start workers themselves).
pub async fn spawn_without_worker(pool: PgPool) -> TestApp {
    let opts = Opts {
        worker: false,
        ..Opts::default()
    };
    spawn_app_with(pool, opts).await
}

/// A job row as the API would build it (for tests that write to the store directly).
pub fn new_job(tenant: Uuid) -> switchyard_store::NewJob {
    switchyard_store::NewJob {
        id: Uuid::now_v7(),
        tenant_id: tenant,
        created_by: "key:test".into(),
        kind: "system.noop".into(),
        queue: "system".into(),
        priority: 0,
        max_attempts: 3,
        timeout_s: None,
        input: json!({}),
        metadata: json!({}),
        trace_parent: None,
        created_at: chrono::Utc::now(),
        run_at: None,
        backoff: None,
        webhook_url: None,
    }
}

pub async fn spawn_app_with(pool: PgPool, opts: Opts) -> TestApp {
    let prefix = format!("t{}", Uuid::new_v4().simple());
    let mut cfg = Config::for_tests("postgres://unused", &opts.redis_url, &prefix);
    cfg.max_body_bytes = opts.max_body_bytes;
    cfg.operator_token = Some(OPERATOR_TOKEN.to_string().into());
    // a test that lowers the limit lowers it for jobs too
    if opts.max_body_bytes < cfg.max_job_body_bytes && opts.max_body_bytes != 1024 * 1024 {
        cfg.max_job_body_bytes = opts.max_body_bytes;
    }
    cfg.enable_noop = opts.enable_noop;
    cfg.dispatch_mark_linger_ms = 100; // under the tests' re-dispatch age (500 ms)
    cfg.lease_s = opts.lease.as_secs().max(2);
    // as the services run: the service role, bound by row-level security
    let store = Store::with_role(&pool, switchyard_store::SERVICE_ROLE);
    let tenant = store.create_tenant("acme").await.unwrap();
    let (_, key) = store.create_api_key(tenant.id, "test", None).await.unwrap();

    let (mock_base, mock_stop) = switchyard_mock_llm::spawn(Default::default())
        .await
        .unwrap();
    let mock_url = format!("{mock_base}/v1");
    // the API's model table lists the mock's aliases (`GET /v1/models`)
    cfg.llm.mock_base_url = Some(mock_url.clone());
    if let Some(f) = &opts.configure {
        f(&mut cfg);
    }

    let api_stop = CancellationToken::new();
    let state = switchyard_api::AppState::build(&cfg, store.clone(), api_stop.clone())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(switchyard_api::serve(listener, state));

    let mut app = TestApp {
        base: format!("http://{addr}"),
        key,
        tenant: tenant.id,
        store,
        cfg,
        http: reqwest::Client::new(),
        mock_url,
        opts: opts.clone(),
        api_stop,
        workers: Vec::new(),
        sched_stop: CancellationToken::new(),
        mock_stop,
    };
    if opts.scheduler {
        app.start_scheduler().await;
    }
    if opts.worker {
        app.start_worker().await;
    }
    app
}

impl TestApp {
    pub fn keys(&self) -> Keys {
        Keys::new(&self.cfg.redis_prefix)
    }

    pub async fn redis(&self) -> switchyard_queue::RedisConn {
        let client = switchyard_queue::RedisClient::open(self.opts.redis_url.as_str()).unwrap();
        client.connect(Duration::from_secs(5)).await.unwrap()
    }

    /// Waits for the scheduler's first pass to set the Redis epoch (a fresh epoch re-dispatches
    /// every unfinished job, which would race a test that counts what is in the streams).
    pub async fn wait_epoch(&self) {
        let q = self.queue().await;
        let t = std::time::Instant::now();
        while q.epoch().await.unwrap().is_none() {
            assert!(t.elapsed() < Duration::from_secs(10), "no redis epoch");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The queue as the roles build it (with the configured lane depth).
    pub async fn queue(&self) -> Queue {
        Queue::new(self.keys(), self.redis().await).with_lane_depth(self.cfg.queue_lane_depth)
    }

    pub async fn bus(&self) -> EventBus {
        EventBus::new(self.keys(), self.redis().await, Duration::from_secs(60))
    }

    pub async fn executors(&self) -> ExecutorRegistry {
        let mut reg = ExecutorRegistry::new();
        let mut llm = self.cfg.llm.clone();
        llm.mock_base_url = Some(self.mock_url.clone());
        llm.request_timeout_s = 5;
        llm.retry_base_ms = 10;
        llm.retry_max_ms = 2_000;
        reg.register(
            JobKind::LlmChat,
            Arc::new(LlmChatExecutor::new(
                Providers::from_config(&llm),
                Some(self.store.clone()),
                Some(ResponseCache::new(
                    self.redis().await,
                    self.keys(),
                    Duration::from_secs(llm.cache_ttl_s),
                )),
            )),
        );
        reg.register(JobKind::SystemNoop, Arc::new(NoopExecutor));
        if self.opts.code {
            let mut code = self.cfg.code.clone();
            code.work_dir = Some(std::env::temp_dir().join("switchyard-test-code"));
            code.concurrency = Some(4);
            let sandboxes = switchyard_worker::code::build_sandboxes(&code)
                .await
                .expect("wasm sandbox (run sandbox-images/wasm/fetch.sh)");
            reg.register(
                JobKind::CodeExec,
                Arc::new(
                    switchyard_worker::code::CodeExecExecutor::new(
                        sandboxes,
                        code,
                        Some(self.store.clone()),
                    )
                    .with_metrics(
                        switchyard_worker::code_metrics::CodeMetrics::new(
                            self.redis().await,
                            self.keys(),
                        ),
                    ),
                ),
            );
        }
        if let Some(register) = &self.opts.executors {
            register(&mut reg);
        }
        reg
    }

    pub async fn start_worker(&mut self) {
        self.start_worker_with_grace(Duration::from_secs(5)).await
    }

    /// Starts another API process on the same database, Redis and configuration (a second
    /// replica); stops with the app. Returns its base URL.
    pub async fn spawn_api_replica(&self) -> String {
        let state =
            switchyard_api::AppState::build(&self.cfg, self.store.clone(), self.api_stop.clone())
                .await
                .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(switchyard_api::serve(listener, state));
        format!("http://{addr}")
    }

    /// Stops the API: streams close (WebSocket code 1012), new connections are refused.
    pub fn stop_api(&self) {
        self.api_stop.cancel();
    }

    pub async fn start_worker_with_grace(&mut self, grace: Duration) {
        let w = self.new_worker(grace).await;
        self.run_worker(w);
    }

    /// Starts a worker built by [`TestApp::new_worker`]; it stops with the app.
    pub fn run_worker(&mut self, w: Worker) {
        self.workers.push(w.start(CancellationToken::new()));
    }

    /// A worker of this app, not started (a test may read its id first).
    pub async fn new_worker(&self, grace: Duration) -> Worker {
        let client = switchyard_queue::RedisClient::open(self.opts.redis_url.as_str()).unwrap();
        let opts = WorkerOptions {
            lease: self.opts.lease,
            name: "test".into(),
            shutdown_grace: grace,
            fetch_block: Duration::from_millis(500),
            retry_base: Duration::from_millis(100),
            concurrency: 16,
            queues: self.cfg.worker.queues.clone(),
            queue_concurrency: self
                .cfg
                .worker
                .queue_concurrency
                .iter()
                .map(|(q, n)| (q.clone(), *n))
                .collect(),
            quota_defaults: self.cfg.quotas.defaults(),
        };
        Worker::new(
            self.store.clone(),
            self.queue().await,
            self.bus().await,
            client,
            self.executors().await,
            opts,
        )
    }

    pub async fn start_scheduler(&mut self) {
        let s = Scheduler::new(
            self.store.clone(),
            self.queue().await,
            self.scheduler_opts(),
        );
        let stop = self.sched_stop.clone();
        tokio::spawn(s.run(stop));
    }

    /// A scheduler of this app's store and Redis, whose passes a test runs itself.
    pub async fn scheduler(&self, opts: SchedulerOptions) -> Scheduler {
        Scheduler::new(self.store.clone(), self.queue().await, opts)
    }

    pub fn scheduler_opts(&self) -> SchedulerOptions {
        SchedulerOptions {
            interval: Duration::from_millis(200),
            undispatched_min_age: Duration::from_millis(500),
            lease: self.opts.lease,
            webhooks: Some(self.cfg.webhooks.clone()),
            queue_limits: self.cfg.queue_limits.clone(),
            tenant_concurrency: self.cfg.quotas.concurrent_jobs,
            quota_defaults: self.cfg.quotas.defaults(),
            ..SchedulerOptions::default()
        }
    }

    pub async fn stop_workers(&mut self) {
        for w in self.workers.drain(..) {
            w.drain().await;
        }
    }

    /// Restarts every process of the app (API on a new port, workers, scheduler) after wiping
    /// this test's Redis keys: what survives is what Postgres holds.
    pub async fn restart(&mut self) {
        self.stop_workers().await;
        self.sched_stop.cancel();
        self.api_stop.cancel();
        self.clear_redis().await;
        self.api_stop = CancellationToken::new();
        let state =
            switchyard_api::AppState::build(&self.cfg, self.store.clone(), self.api_stop.clone())
                .await
                .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(switchyard_api::serve(listener, state));
        self.sched_stop = CancellationToken::new();
        if self.opts.scheduler {
            self.start_scheduler().await;
        }
        if self.opts.worker {
            self.start_worker().await;
        }
    }

    /// Stops everything and removes this test's Redis keys.
    /// Starts the API's shutdown (its streams and requests in flight end), leaving the rest up.
    pub fn shut_down_api(&self) {
        self.api_stop.cancel();
    }

    pub async fn stop(mut self) {
        self.stop_workers().await;
        self.sched_stop.cancel();
        self.api_stop.cancel();
        self.mock_stop.cancel();
        self.clear_redis().await;
    }

    async fn clear_redis(&self) {
        // a test on a cluster starts a private one and drops it whole (SCAN is per node)
        if switchyard_queue::RedisClient::open(&self.opts.redis_url).is_ok_and(|c| c.is_cluster()) {
            return;
        }
        let mut c = self.redis().await;
        let pattern = format!("*{}*", self.cfg.redis_prefix);
        // SCAN, not KEYS: never block a shared Redis
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = match redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(10_000)
                .query_async(&mut c)
                .await
            {
                Ok(r) => r,
                Err(_) => break,
            };
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut c).await;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        rb.bearer_auth(&self.key)
    }

    pub async fn submit(&self, body: Value) -> Value {
        let r = self
            .auth(self.http.post(self.url("/v1/jobs")))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 202, "submit failed: {v}");
        v
    }

    pub async fn submit_noop(&self, input: Value) -> Uuid {
        let v = self
            .submit(json!({"kind": "system.noop", "input": input}))
            .await;
        v["id"].as_str().unwrap().parse().unwrap()
    }

    pub async fn get_job(&self, id: Uuid) -> Value {
        self.get_json(&format!("/v1/jobs/{id}")).await
    }

    /// A new developer key of the app's tenant: its id and its secret.
    pub async fn developer_key(&self, name: &str) -> (Uuid, String) {
        let (rec, key) = self
            .store
            .create_scoped_api_key(
                self.tenant,
                name,
                switchyard_core::authz::Role::Developer,
                None,
                None,
            )
            .await
            .unwrap();
        (rec.id, key)
    }

    /// Revokes key `id` through the API (this replica forgets it at once); asserts 200.
    pub async fn revoke_key(&self, id: Uuid) {
        let r = self
            .auth(self.http.delete(self.url(&format!("/v1/api-keys/{id}"))))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    /// `GET path` with the app's key; asserts 200 and returns the JSON body.
    pub async fn get_json(&self, path: &str) -> Value {
        let r = self
            .auth(self.http.get(self.url(path)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().await.unwrap()
    }

    /// The requests the mock provider received for `model`, oldest first (what went over HTTP).
    pub async fn mock_requests(&self, model: &str) -> Vec<Value> {
        let base = self.mock_url.trim_end_matches("/v1");
        let url = format!("{base}/mock/requests?model={model}");
        let v: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        v["requests"].as_array().cloned().unwrap_or_default()
    }

    /// Polls until the job has `status` (panics after `timeout`).
    pub async fn wait_status(&self, id: Uuid, status: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let j = self.get_job(id).await;
            if j["status"] == status {
                return j;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("job {id} did not reach {status} in {timeout:?}: {j}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `GET /v1/quotas` until `usage.<field>` is above `over` (panics after 20 s): what
    /// a worker charges lands after the job's end.
    pub async fn wait_usage_above(&self, field: &str, over: f64) -> Value {
        let t = std::time::Instant::now();
        loop {
            let q = self.get_json("/v1/quotas").await;
            if q["usage"][field].as_f64().unwrap_or(0.0) > over {
                return q;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{field} not charged: {q}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The whole `/metrics` page.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one `/metrics` series (`name{labels}` exactly as exported), if present.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.metrics_text().await;
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    pub async fn ws(&self) -> Ws {
        ws_connect(&self.base, &self.key).await
    }
}

/// Every (METHOD, path) of the served OpenAPI document.
pub async fn openapi_operations(app: &TestApp) -> Vec<(String, String)> {
    let doc: Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.push((method.to_uppercase(), path.clone()));
        }
    }
    ops
}

/// The authorization-table entry of a documented operation (the document writes the
/// catch-all `/v1/models/{*id}` as `/v1/models/{id}`).
pub fn documented_access(method: &str, path: &str) -> Option<switchyard_api::authz::Access> {
    let routed = if path.starts_with("/v1/models/") {
        "/v1/models/{*id}"
    } else {
        path
    };
    switchyard_api::authz::access(&method.parse().ok()?, routed)
}
