//! One gVisor sandbox: a `runsc run` process in the foreground whose init is our loader, its
//! OCI bundle, its cgroups, and its teardown (kill, delete, remove cgroups and bundle).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde_json::json;
use switchyard_core::code::Language;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

use super::cgroup::{Cgroups, PARENT};
use super::GvisorConfig;

/// Marker the loader writes to stderr once it waits for its payload.
const READY: &[u8] = b"\0READY\n";

/// A started sandbox waiting for (or running) one program.
pub struct SandboxBox {
    pub id: String,
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<BufReader<ChildStderr>>,
    pub cgroups: Cgroups,
    /// How long the start took (spawn → loader ready).
    pub start_latency: Duration,
    runsc: Arc<Runsc>,
    bundle: PathBuf,
    cleaned: bool,
}

/// How to call runsc.
pub struct Runsc {
    pub bin: PathBuf,
    /// `--root`: runsc's state directory (this worker's own).
    pub root: PathBuf,
    pub platform: String,
}

impl Runsc {
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .arg("--root")
            .arg(&self.root)
            .arg(format!("--platform={}", self.platform))
            .arg("--network=none");
        c
    }

    /// `runsc kill <id> KILL` then `runsc delete --force <id>`, ignoring "not found".
    pub async fn destroy(&self, id: &str) {
        let _ = self
            .command()
            .args(["kill", id, "KILL"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        let _ = self
            .command()
            .args(["delete", "--force", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }

    /// Removes what a previous worker killed before it could clean up left in this state
    /// directory: its sandboxes (runsc's list), their bundles (`bundles/<id>`) and their
    /// cgroups.
    pub async fn delete_leftovers(&self, bundles: &Path) {
        let mut ids = BTreeSet::new();
        if let Ok(out) = self.command().args(["list", "-quiet"]).output().await {
            ids.extend(
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .map(str::to_string),
            );
        }
        if let Ok(dir) = std::fs::read_dir(bundles) {
            ids.extend(
                dir.flatten()
                    .filter_map(|e| e.file_name().into_string().ok()),
            );
        }
        for id in &ids {
            tracing::info!(id, "removing a sandbox left by an earlier worker");
            self.destroy(id).await;
        }
        let bundles = bundles.to_path_buf();
        let _ = tokio::task::spawn_blocking(move || {
            for id in ids {
                Cgroups::remove_leftover(&id);
                let _ = std::fs::remove_dir_all(bundles.join(&id));
            }
        })
        .await;
    }
}

fn loader_argv(language: Language) -> anyhow::Result<Vec<&'static str>> {
    Ok(match language {
        Language::Python => vec!["/usr/bin/python3", "-B", "/opt/switchyard/loader.py"],
        Language::Javascript => vec!["/usr/bin/node", "/opt/switchyard/loader.js"],
        Language::Wasm => anyhow::bail!("WebAssembly modules run in the wasm tier"),
    })
}

/// The OCI runtime spec of one sandbox: read-only root, tmpfs `/tmp` and `/work`, uid 65534,
/// no capabilities, an empty environment, its own namespaces (network: loopback only).
fn spec(cfg: &GvisorConfig, id: &str, language: Language) -> anyhow::Result<serde_json::Value> {
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 65534, "gid": 65534},
            "args": loader_argv(language)?,
            "env": ["PATH=/usr/bin:/bin", "HOME=/tmp", "LANG=C.UTF-8", "SWITCHYARD_READY=1"],
            "cwd": "/work",
            "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []},
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": 256, "soft": 256},
                {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
                // guest processes (gVisor enforces it; pids.max also counts gVisor's threads)
                {"type": "RLIMIT_NPROC", "hard": cfg.nproc, "soft": cfg.nproc}
            ],
            "noNewPrivileges": true
        },
        "root": {"path": cfg.rootfs, "readonly": true},
        "hostname": "sandbox",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "size=16m", "mode=1777"]},
            {"destination": "/work", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", format!("size={}m", cfg.work_mb), "mode=1777"]}
        ],
        "linux": {
            "cgroupsPath": format!("/{PARENT}/{id}"),
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "resources": {
                "pids": {"limit": cfg.pids},
                "cpu": {"quota": cfg.cpu_quota_us, "period": 100000}
            }
        }
    }))
}

