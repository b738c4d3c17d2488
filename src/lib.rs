//! Wiring of the `switchyard` binary: builds each role (API, worker, scheduler, mock LLM, dev)
//! from the configuration. The binary itself only parses arguments.

pub mod devsvc;
pub mod health;
pub mod otel;
pub mod roles;
