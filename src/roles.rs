//! Starting and stopping each role from a `Config`; `dev` runs them all in one process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use switchyard_core::config::Config;
use switchyard_core::job::JobKind;
use switchyard_core::queueing::is_code_queue;
use switchyard_queue::{EventBus, Keys, Queue};
use switchyard_scheduler::{Scheduler, SchedulerOptions};
use switchyard_store::Store;
use switchyard_worker::code::CodeExecExecutor;
use switchyard_worker::code_metrics::CodeMetrics;
use switchyard_worker::executor::ExecutorRegistry;
use switchyard_worker::llm::cache::ResponseCache;
use switchyard_worker::llm::{LlmChatExecutor, Providers};
use switchyard_worker::noop::NoopExecutor;
use switchyard_worker::{Worker, WorkerHandle, WorkerOptions};
use tokio_util::sync::CancellationToken;

/// Connects to Postgres (lazily: outages are retried, never fatal).
pub fn store(cfg: &Config, max_connections: u32) -> anyhow::Result<Store> {
    Store::connect_lazy(
        cfg.database_url(),
        max_connections,
        Some(cfg.database_role.as_str()),
    )
}

/// Whether a failed `migrate` is one an admin command may go on past: this login may not
/// change the schema (insufficient privilege), or the database has migrations this binary
/// does not know (a newer release applied them).
pub fn migration_not_ours(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        if let Some(m) = c.downcast_ref::<sqlx::migrate::MigrateError>() {
            if matches!(m, sqlx::migrate::MigrateError::VersionMissing(_)) {
                return true;
            }
        }
        c.downcast_ref::<sqlx::Error>()
            .and_then(|s| s.as_database_error())
            .and_then(|d| d.code())
            .is_some_and(|code| code == "42501")
    })
}

/// Tells running API replicas that credentials or tenant settings changed (an admin command
/// revoked a key or changed a tenant): they drop their cached lookups now. Without Redis
/// they pick the change up within `auth_cache_ttl_s`; says so rather than failing.
pub async fn announce_credentials_change(cfg: &Config) {
    let announced = tokio::time::timeout(Duration::from_secs(5), async {
        let conn = redis_client(cfg)?.connect(Duration::from_secs(3)).await?;
        Queue::new(Keys::new(&cfg.redis_prefix), conn)
            .announce_credentials_change()
            .await?;
        anyhow::Ok(())
    })
    .await;
    if !matches!(announced, Ok(Ok(()))) {
        eprintln!(
            "note: Redis not reached; running API replicas apply this within {} s",
            cfg.auth_cache_ttl_s
        );
    }
}

pub fn redis_client(cfg: &Config) -> anyhow::Result<switchyard_queue::RedisClient> {
    switchyard_queue::RedisClient::open(cfg.redis_url())
        .map_err(|e| anyhow::anyhow!("invalid REDIS_URL: {e}"))
}

