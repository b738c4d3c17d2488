//! The WebAssembly tier: WASI preview 1 programs inside the worker process (wasmtime).
//!
//! Interpreters (CPython, QuickJS-NG; fetched by `sandbox-images/wasm/fetch.sh`) are compiled
//! once (cached as `.cwasm`) and pre-linked (`InstancePre`); each run gets a fresh `Store` with
//! its own memory limit, an empty environment, no sockets, stdin from memory, stdout/stderr into
//! the run's [`Capture`], and one preopened directory: a fresh scratch directory at `/work`
//! holding the program and its `files`. Wall time, CPU time and cancellation are checked at
//! every epoch tick (10 ms) on the thread that runs the guest.

mod disk;
mod engine;
mod stdio;

pub use disk::{DISK_BYTES, DISK_FILES};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use async_trait::async_trait;
use switchyard_core::code::{KilledBy, Language, Tier};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use wasmtime::{
    Engine, InstancePre, Linker, Module, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder,
    UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::output::{Capture, Stream};
use crate::scratch::Scratch;
use crate::{RunOutcome, RunRequest, Sandbox, SandboxError, Source};
pub use engine::TICK;
use engine::{ModuleCache, Ticker};

/// Where the guest sees its working directory.
pub const GUEST_DIR: &str = "/work";

/// Settings of the wasm tier.
#[derive(Debug, Clone)]
pub struct WasmConfig {
    /// Holds `python.wasm` and `quickjs.wasm` (either may be missing: that language is then
    /// unsupported here).
    pub runtimes_dir: PathBuf,
    /// Compiled modules (`.cwasm`).
    pub cache_dir: PathBuf,
    /// Parent of the per-run scratch directories.
    pub scratch_dir: PathBuf,
    /// Runs at once (the size of the instance pool).
    pub slots: u32,
    /// The largest memory limit any run may have.
    pub max_memory_mb: u64,
    /// Longest time to compile a user's module.
    pub compile_timeout: Duration,
}

/// An interpreter: its pre-linked module and how its command line is built.
struct Interpreter {
    pre: InstancePre<RunState>,
    argv0: &'static str,
    flags: &'static [&'static str],
    file: &'static str,
}

/// Per-run state of a `Store`.
struct RunState {
    wasi: WasiP1Ctx,
    limits: Limiter,
}

