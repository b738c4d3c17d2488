//! The partial-loss check: Redis can lose some of a queue's writes without losing the queue's
//! epoch mark (a replica promoted before it had them, a restart from an older snapshot). The
//! epoch check sees only whole slots lost, so the jobs of those writes would wait for ever.
//! Every `loss_check_every`, the scheduler counts what Redis holds for each queue (streams,
//! lanes, delayed set) and then the unfinished jobs Postgres says were dispatched in this epoch
//! and have kept their state a while. Redis read first, Postgres second: a job that ends in
//! between leaves both counts or only Redis', never only Postgres'. Redis holding fewer on
//! two checks in a row is a loss: the queue's epoch mark is dropped, and the next pass starts
//! a new epoch, which dispatches every unfinished job again (duplicates are harmless: a
//! claim runs a job once).

use std::collections::HashMap;

use crate::Scheduler;

impl Scheduler {
    /// Compares what Redis holds per queue with what it should hold in `epoch`; returns the
    /// queues found short twice in a row (their epoch mark is dropped).
    pub(crate) async fn check_losses(&self, epoch: i64) -> anyhow::Result<Vec<String>> {
        let mut held = HashMap::new();
        for q in self.queue.queues().await? {
            let n = self.queue.held(&q).await?;
            held.insert(q, n);
        }
        let settled = self
            .store
            .settled_dispatched(epoch, self.opts.loss_settle)
            .await?;
        // a queue Redis no longer lists (its name lost with the meta slot) is read now
        for (q, _) in &settled {
            if !held.contains_key(q) {
                let n = self.queue.held(q).await?;
                held.insert(q.clone(), n);
            }
        }
        let mut lost = Vec::new();
        {
            let mut short = self.short.lock().unwrap_or_else(|p| p.into_inner());
            let before = std::mem::take(&mut *short);
            for (q, should) in settled {
                let has = held.get(&q).copied().unwrap_or(0);
                let should = should.max(0) as u64;
                if has >= should {
                    continue;
                }
                if before.contains_key(&q) {
                    tracing::warn!(queue = %q, redis_holds = has, dispatched = should, "redis lost part of this queue's data: starting a new epoch (every unfinished job dispatched again)");
                    lost.push(q);
                } else {
                    tracing::info!(queue = %q, redis_holds = has, dispatched = should, "redis holds fewer jobs of this queue than were dispatched; checking again");
                    short.insert(q, should - has);
                }
            }
        }
        for q in &lost {
            self.queue.forget_queue_epoch(q).await?;
        }
        Ok(lost)
    }
}
