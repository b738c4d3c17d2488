//! The gVisor tier: each program runs in its own `runsc` sandbox (OCI bundle over a read-only
//! rootfs built by `sandbox-images/gvisor/`), as uid 65534 without capabilities, environment
//! or network, under a memory cgroup the worker limits itself.
//!
//! A warm pool per language keeps sandboxes started with the loader waiting on stdin; a job
//! takes one (or starts one cold), sends its program, files and stdin through that stdin —
//! never through a shared directory — and reads stdout/stderr from pipes. The worker enforces
//! wall time, CPU time (the sandbox's `cpuacct`) and the output budget, and destroys each
//! sandbox after its one job.

mod cgroup;
mod sandbox_box;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use async_trait::async_trait;
use base64::Engine as _;
use serde_json::json;
use switchyard_core::code::{KilledBy, Language, Tier};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Mutex, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::output::{Capture, Stream};
use crate::{RunOutcome, RunRequest, Sandbox, SandboxError, Source};
pub use sandbox_box::Runsc;
use sandbox_box::SandboxBox;

/// Settings of the gVisor tier.
#[derive(Debug, Clone)]
pub struct GvisorConfig {
    /// The `runsc` binary.
    pub runsc: PathBuf,
    /// The sandbox root filesystem (read-only; `sandbox-images/gvisor/build-rootfs.sh`).
    pub rootfs: PathBuf,
    /// This worker's private directory: runsc state and bundles.
    pub state_dir: PathBuf,
    /// runsc platform (`ptrace` works everywhere; `systrap`/`kvm` where supported).
    pub platform: String,
    /// Started sandboxes kept waiting per language (0: always cold starts).
    pub pool_size: usize,
    /// Memory limit of a waiting sandbox until a job sets its own.
    pub pool_memory_mb: u64,
    /// `pids.max` of a sandbox (gVisor's own threads count: keep it generous).
    pub pids: u32,
    /// Processes the program may have (`RLIMIT_NPROC`, enforced inside gVisor): what stops
    /// a fork bomb.
    pub nproc: u32,
    /// CPU quota per 100 ms period (100000 = one core).
    pub cpu_quota_us: u64,
    /// Size of the `/work` tmpfs (counts against the memory limit when used).
    pub work_mb: u64,
    /// Longest time a sandbox may take to start.
    pub start_timeout: Duration,
}

impl GvisorConfig {
    /// Defaults for runtimes under `sandbox_dir` and state under `work_dir`.
    pub fn new(sandbox_dir: &std::path::Path, work_dir: &std::path::Path) -> GvisorConfig {
        GvisorConfig {
            runsc: PathBuf::from("runsc"),
            rootfs: sandbox_dir.join("gvisor/rootfs"),
            state_dir: work_dir.join("gvisor"),
            platform: "ptrace".into(),
            pool_size: 2,
            pool_memory_mb: 128,
            pids: 512,
            nproc: 64,
            cpu_quota_us: 100_000,
            work_mb: 64,
            start_timeout: Duration::from_secs(10),
        }
    }
}

struct Pool {
    ready: Mutex<mpsc::Receiver<SandboxBox>>,
}

/// The gVisor sandbox tier.
pub struct GvisorSandbox {
    cfg: GvisorConfig,
    runsc: Arc<Runsc>,
    pools: HashMap<Language, Pool>,
    languages: Vec<Language>,
    stop: CancellationToken,
    tasks: TaskTracker,
    /// This process's part of the state directory (`cfg.state_dir` points into it).
    _state: crate::owned_dir::OwnedDir,
}

impl GvisorSandbox {
    /// Checks runsc and the rootfs, removes sandboxes an earlier worker left, and starts
    /// filling the warm pools. Workers sharing `state_dir` each take a part of their own
    /// ([`crate::owned_dir`]): one's start never removes another's live sandboxes.
    pub async fn new(mut cfg: GvisorConfig) -> anyhow::Result<GvisorSandbox> {
        let bin = which(&cfg.runsc).ok_or_else(|| {
            anyhow!(
                "{} not found: install gVisor (Debian: apt-get install runsc)",
                cfg.runsc.display()
            )
        })?;
        let mut languages = Vec::new();
        for (lang, exe) in [
            (Language::Python, "usr/bin/python3"),
            (Language::Javascript, "usr/bin/node"),
        ] {
            if cfg.rootfs.join(exe).exists() {
                languages.push(lang);
            }
        }
        anyhow::ensure!(
            !languages.is_empty(),
            "no sandbox rootfs at {}: run sandbox-images/gvisor/build-rootfs.sh",
            cfg.rootfs.display()
        );
        let state = crate::owned_dir::OwnedDir::claim(&cfg.state_dir)?;
        cfg.state_dir = state.path().to_path_buf();
        std::fs::create_dir_all(cfg.state_dir.join("runsc"))?;
        let runsc = Arc::new(Runsc {
            bin,
            root: cfg.state_dir.join("runsc"),
            platform: cfg.platform.clone(),
        });
        runsc.delete_leftovers(&cfg.state_dir.join("bundles")).await;
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mut pools = HashMap::new();
        if cfg.pool_size > 0 {
            for &lang in &languages {
                let (tx, rx) = mpsc::channel(cfg.pool_size);
                tasks.spawn(refill(cfg.clone(), runsc.clone(), lang, tx, stop.clone()));
                pools.insert(
                    lang,
                    Pool {
                        ready: Mutex::new(rx),
                    },
                );
            }
        }
        Ok(GvisorSandbox {
            cfg,
            runsc,
            pools,
            languages,
            stop,
            tasks,
            _state: state,
        })
    }

