//! `code.exec`: runs untrusted code in a sandbox tier (wasm or gVisor), streams its stdout and
//! stderr as events while it runs, and returns `{exit_code, stdout, stderr, truncated,
//! killed_by, duration_ms, sandbox, limits}`. A run that started always succeeds; `failed`
//! means the input was unusable or the sandbox broke.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};
use switchyard_core::code::{CodeConfig, CodeExecInput, CodeExecOutput, Limits, Tier};
use switchyard_core::event::types;
use switchyard_core::job::parse_at;
use switchyard_sandbox::{Capture, RunRequest, Sandbox, SandboxError, Source, Utf8Chunks};
use switchyard_store::Store;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::code_metrics::{outcome_label, CodeMetrics};
use crate::executor::{ExecError, Executor, JobContext};

/// How long a tenant's limits are cached by a worker.
const TENANT_LIMITS_TTL: Duration = Duration::from_secs(30);

type Tiers = Result<HashMap<Tier, Arc<dyn Sandbox>>, String>;

pub struct CodeExecExecutor {
    /// Built on first use (or by [`CodeExecExecutor::warm_up`]): compiling the interpreters
    /// takes seconds on a fresh host, and the worker serves its other queues meanwhile.
    sandboxes: tokio::sync::OnceCell<Tiers>,
    cfg: CodeConfig,
    store: Option<Store>,
    tenant_max: Mutex<HashMap<Uuid, (Instant, Limits)>>,
    metrics: Option<CodeMetrics>,
}

impl CodeExecExecutor {
    /// `store` gives per-tenant maximum limits (without one, `cfg.max_limits` applies).
    pub fn new(sandboxes: Vec<Arc<dyn Sandbox>>, cfg: CodeConfig, store: Option<Store>) -> Self {
        let tiers = sandboxes.into_iter().map(|s| (s.tier(), s)).collect();
        CodeExecExecutor {
            sandboxes: tokio::sync::OnceCell::new_with(Some(Ok(tiers))),
            cfg,
            store,
            tenant_max: Mutex::new(HashMap::new()),
            metrics: None,
        }
    }

    /// An executor that builds the tiers `cfg.tiers` names when first needed.
    pub fn lazy(cfg: CodeConfig, store: Option<Store>) -> Self {
        CodeExecExecutor {
            sandboxes: tokio::sync::OnceCell::new(),
            cfg,
            store,
            tenant_max: Mutex::new(HashMap::new()),
            metrics: None,
        }
    }

    /// Counts runs in Redis for `/metrics`.
    pub fn with_metrics(mut self, metrics: CodeMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Builds the sandboxes now (call at start so the first job does not wait).
    pub async fn warm_up(&self) {
        let _ = self.tiers().await;
    }

    async fn tiers(&self) -> &Tiers {
        self.sandboxes
            .get_or_init(|| async {
                let started = Instant::now();
                match build_sandboxes(&self.cfg).await {
                    Ok(v) => {
                        tracing::info!(
                            ms = started.elapsed().as_millis() as u64,
                            tiers = ?v.iter().map(|s| s.tier()).collect::<Vec<_>>(),
                            "code sandboxes ready"
                        );
                        Ok(v.into_iter().map(|s| (s.tier(), s)).collect())
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "code sandboxes unavailable");
                        Err(format!("{e:#}"))
                    }
                }
            })
            .await
    }

    /// The largest limits `tenant` may ask for.
    async fn max_limits(&self, tenant: Uuid) -> Limits {
        let Some(store) = &self.store else {
            return self.cfg.max_limits;
        };
        if let Some((at, l)) = self.tenant_max.lock().await.get(&tenant) {
            if at.elapsed() < TENANT_LIMITS_TTL {
                return *l;
            }
        }
        let limits = match store.tenant_code_limits(tenant).await {
            Ok(Some(own)) => Limits::resolve(Some(own), self.cfg.max_limits, Limits::MAX),
            Ok(None) => self.cfg.max_limits,
            Err(e) => {
                tracing::warn!(error = %e, "tenant code limits unavailable; using the defaults");
                return self.cfg.max_limits;
            }
        };
        self.tenant_max
            .lock()
            .await
            .insert(tenant, (Instant::now(), limits));
        limits
    }
}