/// Waits until Postgres answers (startup only), printing what it waits for.
pub async fn wait_for_postgres(store: &Store, what: &str) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(100);
    for i in 0..60 {
        match store.ping().await {
            Ok(()) => return Ok(()),
            Err(e) if i == 59 => {
                return Err(anyhow::anyhow!("postgres unreachable for {what}: {e}"))
            }
            Err(e) => {
                if i % 10 == 0 {
                    tracing::warn!(error = %e, "waiting for postgres");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
    Ok(())
}

/// Starts the API on `listener`; returns when `stop` fired and it drained.
pub async fn run_api(
    cfg: &Config,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let store = store(cfg, cfg.database_max_connections.max(2))?;
    wait_for_postgres(&store, "the API").await?;
    let state = switchyard_api::AppState::build(cfg, store, stop).await?;
    tracing::info!(addr = %listener.local_addr()?, "API listening");
    switchyard_api::serve(listener, state).await
}

/// The executors a worker offers, from the configuration.
/// `redis` enables the LLM response cache.
/// `code` (when the worker serves `code.exec`) is registered as is.
pub fn executors(
    cfg: &Config,
    store: Option<Store>,
    redis: Option<switchyard_queue::RedisConn>,
    code: Option<Arc<CodeExecExecutor>>,
) -> ExecutorRegistry {
    let mut reg = ExecutorRegistry::new();
    if let Some(code) = code {
        reg.register(JobKind::CodeExec, code);
    }
    reg.register(
        JobKind::LlmChat,
        Arc::new(LlmChatExecutor::new(
            Providers::from_config(&cfg.llm),
            store,
            redis.map(|c| {
                ResponseCache::new(
                    c,
                    Keys::new(&cfg.redis_prefix),
                    Duration::from_secs(cfg.llm.cache_ttl_s),
                )
            }),
        )),
    );
    reg.register(JobKind::SystemNoop, Arc::new(NoopExecutor));
    reg
}

/// `code`: whether this worker has sandboxes (otherwise it leaves the `code` queue alone).
pub fn worker_options(cfg: &Config, code: bool) -> WorkerOptions {
    let queues: Vec<String> = cfg
        .worker
        .queues
        .iter()
        .filter(|q| code || !is_code_queue(q))
        .cloned()
        .collect();
    let code_slots = cfg
        .code
        .concurrency
        .unwrap_or_else(switchyard_worker::code::default_concurrency);
    // code queues are bounded by the sandbox host; named queues may have their own slots
    let mut queue_concurrency: std::collections::HashMap<String, usize> = queues
        .iter()
        .filter(|q| is_code_queue(q))
        .map(|q| (q.clone(), code_slots))
        .collect();
    queue_concurrency.extend(
        cfg.worker
            .queue_concurrency
            .iter()
            .map(|(q, n)| (q.clone(), *n)),
    );
    WorkerOptions {
        queues,
        queue_concurrency,
        concurrency: cfg.worker.concurrency,
        lease: cfg.lease(),
        name: cfg
            .worker
            .name
            .clone()
            .unwrap_or_else(|| format!("worker-{}", std::process::id())),
        shutdown_grace: Duration::from_secs(cfg.shutdown_grace_s),
        quota_defaults: cfg.quotas.defaults(),
        ..WorkerOptions::default()
    }
}

/// The health endpoint of a worker or scheduler process (`health_listen`): it stays up through
/// the drain (readiness red, liveness green) and closes when the role has stopped.
#[derive(Default)]
pub struct Health {
    done: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

impl Health {
    pub fn new() -> Health {
        Health::default()
    }

    async fn serve(
        &self,
        cfg: &Config,
        store: &Store,
        redis: &switchyard_queue::RedisConn,
        draining: &CancellationToken,
    ) -> anyhow::Result<()> {
        if let Some(addr) = cfg.health_listen {
            crate::health::spawn(
                addr,
                store.clone(),
                redis.clone(),
                draining.clone(),
                self.done.clone(),
                &self.tasks,
            )
            .await?;
        }
        Ok(())
    }

    /// Stops the endpoint (after the role ended).
    pub async fn close(self) {
        self.done.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Starts a worker; call `drain` on the handle to stop it. With `health`, it also serves
/// `health_listen`.
pub async fn start_worker(
    cfg: &Config,
    stop: CancellationToken,
    health: Option<&Health>,
) -> anyhow::Result<WorkerHandle> {
    let store = store(
        cfg,
        (cfg.worker.concurrency as u32 / 2).clamp(2, cfg.database_max_connections.max(2)),
    )?;
    wait_for_postgres(&store, "the worker").await?;
    let client = redis_client(cfg)?;
    let conn = switchyard_queue::connect_retrying(&client)
        .await
        .map_err(|e| anyhow::anyhow!("redis unreachable: {e}"))?;
    let code = if cfg.worker.queues.iter().any(|q| is_code_queue(q)) {
        match switchyard_worker::code::check_tiers(&cfg.code) {
            Ok(()) => {
                let exec = Arc::new(
                    CodeExecExecutor::lazy(cfg.code.clone(), Some(store.clone()))
                        .with_metrics(CodeMetrics::new(conn.clone(), Keys::new(&cfg.redis_prefix))),
                );
                // build the sandboxes now, while the worker already serves its queues
                let (warm, stop) = (exec.clone(), stop.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = warm.warm_up() => {}
                        _ = stop.cancelled() => {}
                    }
                });
                Some(exec)
            }
            Err(e) => {
                tracing::error!(error = %e, "no code sandboxes: this worker leaves the `code` queue alone");
                None
            }
        }
    } else {
        None
    };
    if let Some(h) = health {
        h.serve(cfg, &store, &conn, &stop).await?;
    }
    let keys = Keys::new(&cfg.redis_prefix);
    let queue = Queue::new(keys.clone(), conn.clone()).with_lane_depth(cfg.queue_lane_depth);
    let bus = EventBus::new(keys, conn.clone(), Duration::from_secs(cfg.event_ttl_s));
    let worker = Worker::new(
        store.clone(),
        queue,
        bus,
        client,
        executors(cfg, Some(store), Some(conn), code.clone()),
        worker_options(cfg, code.is_some()),
    );
    Ok(worker.start(stop))
}

/// Runs the scheduler until `stop`.
pub async fn run_scheduler(
    cfg: &Config,
    stop: CancellationToken,
    health: Option<&Health>,
) -> anyhow::Result<()> {
    let store = store(cfg, 4)?;
    wait_for_postgres(&store, "the scheduler").await?;
    let client = redis_client(cfg)?;
    let conn = switchyard_queue::connect_retrying(&client)
        .await
        .map_err(|e| anyhow::anyhow!("redis unreachable: {e}"))?;
    if let Some(h) = health {
        h.serve(cfg, &store, &conn, &stop).await?;
    }
    let queue =
        Queue::new(Keys::new(&cfg.redis_prefix), conn).with_lane_depth(cfg.queue_lane_depth);
    let opts = SchedulerOptions {
        lease: cfg.lease(),
        audit_retention: (cfg.audit_retention_days > 0)
            .then(|| std::time::Duration::from_secs(cfg.audit_retention_days * 24 * 3600)),
        job_retention_days: cfg.job_retention_days.min(i32::MAX as u64) as u32,
        webhooks: Some(cfg.webhooks.clone()),
        queue_limits: cfg.queue_limits.clone(),
        tenant_concurrency: cfg.quotas.concurrent_jobs,
        quota_defaults: cfg.quotas.defaults(),
        ..SchedulerOptions::default()
    };
    Scheduler::new(store, queue, opts).run(stop).await;
    Ok(())
}

/// Fires the token on SIGTERM or Ctrl-C; a second signal ends the process at once.
pub fn shutdown_on_signals(token: CancellationToken) {
    on_signals(token, true)
}

/// [`shutdown_on_signals`] for `dev`: a second signal does not cut the drain short (the
/// private Postgres and Redis it started are stopped when it ends).
fn shutdown_on_signals_keeping_services(token: CancellationToken) {
    on_signals(token, false)
}

/// Cancels `token` on SIGTERM or SIGINT; with `second_exits`, a second one ends the process
/// at once (exit 130): an operator's second Ctrl-C during a drain means "now" (the work is
/// durable: leases run out and other workers take the jobs).
fn on_signals(token: CancellationToken, second_exits: bool) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: draining"),
            _ = token.cancelled() => return,
        }
        token.cancel();
        if !second_exits {
            return;
        }
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::warn!("second signal: exiting without finishing the drain");
        std::process::exit(130);
    });
}

