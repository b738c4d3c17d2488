//! Pruning the queue registry: a named queue stays in the registry (read every pass by the
//! scheduler's per-queue steps and by `/metrics`) only while it holds something, has
//! unfinished jobs, is named by a schedule or is served by a live worker. The others are dropped, which bounds the
//! registry by what is in use and frees places under the API's `max_named_queues` (and the
//! tenant's under `max_named_queues_per_tenant`).
//!
//! A dropped queue's Redis keys are deleted with it when it holds nothing (one script in the
//! queue's slot checks and deletes: `Queue::delete_queue_keys`); the scheduler prunes while it
//! holds the dispatch lock, so no epoch check of another replica sees the queue's epoch mark
//! vanish.
//!
//! A job committed while its queue is dropped keeps it: the queue is dropped only when Redis
//! holds nothing for it and Postgres has no unfinished job in it, and Postgres is asked again
//! after the drop. A job committed before that second look is seen by it (the queue goes back
//! in the registry); one committed after is dispatched after the drop, and its dispatch adds
//! the queue again.

use std::collections::HashSet;

use switchyard_core::job::known_queues;

use crate::Scheduler;

impl Scheduler {
    /// Drops the named queues nothing uses from the registry; returns their names.
    pub async fn prune_queue_registry(&self) -> anyhow::Result<Vec<String>> {
        let mut kept: HashSet<String> = self
            .queue
            .workers(switchyard_core::queueing::WORKER_REPORT_TTL)
            .await?
            .into_iter()
            .flat_map(|w| w.queues.into_iter().map(|q| q.name))
            .collect();
        // a schedule's queue stays: its runs would bring it back without the API's cap
        kept.extend(self.store.scheduled_queues().await?);
        let known = known_queues();
        let mut dropped = Vec::new();
        // the registry's, and those recorded as a tenant's that no dispatch listed (the API
        // admitted them, and their jobs never came): both hold places under the caps
        let (mut all, owners) = self.queue.named_queues().await?;
        all.extend(owners.into_keys());
        all.sort_unstable();
        all.dedup();
        for q in all {
            if known.contains(&q.as_str()) || kept.contains(&q) {
                continue;
            }
            if self.queue.held(&q).await? > 0 || self.store.queue_in_use(&q).await? {
                continue;
            }
            self.queue.unregister_queue(&q).await?;
            if self.store.queue_in_use(&q).await? || self.queue.held(&q).await? > 0 {
                self.queue.register_queue(&q).await?;
                continue;
            }
            // its keys too (left behind, every name ever used would keep a dozen)
            let deleted = self.queue.delete_queue_keys(&q).await?;
            tracing::info!(queue = %q, keys_deleted = deleted, "unused named queue dropped from the registry");
            dropped.push(q);
        }
        Ok(dropped)
    }
}
