//! The wasmtime engine of the wasm tier (Cranelift, pooling allocator, epoch interruption), its
//! epoch ticker thread, and the on-disk cache of compiled modules (`.cwasm`).
//!
//! Only `.cwasm` files this process family wrote are ever deserialized: each is stored with
//! the SHA-256 of its contents in a sidecar, checked before loading, in a directory we create
//! with mode 0700.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, Module, PoolingAllocationConfig};

/// How often the epoch advances: the resolution of wall/CPU limits and cancellation.
pub const TICK: Duration = Duration::from_millis(10);

/// Builds the engine. `slots` is how many instances may exist at once (pool size);
/// `max_memory_mb` the largest linear memory any run may get.
pub fn build_engine(slots: u32, max_memory_mb: u64) -> anyhow::Result<Engine> {
    let mut pool = PoolingAllocationConfig::new();
    let max_mem = usize::try_from(max_memory_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
    pool.total_core_instances(slots)
        .total_memories(slots)
        .total_tables(slots)
        .total_stacks(slots)
        .max_memory_size(max_mem)
        .max_core_instance_size(4 << 20)
        .table_elements(100_000)
        .max_unused_warm_slots(slots.min(8));
    let mut cfg = Config::new();
    cfg.strategy(wasmtime::Strategy::Cranelift)
        .epoch_interruption(true)
        .max_wasm_stack(1 << 20)
        .async_stack_size(2 << 20)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&cfg).map_err(|e| anyhow!("wasmtime engine: {e:#}"))
}

/// Advances the engine's epoch every [`TICK`] until dropped.
pub struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    pub fn start(engine: Engine) -> std::io::Result<Ticker> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    engine.increment_epoch();
                }
            })?;
        Ok(Ticker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Compiled modules on disk, keyed by the module's SHA-256 and the engine's settings.
pub struct ModuleCache {
    dir: PathBuf,
    engine_key: String,
}

impl ModuleCache {
    pub fn new(engine: &Engine, dir: &Path) -> anyhow::Result<ModuleCache> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the module cache {}", dir.display()))?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Ok(ModuleCache {
            dir: dir.to_path_buf(),
            engine_key: format!("{:016x}", h.finish()),
        })
    }

    /// The module for `wasm`: from the cache if a verified entry exists, else compiled (and
    /// stored for next time). Blocking: call off the async threads.
    pub fn load(&self, engine: &Engine, wasm: &[u8]) -> anyhow::Result<Module> {
        let key = hex::encode(Sha256::digest(wasm));
        let stem = format!("{key}-{}", self.engine_key);
        let cwasm = self.dir.join(format!("{stem}.cwasm"));
        let digest_file = self.dir.join(format!("{stem}.sha256"));
        if let Some(m) = load_verified(engine, &cwasm, &digest_file) {
            return Ok(m);
        }
        // one compiler per module across processes sharing the directory; the others wait
        // and then load what it stored
        let _lock = lock_file(&self.dir.join(format!("{stem}.lock")))?;
        if let Some(m) = load_verified(engine, &cwasm, &digest_file) {
            return Ok(m);
        }
        let compiled = engine
            .precompile_module(wasm)
            .map_err(|e| anyhow!("compiling: {e:#}"))?;
        self.store(&cwasm, &compiled)?;
        self.store(
            &digest_file,
            hex::encode(Sha256::digest(&compiled)).as_bytes(),
        )?;
        // SAFETY: `compiled` was produced just now by this engine.
        unsafe { Module::deserialize(engine, &compiled) }.map_err(|e| anyhow!("loading: {e:#}"))
    }

    fn store(&self, path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// The module in `cwasm` if its digest matches the one this cache stored beside it.
fn load_verified(engine: &Engine, cwasm: &Path, digest_file: &Path) -> Option<Module> {
    let bytes = std::fs::read(cwasm).ok()?;
    let expected = std::fs::read(digest_file).ok()?;
    if hex::encode(Sha256::digest(&bytes)).as_bytes() != expected.as_slice() {
        tracing::warn!(path = %cwasm.display(), "cached module does not match its digest; recompiling");
        return None;
    }
    // SAFETY: the bytes are a serialized module this cache wrote (checked against the digest
    // stored beside it in our own 0700 directory); wasmtime also checks that they were
    // compiled by this version with these settings.
    match unsafe { Module::deserialize(engine, &bytes) } {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(error = %e, "cached module rejected; recompiling");
            None
        }
    }
}

/// An exclusive `flock` on `path`, released when the file is dropped.
fn lock_file(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; blocks until the other holder is done.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    anyhow::ensure!(
        rc == 0,
        "locking {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(f)
}
