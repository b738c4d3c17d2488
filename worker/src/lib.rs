//! The worker: fetches jobs from the Redis queues it serves, claims them in Postgres (attempt
//! fencing), runs them through executors, streams their events and records the outcome.

mod acker;
mod batcher;
pub mod code;
pub mod code_metrics;
mod deliver;
pub mod executor;
mod holds;
pub mod llm;
pub mod noop;
mod publisher;
mod quota;
mod reclaim;
mod registry;
mod run;
pub mod runtime;
mod trace;

pub use executor::{ExecError, Executor, ExecutorRegistry, JobContext};
pub use runtime::{Worker, WorkerHandle, WorkerOptions};