fn invalid(e: impl std::fmt::Display) -> ExecError {
    ExecError::fatal("invalid_input", e.to_string())
}

#[async_trait]
impl Executor for CodeExecExecutor {
    async fn execute(&self, ctx: &JobContext) -> Result<Value, ExecError> {
        let input: CodeExecInput = parse_at("input", &ctx.input).map_err(invalid)?;
        input.validate().map_err(invalid)?;
        let tier = self.cfg.tier_for(&input);
        let tiers = self.tiers().await.as_ref().map_err(|e| {
            ExecError::fatal(
                "sandbox_unavailable",
                format!("this worker's sandboxes failed to start: {e}"),
            )
        })?;
        let sandbox = tiers.get(&tier).ok_or_else(|| {
            ExecError::fatal(
                "sandbox_unavailable",
                format!("this worker has no {} sandbox", tier.as_str()),
            )
        })?;
        if !sandbox.supports(input.language) {
            return Err(ExecError::fatal(
                "sandbox_unavailable",
                format!(
                    "the {} sandbox cannot run {} here",
                    tier.as_str(),
                    input.language.as_str()
                ),
            ));
        }
        // never past the hard maximum, whatever the configuration says (a wall time of
        // years overflowed the deadline's arithmetic)
        let max = self.max_limits(ctx.tenant_id).await.min(Limits::MAX);
        let limits = Limits::resolve(input.limits, self.cfg.default_limits.min(max), max);
        let source = match &input.code {
            Some(code) => Source::Code(code.clone()),
            None => Source::Module(input.module().map_err(invalid)?),
        };
        let req = RunRequest {
            language: input.language,
            source,
            stdin: input.stdin.unwrap_or_default().into_bytes(),
            args: input.args,
            files: input
                .files
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect(),
            limits,
        };
        let capture = Arc::new(Capture::new(limits.output_bytes));
        // the sandbox time is counted whatever ends the run: this future dropped by a cancel
        // or the job's `timeout_s` counts the time since the run began
        let mut meter = SandboxMeter {
            used: ctx.sandbox_ms(),
            since: Instant::now(),
            armed: true,
        };
        let run = sandbox.run(req, capture.clone(), ctx.cancel.clone());
        tokio::pin!(run);
        let mut fwd = Forwarder::default();
        let outcome = loop {
            tokio::select! {
                r = &mut run => break r,
                _ = capture.changed() => {
                    // the run is polled while output waits for room in the event channel: it
                    // holds the sandbox's deadline, CPU and cancel checks (a slow Redis let a
                    // program run past its limits)
                    let forwarding = fwd.forward(ctx, &capture, false);
                    tokio::pin!(forwarding);
                    let mut ended = None;
                    loop {
                        tokio::select! {
                            _ = &mut forwarding => break,
                            r = &mut run, if ended.is_none() => ended = Some(r),
                        }
                    }
                    if let Some(r) = ended {
                        break r;
                    }
                }
            }
        };
        fwd.forward(ctx, &capture, true).await;
        if let (Some(m), Err(_)) = (&self.metrics, &outcome) {
            m.record(
                tier,
                input.language,
                "error",
                0,
                0,
                &sandbox.pool_sizes().await,
            )
            .await;
        }
        let outcome = outcome.map_err(|e| match e {
            SandboxError::Unsupported(m) => ExecError::fatal("sandbox_unavailable", m),
            SandboxError::InvalidModule(m) => ExecError::fatal("invalid_module", m),
            SandboxError::Internal(e) => {
                tracing::error!(error = %e, "sandbox failure");
                ExecError::retryable("sandbox_error", "the sandbox failed; see the worker log")
            }
        })?;
        meter.ran(outcome.duration);
        let (stdout, stderr, truncated) = capture.finish();
        let out = CodeExecOutput {
            exit_code: outcome.exit_code,
            stdout,
            stderr,
            truncated,
            killed_by: outcome.killed_by,
            duration_ms: outcome.duration.as_millis() as u64,
            sandbox: tier,
            limits,
        };
        if let Some(m) = &self.metrics {
            m.record(
                tier,
                input.language,
                outcome_label(&out),
                out.duration_ms,
                outcome.start.as_millis() as u64,
                &sandbox.pool_sizes().await,
            )
            .await;
        }
        serde_json::to_value(out).map_err(ExecError::internal)
    }
}