    /// Sandboxes waiting in the pool of `language`.
    pub async fn pool_len(&self, language: Language) -> usize {
        match self.pools.get(&language) {
            Some(p) => p.ready.lock().await.len(),
            None => 0,
        }
    }

    /// Stops refilling and destroys the waiting sandboxes.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        for p in self.pools.values() {
            let mut rx = p.ready.lock().await;
            while let Ok(mut b) = rx.try_recv() {
                b.destroy().await;
            }
        }
    }

    /// A ready sandbox for `language` with `memory_mb`: from the pool, else started now.
    /// Returns whether it came from the pool.
    async fn take(&self, language: Language, memory_mb: u64) -> anyhow::Result<(SandboxBox, bool)> {
        if let Some(pool) = self.pools.get(&language) {
            loop {
                let next = pool.ready.lock().await.try_recv();
                let Ok(mut b) = next else { break };
                if !b.alive() {
                    b.destroy().await;
                    continue;
                }
                match b.cgroups.set_memory_mb(memory_mb) {
                    Ok(()) => return Ok((b, true)),
                    Err(e) => {
                        tracing::debug!(error = %e, "pooled sandbox cannot take this memory limit");
                        b.destroy().await;
                        break;
                    }
                }
            }
        }
        let b = SandboxBox::start(&self.cfg, self.runsc.clone(), language, memory_mb).await?;
        Ok((b, false))
    }
}

impl Drop for GvisorSandbox {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Keeps `pool_size` sandboxes of `language` ready.
async fn refill(
    cfg: GvisorConfig,
    runsc: Arc<Runsc>,
    language: Language,
    tx: mpsc::Sender<SandboxBox>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = tx.reserve() => match p { Ok(p) => p, Err(_) => return },
        };
        let started = tokio::select! {
            _ = stop.cancelled() => return,
            b = SandboxBox::start(&cfg, runsc.clone(), language, cfg.pool_memory_mb) => b,
        };
        match started {
            Ok(b) => {
                failures = 0;
                permit.send(b);
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, language = language.as_str(), "could not start a pooled sandbox");
                let wait = Duration::from_millis(250 * 2u64.pow(failures.min(6)));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

fn which(bin: &std::path::Path) -> Option<PathBuf> {
    if bin.components().count() > 1 {
        return bin.exists().then(|| bin.to_path_buf());
    }
    std::env::var_os("PATH")
        .into_iter()
        .chain(["/usr/sbin:/usr/bin:/sbin:/bin".into()])
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Copies a pipe into the capture; wakes `exceeded` and stops once the budget is spent.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    capture: &Capture,
    stream: Stream,
    exceeded: &Notify,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if !capture.write(stream, &buf[..n]) {
                    exceeded.notify_one();
                    return;
                }
            }
        }
    }
}

