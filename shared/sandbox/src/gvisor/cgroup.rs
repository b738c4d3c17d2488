//! The cgroups of one gVisor sandbox (cgroup v1): the memory cgroup the worker creates and
//! limits itself (runsc joins an existing cgroup without applying limits to it, and the
//! out-of-memory count of the sandbox's own cgroup is how a memory kill is told apart), and
//! the CPU time runsc's `cpuacct` cgroup reports.

use std::path::PathBuf;

use anyhow::Context;

const ROOT: &str = "/sys/fs/cgroup";
/// Parent of every sandbox's cgroups (`linux.cgroupsPath` is `/<PARENT>/<id>`).
pub const PARENT: &str = "switchyard";

/// Memory the sandbox's own processes (gVisor's sentry and gofer) need beside the program:
/// added to the program's `memory_mb`.
pub const OVERHEAD_MB: u64 = 64;

pub struct Cgroups {
    memory: PathBuf,
    cpuacct: PathBuf,
}

impl Cgroups {
    /// Creates the memory cgroup of sandbox `id` with `limit_mb` (no swap beyond it).
    pub fn create(id: &str, limit_mb: u64) -> anyhow::Result<Cgroups> {
        let memory = PathBuf::from(ROOT).join("memory").join(PARENT).join(id);
        std::fs::create_dir_all(&memory)
            .with_context(|| format!("creating {} (is cgroup v1 mounted?)", memory.display()))?;
        let cg = Cgroups {
            memory,
            cpuacct: PathBuf::from(ROOT).join("cpuacct").join(PARENT).join(id),
        };
        cg.set_memory_mb(limit_mb)?;
        Ok(cg)
    }

    /// Removes the cgroups of a sandbox an earlier worker left behind, in every controller
    /// (blocking: waits a little for the memory cgroup to empty).
    pub fn remove_leftover(id: &str) {
        Cgroups {
            memory: PathBuf::from(ROOT).join("memory").join(PARENT).join(id),
            cpuacct: PathBuf::from(ROOT).join("cpuacct").join(PARENT).join(id),
        }
        .remove();
        if let Ok(controllers) = std::fs::read_dir(ROOT) {
            for c in controllers.flatten() {
                let _ = std::fs::remove_dir(c.path().join(PARENT).join(id));
            }
        }
    }

    /// A placeholder owning nothing (what is left after the real one moved out).
    pub fn detached() -> Cgroups {
        Cgroups {
            memory: PathBuf::new(),
            cpuacct: PathBuf::new(),
        }
    }

    /// Changes the memory limit (a pooled sandbox gets its job's limit when it is taken).
    pub fn set_memory_mb(&self, mb: u64) -> anyhow::Result<()> {
        let bytes = (mb + OVERHEAD_MB).saturating_mul(1 << 20).to_string();
        let limit = self.memory.join("memory.limit_in_bytes");
        let set_limit = || std::fs::write(&limit, &bytes).context("setting memory.limit_in_bytes");
        // swap counts too where the kernel accounts it; memsw must stay >= the plain limit at
        // every step (the kernel refuses otherwise): raised first, lowered last
        let memsw = self.memory.join("memory.memsw.limit_in_bytes");
        if !memsw.exists() {
            return set_limit();
        }
        if std::fs::write(&memsw, &bytes).is_ok() {
            set_limit()
        } else {
            set_limit()?;
            std::fs::write(memsw, &bytes).context("setting memory.memsw.limit_in_bytes")
        }
    }

    /// Whether the kernel killed a process of this cgroup for memory.
    pub fn oom_killed(&self) -> bool {
        std::fs::read_to_string(self.memory.join("memory.oom_control"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ").map(|n| n.trim().to_string()))
            })
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n > 0)
    }

    /// CPU time used by the sandbox so far (sentry included), if runsc made its cgroup.
    pub fn cpu_ns(&self) -> Option<u64> {
        std::fs::read_to_string(self.cpuacct.join("cpuacct.usage"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Removes the memory cgroup (once no process is left in it), and the cpuacct one where
    /// runsc left it (runsc removes its own cgroups when it deletes a sandbox it knows).
    pub fn remove(&self) {
        if !self.cpuacct.as_os_str().is_empty() {
            let _ = std::fs::remove_dir(&self.cpuacct);
        }
        for _ in 0..50 {
            match std::fs::remove_dir(&self.memory) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        tracing::warn!(path = %self.memory.display(), "could not remove a sandbox cgroup");
    }
}