impl SandboxBox {
    /// Starts a sandbox and waits until its loader is ready (`memory_mb`: its initial limit).
    pub async fn start(
        cfg: &GvisorConfig,
        runsc: Arc<Runsc>,
        language: Language,
        memory_mb: u64,
    ) -> anyhow::Result<SandboxBox> {
        let started = Instant::now();
        let id = format!("sy-{}", uuid::Uuid::new_v4().simple());
        let bundle = cfg.state_dir.join("bundles").join(&id);
        std::fs::create_dir_all(&bundle).context("creating the bundle directory")?;
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&spec(cfg, &id, language)?)?,
        )?;
        let cgroups = match Cgroups::create(&id, memory_mb) {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(e);
            }
        };
        let spawned = runsc
            .command()
            .arg("run")
            .arg("--bundle")
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                cgroups.remove();
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(anyhow!("starting {}: {e}", runsc.bin.display()));
            }
        };
        let mut b = SandboxBox {
            id,
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            stderr: child.stderr.take().map(BufReader::new),
            child,
            cgroups,
            start_latency: Duration::ZERO,
            runsc,
            bundle,
            cleaned: false,
        };
        match tokio::time::timeout(cfg.start_timeout, b.wait_ready()).await {
            Ok(Ok(())) => {
                b.start_latency = started.elapsed();
                Ok(b)
            }
            Ok(Err(e)) => {
                b.destroy().await;
                Err(e)
            }
            Err(_) => {
                b.destroy().await;
                Err(anyhow!(
                    "the sandbox did not start within {:?}",
                    cfg.start_timeout
                ))
            }
        }
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let err = self.stderr.as_mut().ok_or_else(|| anyhow!("no stderr"))?;
        let mut seen = Vec::new();
        loop {
            let mut line = Vec::new();
            let n = err.read_until(b'\n', &mut line).await?;
            if n == 0 {
                let mut rest = String::new();
                let _ = err.read_to_string(&mut rest).await;
                return Err(anyhow!(
                    "the sandbox exited before it was ready: {}{}",
                    String::from_utf8_lossy(&seen),
                    rest
                ));
            }
            if line.ends_with(READY) {
                return Ok(());
            }
            seen.extend_from_slice(&line);
        }
    }

    /// Whether the sandbox is still running (an idle pooled one could have died).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the sandbox and removes everything it had on the host.
    pub async fn destroy(&mut self) {
        if self.cleaned {
            return;
        }
        // `cleaned` only once all is done: a destroy dropped half-way (its job cancelled
        // meanwhile) leaves the rest to `Drop` instead of leaking the container and cgroup
        if matches!(self.child.try_wait(), Ok(None)) {
            self.runsc.destroy(&self.id).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
            let _ = self.child.start_kill();
        } else {
            // exited: runsc removed its container; make sure of it
            let _ = self
                .runsc
                .command()
                .args(["delete", "--force", &self.id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
        }
        let cg = std::mem::replace(&mut self.cgroups, Cgroups::detached());
        let bundle = self.bundle.clone();
        let _ = tokio::task::spawn_blocking(move || {
            cg.remove();
            let _ = std::fs::remove_dir_all(&bundle);
        })
        .await;
        self.cleaned = true;
    }
}

impl Drop for SandboxBox {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        // dropped without `destroy` (e.g. the worker stops): clean up on a thread of its own
        let _ = self.child.start_kill();
        let id = self.id.clone();
        let bin = self.runsc.bin.clone();
        let root = self.runsc.root.clone();
        let platform = self.runsc.platform.clone();
        let cg = std::mem::replace(&mut self.cgroups, Cgroups::detached());
        let bundle = self.bundle.clone();
        let _ = std::thread::Builder::new()
            .name("sandbox-cleanup".into())
            .spawn(move || {
                for args in [vec!["kill", &id, "KILL"], vec!["delete", "--force", &id]] {
                    let _ = std::process::Command::new(&bin)
                        .env_clear()
                        .arg("--root")
                        .arg(&root)
                        .arg(format!("--platform={platform}"))
                        .args(args)
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
                cg.remove();
                let _ = std::fs::remove_dir_all(&bundle);
            });
    }
}
