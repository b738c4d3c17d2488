//! Domain types shared by every Switchyard process: jobs, events, errors, API keys, config.
//!
//! This crate does no I/O; the store (Postgres), queue (Redis) and the binaries build on it.

pub mod apikey;
pub mod authz;
pub mod chat;
pub mod code;
pub mod config;
pub mod error;
pub mod event;
pub mod job;
pub mod jwt_config;
pub mod models;
pub mod nul;
pub mod proxy;
pub mod queueing;
pub mod quota;
pub mod schedule;
pub mod telemetry;
pub mod tokens;
pub mod webhook;

pub use error::{ErrorCode, FieldError};
pub use event::Event;
pub use job::{Job, JobError, JobKind, JobStatus};