/// Resolves once the sandbox used `limit` of CPU time beyond `base`.
async fn cpu_spent(cg: &cgroup::Cgroups, base: u64, limit: Duration) {
    let limit_ns = limit.as_nanos() as u64;
    loop {
        tokio::time::sleep(Duration::from_millis(25)).await;
        if cg
            .cpu_ns()
            .is_some_and(|n| n.saturating_sub(base) >= limit_ns)
        {
            return;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    Limit(KilledBy),
    Cancelled,
}

#[async_trait]
impl Sandbox for GvisorSandbox {
    fn tier(&self) -> Tier {
        Tier::Gvisor
    }

    fn supports(&self, language: Language) -> bool {
        self.languages.contains(&language)
    }

    async fn pool_sizes(&self) -> Vec<(Language, usize)> {
        let mut out = Vec::new();
        for &l in &self.languages {
            out.push((l, self.pool_len(l).await));
        }
        out
    }

    async fn run(
        &self,
        req: RunRequest,
        capture: Arc<Capture>,
        cancel: CancellationToken,
    ) -> Result<RunOutcome, SandboxError> {
        let (interp, main) = match req.language {
            Language::Python => ("python3", "main.py"),
            Language::Javascript => ("node", "main.js"),
            Language::Wasm => {
                return Err(SandboxError::Unsupported(
                    "WebAssembly modules run in the wasm sandbox".into(),
                ))
            }
        };
        if !self.supports(req.language) {
            return Err(SandboxError::Unsupported(format!(
                "the gvisor sandbox has no {} runtime installed",
                req.language.as_str()
            )));
        }
        let Source::Code(code) = &req.source else {
            return Err(SandboxError::Unsupported("gVisor runs source code".into()));
        };
        if req.files.contains_key(main) {
            return Err(SandboxError::Unsupported(format!(
                "`files` may not contain `{main}`: the program is stored there"
            )));
        }
        let mut files = serde_json::Map::new();
        for (path, bytes) in &req.files {
            let v = match std::str::from_utf8(bytes) {
                Ok(s) => json!(s),
                Err(_) => {
                    json!({"base64": base64::engine::general_purpose::STANDARD.encode(bytes)})
                }
            };
            files.insert(path.clone(), v);
        }
        files.insert(main.into(), json!(code));
        let mut argv = vec![interp.to_string(), main.to_string()];
        argv.extend(req.args.iter().cloned());
        let payload = serde_json::to_vec(&json!({"argv": argv, "files": files, "cwd": "/work"}))
            .map_err(|e| SandboxError::Internal(e.into()))?;

        let limits = req.limits;
        let entered = Instant::now();
        // a cancellation while the sandbox starts ends the run at once (a half-started
        // sandbox is cleaned up when its start is dropped)
        let taken = tokio::select! {
            r = self.take(req.language, limits.memory_mb) => r,
            _ = cancel.cancelled() => return Ok(RunOutcome::cancelled()),
        };
        let (mut b, _pooled) = taken.map_err(SandboxError::Internal)?;
        let cpu_base = b.cgroups.cpu_ns().unwrap_or(0);
        let started = Instant::now();
        let start = started - entered;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(limits.wall_ms);
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (b.stdin.take(), b.stdout.take(), b.stderr.take())
        else {
            b.destroy().await;
            return Err(SandboxError::Internal(anyhow!("sandbox pipes missing")));
        };
        let exceeded = Notify::new();
        let user_stdin = req.stdin;
        let writer = async move {
            let _ = stdin
                .write_all(format!("{}\n", payload.len()).as_bytes())
                .await;
            let _ = stdin.write_all(&payload).await;
            let _ = stdin.write_all(&user_stdin).await;
            let _ = stdin.shutdown().await;
        };
        let SandboxBox { child, cgroups, .. } = &mut b;
        let cgroups = &*cgroups;
        let io_and_exit = async {
            tokio::join!(
                writer,
                pump(stdout, &capture, Stream::Stdout, &exceeded),
                pump(stderr, &capture, Stream::Stderr, &exceeded),
            );
            child.wait().await
        };
        let ended = tokio::select! {
            status = io_and_exit => Ok(status),
            _ = tokio::time::sleep_until(deadline) => Err(Stop::Limit(KilledBy::Timeout)),
            _ = cpu_spent(cgroups, cpu_base, Duration::from_millis(limits.cpu_ms)) => Err(Stop::Limit(KilledBy::Cpu)),
            _ = exceeded.notified() => Err(Stop::Limit(KilledBy::Output)),
            _ = cancel.cancelled() => Err(Stop::Cancelled),
        };
        let duration = started.elapsed();
        let oom = b.cgroups.oom_killed();
        // kill (if still running) and clean up without making the job wait for the teardown
        self.tasks.spawn(async move { b.destroy().await });
        capture.wake();
        let outcome = match ended {
            Ok(Ok(status)) if oom => {
                let _ = status;
                RunOutcome {
                    exit_code: None,
                    killed_by: Some(KilledBy::Memory),
                    duration,
                    start,
                }
            }
            Ok(Ok(status)) => RunOutcome {
                exit_code: Some(status.code().unwrap_or_else(|| {
                    use std::os::unix::process::ExitStatusExt;
                    128 + status.signal().unwrap_or(0)
                })),
                killed_by: None,
                duration,
                start,
            },
            Ok(Err(e)) => return Err(SandboxError::Internal(anyhow!("waiting for runsc: {e}"))),
            // we stopped it for this limit (an OOM kill would have ended the run by itself)
            Err(Stop::Limit(by)) => RunOutcome {
                exit_code: None,
                killed_by: Some(by),
                duration,
                start,
            },
            Err(Stop::Cancelled) => RunOutcome {
                exit_code: None,
                killed_by: None,
                duration,
                start,
            },
        };
        Ok(outcome)
    }
}
