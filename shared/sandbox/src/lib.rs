//! Sandboxes for untrusted code: the [`Sandbox`] seam and its two tiers, WebAssembly inside the
//! process ([`wasm`], wasmtime) and gVisor containers (`gvisor`, runsc).
//!
//! A sandbox runs one program under [`Limits`], writes its output into a [`Capture`] (which the
//! caller streams as events) and reports how it ended. Nothing of the host reaches the program:
//! no environment, no network, no host files except a fresh scratch directory or read-only
//! runtime files.

pub mod gvisor;
pub mod output;
pub mod owned_dir;
pub mod scratch;
pub mod wasm;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchyard_core::code::{KilledBy, Language, Limits, Tier};
use tokio_util::sync::CancellationToken;

pub use output::{Capture, Stream, Utf8Chunks};

/// The program to run.
#[derive(Debug, Clone)]
pub enum Source {
    /// Source text for an interpreter (python, javascript).
    Code(String),
    /// A WASI command module.
    Module(Vec<u8>),
}

/// One run.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub language: Language,
    pub source: Source,
    pub stdin: Vec<u8>,
    pub args: Vec<String>,
    /// Relative path → content, placed in the working directory before the program starts.
    pub files: BTreeMap<String, Vec<u8>>,
    pub limits: Limits,
}

/// How a run ended (the output is in the [`Capture`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    /// The exit status; `None` when the program was killed before it exited.
    pub exit_code: Option<i32>,
    pub killed_by: Option<KilledBy>,
    /// From the program's start to its end.
    pub duration: Duration,
    /// From the request to the program's start (a pool hit, a cold start, a compile).
    pub start: Duration,
}

impl RunOutcome {
    /// Cancelled before the program started.
    pub fn cancelled() -> RunOutcome {
        RunOutcome {
            exit_code: None,
            killed_by: None,
            duration: Duration::ZERO,
            start: Duration::ZERO,
        }
    }
}

/// Why a run did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// This tier cannot run the language (or its runtime is not installed).
    #[error("{0}")]
    Unsupported(String),
    /// The user's module is invalid (does not compile, wrong imports, too slow to compile).
    #[error("{0}")]
    InvalidModule(String),
    /// Something broke on our side; running again may work.
    #[error("sandbox failure: {0}")]
    Internal(#[from] anyhow::Error),
}

/// A place to run untrusted code.
#[async_trait]
pub trait Sandbox: Send + Sync {
    fn tier(&self) -> Tier;

    /// Whether this sandbox can run `language` here.
    fn supports(&self, language: Language) -> bool;

    /// Started sandboxes waiting per language (tiers without a pool: none).
    async fn pool_sizes(&self) -> Vec<(Language, usize)> {
        Vec::new()
    }

    /// Runs one program to its end (or until a limit or `cancel` stops it; cancellation stops
    /// it within a second). Output goes to `capture`, whose budget is the output limit.
    async fn run(
        &self,
        req: RunRequest,
        capture: Arc<Capture>,
        cancel: CancellationToken,
    ) -> Result<RunOutcome, SandboxError>;
}