/// Streams new output as `stdout`/`stderr` events, decoding UTF-8 across chunk boundaries.
#[derive(Default)]
struct Forwarder {
    offsets: [usize; 2],
    decoders: [Utf8Chunks; 2],
}

impl Forwarder {
    async fn forward(&mut self, ctx: &JobContext, capture: &Capture, end: bool) {
        let new = capture.take_new(&mut self.offsets);
        for (i, bytes) in new.iter().enumerate() {
            let mut text = self.decoders[i].push(bytes);
            if end {
                text.push_str(&self.decoders[i].finish());
            }
            if !text.is_empty() {
                let kind = if i == 0 { types::STDOUT } else { types::STDERR };
                ctx.event(kind, json!({ "text": text })).await;
            }
        }
    }
}

/// Builds the sandbox tiers `cfg.tiers` names (blocking work runs off the async threads).
/// The wasm tier compiles its interpreters on first use of a work directory (seconds).
pub async fn build_sandboxes(cfg: &CodeConfig) -> anyhow::Result<Vec<Arc<dyn Sandbox>>> {
    let mut out: Vec<Arc<dyn Sandbox>> = Vec::new();
    for tier in &cfg.tiers {
        match tier {
            Tier::Wasm => {
                let slots = cfg.concurrency.unwrap_or_else(default_concurrency) as u32;
                let wcfg = switchyard_sandbox::wasm::WasmConfig {
                    runtimes_dir: cfg.sandbox_dir().join("wasm"),
                    cache_dir: cfg.work_dir().join("cwasm"),
                    scratch_dir: cfg.work_dir().join("scratch"),
                    slots,
                    max_memory_mb: Limits::MAX.memory_mb,
                    compile_timeout: Duration::from_millis(cfg.compile_timeout_ms),
                };
                let sb = tokio::task::spawn_blocking(move || {
                    switchyard_sandbox::wasm::WasmSandbox::new(wcfg)
                })
                .await??;
                out.push(Arc::new(sb));
            }
            Tier::Gvisor => {
                let mut g = switchyard_sandbox::gvisor::GvisorConfig::new(
                    &cfg.sandbox_dir(),
                    &cfg.work_dir(),
                );
                g.pool_size = cfg.gvisor_pool;
                g.pool_memory_mb = cfg.default_limits.memory_mb;
                let sb = switchyard_sandbox::gvisor::GvisorSandbox::new(g).await?;
                out.push(Arc::new(sb));
            }
        }
    }
    Ok(out)
}

/// Whether the tiers `cfg.tiers` names can work here, checked without building them: a
/// worker that fails this leaves the `code` queue alone.
pub fn check_tiers(cfg: &CodeConfig) -> anyhow::Result<()> {
    anyhow::ensure!(!cfg.tiers.is_empty(), "code.tiers is empty");
    for tier in &cfg.tiers {
        if *tier == Tier::Gvisor {
            let rootfs = cfg.sandbox_dir().join("gvisor/rootfs");
            anyhow::ensure!(
                rootfs.join("opt/switchyard").is_dir(),
                "no gVisor rootfs at {}: run sandbox-images/gvisor/build-rootfs.sh",
                rootfs.display()
            );
        }
    }
    Ok(())
}

/// Code jobs at once when `code.concurrency` is not set: one per CPU.
pub fn default_concurrency() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// Adds a run's sandbox time to its job's count: the time the sandbox reports once the run
/// ended, or (dropped before, or failed) the time since the run began.
struct SandboxMeter {
    used: Arc<std::sync::atomic::AtomicU64>,
    since: Instant,
    armed: bool,
}

impl SandboxMeter {
    fn ran(&mut self, took: Duration) {
        self.armed = false;
        self.used.fetch_add(
            took.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

impl Drop for SandboxMeter {
    fn drop(&mut self) {
        if self.armed {
            let ms = self.since.elapsed().as_millis() as u64;
            self.used
                .fetch_add(ms, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