/// Options of `switchyard dev`.
pub struct DevOptions {
    pub listen: SocketAddr,
    pub mock_listen: SocketAddr,
    pub fixed_key: Option<String>,
}

/// The local all-in-one: services, migrations, demo tenant and key, mock LLM, API, worker and
/// scheduler in one process.
pub async fn run_dev(mut cfg: Config, opts: DevOptions) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    shutdown_on_signals_keeping_services(stop.clone());
    let services = crate::devsvc::ensure_services(&mut cfg).await?;
    cfg.enable_noop = true;
    let store = store(&cfg, 8)?;
    store.migrate().await.context("applying migrations")?;
    let tenant = store.ensure_tenant("demo").await?;
    let (_, key) = store
        .create_api_key(tenant.id, "dev", opts.fixed_key.as_deref())
        .await
        .context("creating the demo API key (SWITCHYARD_DEV_API_KEY must look like sy_<8 alnum>_<40 alnum>)")?;

    let mock_stop = stop.child_token();
    let mut mock_task = None;
    if cfg.llm.mock_base_url.is_none() {
        let l = tokio::net::TcpListener::bind(opts.mock_listen)
            .await
            .with_context(|| format!("binding the mock LLM to {}", opts.mock_listen))?;
        let addr = l.local_addr()?;
        cfg.llm.mock_base_url = Some(format!("http://{addr}/v1"));
        let s = mock_stop.clone();
        mock_task = Some(tokio::spawn(async move {
            switchyard_mock_llm::serve(l, switchyard_mock_llm::MockLlmConfig::default(), s).await
        }));
    }
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding the API to {}", opts.listen))?;
    let addr = listener.local_addr()?;

    let worker = start_worker(&cfg, stop.child_token(), None).await?;
    let sched_cfg = cfg.clone();
    let sched_stop = stop.child_token();
    let scheduler = tokio::spawn(async move { run_scheduler(&sched_cfg, sched_stop, None).await });
    let api_cfg = cfg.clone();
    let api_stop = stop.child_token();
    let api = tokio::spawn(async move { run_api(&api_cfg, listener, api_stop).await });

    println!();
    println!("  Switchyard dev is running");
    println!("  API:      http://{addr}");
    println!("  API key:  {key}   (tenant `demo`)");
    if let Some(m) = &cfg.llm.mock_base_url {
        println!("  mock LLM: {m}  (models mock-*)");
    }
    println!();
    println!("  try: curl -s -X POST http://{addr}/v1/jobs -H 'Authorization: Bearer {key}' \\");
    println!("         -H 'content-type: application/json' \\");
    println!("         -d '{{\"kind\":\"llm.chat\",\"input\":{{\"model\":\"mock-echo\",\"messages\":[{{\"role\":\"user\",\"content\":\"hello\"}}]}}}}'");
    println!("  OpenAI SDKs: base_url=http://{addr}/v1  api_key={key}  model=mock-echo");
    println!();
    println!("  Ctrl-C stops everything.");

    stop.cancelled().await;
    worker.drain().await;
    let _ = api.await;
    let _ = scheduler.await;
    mock_stop.cancel();
    if let Some(t) = mock_task {
        let _ = t.await;
    }
    drop(services);
    Ok(())
}

#[cfg(test)]
mod migration_tests {
    use super::migration_not_ours;

    #[test]
    fn an_admin_command_goes_on_past_a_schema_it_may_not_or_need_not_migrate() {
        let newer = anyhow::Error::from(sqlx::migrate::MigrateError::VersionMissing(99));
        assert!(migration_not_ours(&newer));
        let other = anyhow::Error::from(sqlx::migrate::MigrateError::VersionMismatch(1));
        assert!(!migration_not_ours(&other));
        assert!(!migration_not_ours(&anyhow::anyhow!("connection refused")));
    }
}