/// `StoreLimits` (memory, trap on grow failure) that remembers that the limit was hit.
struct Limiter {
    inner: StoreLimits,
    memory_hit: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let r = self.inner.memory_growing(current, desired, maximum);
        if !matches!(r, Ok(true)) {
            self.memory_hit = true;
        }
        r
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// The wasm sandbox. Cheap to share (`Arc`).
pub struct WasmSandbox {
    engine: Engine,
    linker: Arc<Linker<RunState>>,
    interpreters: HashMap<Language, Arc<Interpreter>>,
    slots: Arc<Semaphore>,
    /// User modules compiling at once (half the cores): a compile cannot be stopped, so one
    /// that ran past its limit goes on to the end (holding its permit), and without a bound a
    /// tenant sending slow-compiling modules piled compiles up over every core.
    compiles: Arc<Semaphore>,
    cfg: WasmConfig,
    _ticker: Ticker,
    /// This process's part of the scratch directory (runs' working directories).
    scratch: crate::owned_dir::OwnedDir,
}

impl WasmSandbox {
    /// Builds the engine and loads the interpreters found in `runtimes_dir` (compiling them
    /// on first use of a cache directory: seconds for CPython). Blocking.
    pub fn new(cfg: WasmConfig) -> anyhow::Result<WasmSandbox> {
        let engine = engine::build_engine(cfg.slots.max(1), cfg.max_memory_mb)?;
        let mut linker: Linker<RunState> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut RunState| &mut s.wasi)
            .map_err(|e| anyhow!("linking WASI: {e:#}"))?;
        // WASI refuses exit statuses of 126 and above with a trap, which would be reported as
        // a crash (134): a guest's `exit(200)` ends with 200, and larger statuses keep their
        // low byte, as on a POSIX host
        linker.allow_shadowing(true);
        linker
            .func_wrap(
                "wasi_snapshot_preview1",
                "proc_exit",
                |status: i32| -> wasmtime::Result<()> { Err(I32Exit(status & 0xff).into()) },
            )
            .map_err(|e| anyhow!("linking proc_exit: {e:#}"))?;
        linker.allow_shadowing(false);
        let cache = ModuleCache::new(&engine, &cfg.cache_dir)?;
        let mut interpreters = HashMap::new();
        let specs: [(
            Language,
            &str,
            &'static str,
            &'static [&'static str],
            &'static str,
        ); 2] = [
            (
                Language::Python,
                "python.wasm",
                "python",
                &["-I", "-B"],
                "main.py",
            ),
            (
                Language::Javascript,
                "quickjs.wasm",
                "qjs",
                &["--std"],
                "main.js",
            ),
        ];
        for (lang, file, argv0, flags, main) in specs {
            let path = cfg.runtimes_dir.join(file);
            let Ok(bytes) = std::fs::read(&path) else {
                tracing::warn!(path = %path.display(), "wasm runtime missing: {} unavailable (run sandbox-images/wasm/fetch.sh)", lang.as_str());
                continue;
            };
            let started = Instant::now();
            let module = cache.load(&engine, &bytes)?;
            let pre = linker
                .instantiate_pre(&module)
                .map_err(|e| anyhow!("linking {file}: {e:#}"))?;
            tracing::info!(
                language = lang.as_str(),
                ms = started.elapsed().as_millis() as u64,
                "wasm runtime ready"
            );
            interpreters.insert(
                lang,
                Arc::new(Interpreter {
                    pre,
                    argv0,
                    flags,
                    file: main,
                }),
            );
        }
        let ticker = Ticker::start(engine.clone())?;
        // a worker killed mid-run left its runs' directories (tenants' files, up to the disk
        // cap each): the part of the scratch directory this process takes over is cleared
        let scratch = crate::owned_dir::OwnedDir::claim(&cfg.scratch_dir)?;
        if let Ok(entries) = std::fs::read_dir(scratch.path()) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("run-") {
                    tracing::info!(dir = %e.path().display(), "removing a run directory left by an earlier worker");
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(WasmSandbox {
            slots: Arc::new(Semaphore::new(cfg.slots.max(1) as usize)),
            compiles: Arc::new(Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            )),
            engine,
            linker: Arc::new(linker),
            interpreters,
            cfg,
            _ticker: ticker,
            scratch,
        })
    }

    /// Compiles and links a user's module within the compile time limit. Waiting for a
    /// compile permit (other compiles running) is not the module's fault: a wait as long as
    /// the limit fails the attempt as retryable, not the module as invalid.
    async fn user_module(&self, bytes: Vec<u8>) -> Result<InstancePre<RunState>, SandboxError> {
        let limit = self.cfg.compile_timeout;
        let permit = tokio::time::timeout(limit, self.compiles.clone().acquire_owned())
            .await
            .map_err(|_| {
                SandboxError::Internal(anyhow!(
                    "no compile slot free for {} ms (other modules compiling)",
                    limit.as_millis()
                ))
            })?
            .map_err(|e| SandboxError::Internal(anyhow!("compile permit: {e}")))?;
        let (engine, linker) = (self.engine.clone(), self.linker.clone());
        let job = tokio::task::spawn_blocking(move || {
            // held until this compile ends, however long after its job gave up
            let _permit = permit;
            compile(&engine, &linker, &bytes)
        });
        match tokio::time::timeout(limit, job).await {
            Err(_) => Err(SandboxError::InvalidModule(format!(
                "module took longer than {} ms to compile",
                limit.as_millis()
            ))),
            Ok(Err(e)) => Err(SandboxError::Internal(anyhow!("compile task: {e}"))),
            Ok(Ok(Err(msg))) => Err(SandboxError::InvalidModule(msg)),
            Ok(Ok(Ok(pre))) => Ok(pre),
        }
    }
}

/// Compiles and links a module (CPU work: on a blocking thread).
fn compile(
    engine: &Engine,
    linker: &Linker<RunState>,
    bytes: &[u8],
) -> Result<InstancePre<RunState>, String> {
    let module = Module::new(engine, bytes).map_err(|e| format!("invalid module: {e:#}"))?;
    linker
        .instantiate_pre(&module)
        .map_err(|e| format!("module cannot run here (WASI preview 1 only): {e:#}"))
}

