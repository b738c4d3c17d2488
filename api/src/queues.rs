//! Named queues at submission: a job may name a queue of its own (`queue`), which the dispatch
//! adds to the queue registry in Redis (read by the scheduler and `/metrics`). Their number is
//! capped by `max_named_queues`, so tenants cannot grow the scheduler's per-queue work and the
//! metrics' series without bound; the scheduler drops named queues that hold nothing and that
//! no live worker serves (`switchyard_scheduler`'s registry pruning), freeing their places.

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
    configured: HashSet<String>,
    seen: Mutex<(Option<Instant>, HashSet<String>)>,
}

impl NamedQueues {
    /// `configured`: queues the operator set up (`worker.queues`, `queue_limits`): a job may
    /// name them whatever the registry holds.
    pub fn new(max: u64, configured: impl IntoIterator<Item = String>) -> NamedQueues {
        NamedQueues {
            max: usize::try_from(max).unwrap_or(usize::MAX),
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

    /// Admits jobs naming `names` (`(field, queue)`): a queue the registry holds, or a new
    /// one while the registry has room for the new ones of this request. Replicas admitting
    /// new names at the same moment may overshoot by those in flight. Redis unreadable:
    /// admitted (the submission's own dispatch reports Redis trouble).
    pub async fn admit(&self, queue: &Queue, names: &[(String, &str)]) -> Result<(), ApiError> {
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
        let Ok(all) = queue.queues().await else {
            return Ok(());
        };
        let registry: HashSet<String> = all
            .into_iter()
            .filter(|q| !known.contains(&q.as_str()))
            .collect();
        let new: Vec<&(&str, &str)> = wanted
            .iter()
            .filter(|(_, n)| !registry.contains(*n))
            .collect();
        let held = registry.len();
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = (Some(Instant::now()), registry);
        match new.first() {
            Some((field, name)) if held + new.len() > self.max => Err(ApiError::field(
                ErrorCode::InvalidInput,
                field,
                format!(
                    "queue `{name}` would be new, and this server already holds {held} named \
                     queues (max_named_queues = {}): use an existing queue, or one of the \
                     kinds' own (llm, code, system)",
                    self.max
                ),
            )),
            _ => Ok(()),
        }
    }
}
