//! Integration tests of the API crate (one test binary): real Postgres (a fresh database per
//! test via `#[sqlx::test]`), real Redis (a unique key prefix per test), the real mock LLM.

mod api_keys;
mod audit;
mod audit_chain;
mod cache;
mod chat_completions;
mod cluster;
mod code;
mod conversation_turns;
mod conversations;
mod deploy;
mod errors;
mod events;
mod fairness;
mod front_door_streams;
mod fuzz;
mod jobs;
mod jwt;
mod lost_history;
mod models;
mod named_queues;
mod ops;
mod outcomes;
mod queues;
mod quotas;
mod reliability;
mod rls;
mod schedules;
mod statistics;
mod streaming;
mod submission;
mod support;
mod tenancy;
mod tenants;
mod usage;
mod webhooks;