#[async_trait]
impl Sandbox for WasmSandbox {
    fn tier(&self) -> Tier {
        Tier::Wasm
    }

    fn supports(&self, language: Language) -> bool {
        language == Language::Wasm || self.interpreters.contains_key(&language)
    }

    async fn run(
        &self,
        req: RunRequest,
        capture: Arc<Capture>,
        cancel: CancellationToken,
    ) -> Result<RunOutcome, SandboxError> {
        let entered = Instant::now();
        let mut files = req.files.clone();
        let (pre, argv) = match (&req.source, req.language) {
            (Source::Module(bytes), Language::Wasm) => {
                let pre = tokio::select! {
                    r = self.user_module(bytes.clone()) => r?,
                    _ = cancel.cancelled() => return Ok(RunOutcome::cancelled()),
                };
                let mut argv = vec!["main.wasm".to_string()];
                argv.extend(req.args.iter().cloned());
                (pre, argv)
            }
            (Source::Code(code), lang) => {
                let interp = self.interpreters.get(&lang).ok_or_else(|| {
                    SandboxError::Unsupported(format!(
                        "the wasm sandbox has no {} runtime installed",
                        lang.as_str()
                    ))
                })?;
                if files.contains_key(interp.file) {
                    return Err(SandboxError::Unsupported(format!(
                        "`files` may not contain `{}`: the program is stored there",
                        interp.file
                    )));
                }
                files.insert(interp.file.to_string(), code.as_bytes().to_vec());
                let mut argv = vec![interp.argv0.to_string()];
                argv.extend(interp.flags.iter().map(|s| s.to_string()));
                argv.push(format!("{GUEST_DIR}/{}", interp.file));
                argv.extend(req.args.iter().cloned());
                (interp.pre.clone(), argv)
            }
            (Source::Module(_), lang) => {
                return Err(SandboxError::Unsupported(format!(
                    "a module cannot be run as {}",
                    lang.as_str()
                )))
            }
        };
        let slot = tokio::select! {
            s = self.slots.clone().acquire_owned() => {
                s.map_err(|_| SandboxError::Internal(anyhow!("sandbox closed")))?
            }
            _ = cancel.cancelled() => return Ok(RunOutcome::cancelled()),
        };
        // the guest stops when this future is dropped (a job's `timeout_s`), not only when
        // the run is cancelled: it would otherwise run on, holding an engine instance
        let cancel = cancel.child_token();
        let _stop_when_dropped = cancel.clone().drop_guard();
        let scratch_base = self.scratch.path().to_path_buf();
        let stdin = req.stdin.clone();
        let limits = req.limits;
        let cap = capture.clone();
        // The guest runs on its own thread with a private single-threaded runtime, so WASI
        // calls that block (sleep, reads) never hold an async thread of the worker, and a
        // deadline or a cancellation simply drops the guest's future.
        let task = tokio::task::spawn_blocking(move || -> anyhow::Result<Ended> {
            // the slot is the engine's instance: given back when the guest has ended, not when
            // the run's future goes (the next run would find no instance and report a trap)
            let _slot = slot;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()?;
            let scratch = Scratch::create(&scratch_base, &files)
                .map_err(|e| anyhow!("scratch directory: {e}"))?;
            let ended = rt.block_on(run_guest(
                &pre,
                scratch.path(),
                &argv,
                stdin,
                limits,
                cap,
                cancel,
            ));
            drop(scratch);
            ended
        });
        let ended = task
            .await
            .map_err(|e| SandboxError::Internal(anyhow!("run task: {e}")))??;
        let killed_by = match ended.stop {
            Some(Stop::Timeout) => Some(KilledBy::Timeout),
            Some(Stop::Cpu) => Some(KilledBy::Cpu),
            Some(Stop::Disk) => Some(KilledBy::Disk),
            Some(Stop::Cancelled) => None,
            None if capture.exceeded() => Some(KilledBy::Output),
            None if ended.memory_hit => Some(KilledBy::Memory),
            None => None,
        };
        let exit_code = match ended.end {
            End::Exit(c) => Some(c),
            End::Trap(msg) if killed_by.is_none() && ended.stop.is_none() => {
                capture.write(Stream::Stderr, format!("\n[wasm trap] {msg}\n").as_bytes());
                Some(TRAP_EXIT_CODE)
            }
            End::Trap(_) | End::Stopped => None,
        };
        capture.wake();
        Ok(RunOutcome {
            exit_code,
            killed_by,
            duration: ended.duration,
            start: ended.started_at.saturating_duration_since(entered),
        })
    }
}

