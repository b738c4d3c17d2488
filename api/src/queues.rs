//! Named queues at submission: a job may name a queue of its own (`queue`), which the dispatch
//! adds to the queue registry in Redis (read by the scheduler and `/metrics`). Their number is
//! capped by `max_named_queues`, so tenants cannot grow the scheduler's per-queue work and the
//! metrics' series without bound, and by `max_named_queues_per_tenant` for the queues each
//! tenant named first, so that one tenant cannot take every place; the scheduler drops named
//! queues that hold nothing and that no live worker serves (`switchyard_scheduler`'s registry
//! pruning), freeing their places.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use switchyard_core::job::known_queues;
use switchyard_core::ErrorCode;
use switchyard_queue::Queue;

use crate::error::ApiError;

/// How long a read of the registry is trusted for names it holds.
const REGISTRY_TTL: Duration = Duration::from_secs(5);

/// The cap, the queues the configuration names (always admitted), and the registry's named
/// queues as last read.
pub struct NamedQueues {
    max: usize,
    per_tenant: usize,
    configured: HashSet<String>,
    seen: Mutex<(Option<Instant>, HashSet<String>)>,
}

impl NamedQueues {
    /// `configured`: queues the operator set up (`worker.queues`, `queue_limits`): a job may
    /// name them whatever the registry holds.
    pub fn new(
        max: u64,
        per_tenant: u64,
        configured: impl IntoIterator<Item = String>,
    ) -> NamedQueues {
        NamedQueues {
            max: usize::try_from(max).unwrap_or(usize::MAX),
            per_tenant: usize::try_from(per_tenant).unwrap_or(usize::MAX),
            configured: configured.into_iter().collect(),
            seen: Mutex::new((None, HashSet::new())),
        }
    }

    /// Lists a named queue in the registry now (a schedule's, before its first run).
    pub async fn register(&self, queue: &Queue, name: &str) {
        if known_queues().contains(&name) {
            return;
        }
        if let Err(e) = queue.register_queue(name).await {
            tracing::debug!(error = %e, "queue not registered; its first job registers it");
        }
    }

    /// Admits jobs of `tenant` naming `names` (`(field, queue)`): a queue the registry holds,
    /// or a new one while the registry, and the tenant's share of it, have room for the new
    /// ones of this request (which then count as the tenant's). Replicas admitting new names at
    /// the same moment may overshoot by those in flight. Redis unreadable: admitted (the
    /// submission's own dispatch reports Redis trouble).
    pub async fn admit(
        &self,
        queue: &Queue,
        tenant: uuid::Uuid,
        names: &[(String, &str)],
    ) -> Result<(), ApiError> {
        let known = known_queues();
        let mut wanted: Vec<(&str, &str)> = Vec::new();
        for (field, name) in names {
            let exempt = known.contains(name) || self.configured.contains(*name);
            if !exempt && !wanted.iter().any(|(_, n)| n == name) {
                wanted.push((field.as_str(), name));
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        {
            let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let fresh = seen.0.is_some_and(|at| at.elapsed() < REGISTRY_TTL);
            if fresh && wanted.iter().all(|(_, n)| seen.1.contains(*n)) {
                return Ok(());
            }
        }
        let Ok((all, owners)) = queue.named_queues().await else {
            return Ok(());
        };
        // a queue recorded as a tenant's is known before its first dispatch lists it
        let registry: HashSet<String> = all.into_iter().chain(owners.keys().cloned()).collect();
        let new: Vec<&(&str, &str)> = wanted
            .iter()
            .filter(|(_, n)| !registry.contains(*n))
            .collect();
        let held = registry.len();
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = (Some(Instant::now()), registry);
        let Some((field, name)) = new.first() else {
            return Ok(());
        };
        if held + new.len() > self.max {
            return Err(ApiError::field(
                ErrorCode::InvalidInput,
                field,
                format!(
                    "queue `{name}` would be new, and this server already holds {held} named \
                     queues (max_named_queues = {}): use an existing queue, or one of the \
                     kinds' own (llm, code, system)",
                    self.max
                ),
            ));
        }
        let me = tenant.to_string();
        let mine = owners.values().filter(|t| **t == me).count();
        if mine + new.len() > self.per_tenant {
            return Err(ApiError::field(
                ErrorCode::InvalidInput,
                field,
                format!(
                    "queue `{name}` would be new, and this tenant already named {mine} of the \
                     named queues (max_named_queues_per_tenant = {}): use one of them, or one of \
                     the kinds' own (llm, code, system)",
                    self.per_tenant
                ),
            ));
        }
        let names: Vec<&str> = new.iter().map(|(_, n)| *n).collect();
        if let Err(e) = queue.own_queues(&names, &me).await {
            tracing::debug!(error = %e, "new queues not recorded as the tenant's");
        }
        Ok(())
    }
}
