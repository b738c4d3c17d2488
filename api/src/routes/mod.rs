//! HTTP handlers, one file per resource.

pub mod api_keys;
pub mod audit;
pub mod conversations;
pub mod dead;
pub mod deliveries;
pub mod docs;
pub mod health;
pub mod job_batch;
pub mod jobs;
pub mod models;
pub mod quotas;
pub mod schedules;
pub mod stream;
pub mod tenants;
pub mod usage;
pub mod workers;