/// Exit status reported for a guest that trapped on its own (like a native crash, SIGABRT).
pub const TRAP_EXIT_CODE: i32 = 134;

enum End {
    Exit(i32),
    Trap(String),
    /// Dropped by the host (deadline, cancellation).
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Timeout,
    Cpu,
    Disk,
    Cancelled,
}

struct Ended {
    started_at: Instant,
    end: End,
    stop: Option<Stop>,
    memory_hit: bool,
    duration: Duration,
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

async fn run_guest(
    pre: &InstancePre<RunState>,
    dir: &Path,
    argv: &[String],
    stdin: Vec<u8>,
    limits: switchyard_core::code::Limits,
    capture: Arc<Capture>,
    cancel: CancellationToken,
) -> anyhow::Result<Ended> {
    let mut b = WasiCtxBuilder::new();
    b.args(argv)
        .stdin(MemoryInputPipe::new(stdin))
        .stdout(stdio::CaptureStream::new(capture.clone(), Stream::Stdout))
        .stderr(stdio::CaptureStream::new(capture, Stream::Stderr))
        // the program's directory, at `/work` and at `/`: wasi-libc resolves relative paths
        // from `/`, so `open('data.txt')` finds `/work/data.txt`
        .preopened_dir(dir, GUEST_DIR, FsPerms::ReadWrite)
        .and_then(|b| b.preopened_dir(dir, "/", FsPerms::ReadWrite))
        .map_err(|e| anyhow!("preopen: {e:#}"))?;
    let mem = usize::try_from(limits.memory_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
    let state = RunState {
        wasi: b.build_p1(),
        limits: Limiter {
            inner: StoreLimitsBuilder::new()
                .memory_size(mem)
                .instances(1)
                .trap_on_grow_failure(true)
                .build(),
            memory_hit: false,
        },
    };
    let mut store = Store::new(pre.module().engine(), state);
    store.limiter(|s| &mut s.limits);
    let started = Instant::now();
    let cpu0 = thread_cpu();
    let cpu = Duration::from_millis(limits.cpu_ms);
    let cpu_hit = Arc::new(AtomicBool::new(false));
    let flag = cpu_hit.clone();
    // every tick: stop on CPU time (measured on this thread), else yield so the deadline
    // and cancellation below are checked
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if thread_cpu().saturating_sub(cpu0) >= cpu {
            flag.store(true, Ordering::Relaxed);
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(UpdateDeadline::Yield(1))
    });
    let deadline = tokio::time::Instant::from_std(started) + Duration::from_millis(limits.wall_ms);
    let guest = async {
        let instance = pre.instantiate_async(&mut store).await?;
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
        start.call_async(&mut store, ()).await
    };
    let (end, mut stop) = tokio::select! {
        r = guest => (match r {
            Ok(()) => End::Exit(0),
            Err(e) => match e.downcast_ref::<I32Exit>() {
                Some(exit) => End::Exit(exit.0),
                None => End::Trap(format!("{e:#}")),
            },
        }, None),
        _ = tokio::time::sleep_until(deadline) => (End::Stopped, Some(Stop::Timeout)),
        _ = cancel.cancelled() => (End::Stopped, Some(Stop::Cancelled)),
        _ = disk::filled(dir) => (End::Stopped, Some(Stop::Disk)),
    };
    let duration = started.elapsed();
    if stop.is_none() && cpu_hit.load(Ordering::Relaxed) {
        stop = Some(Stop::Cpu);
    }
    Ok(Ended {
        started_at: started,
        end,
        stop,
        memory_hit: store.data().limits.memory_hit,
        duration,
    })
}
