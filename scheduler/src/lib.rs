//! The scheduler: the reconciler that makes Redis rebuildable from Postgres. Each pass it
//! (1) detects Redis data loss through the epoch key and starts a new epoch, (2) dispatches
//! committed jobs that never reached Redis in the current epoch, (3) re-dispatches running jobs
//! whose lease ran out long ago, (4) fires due cron schedules (`cron.rs`), (5) moves due
//! delayed jobs into the queue streams, and (6)
//! chains job state changes from the audit outbox into the tenants' audit trails; every few
//! seconds it (7) writes queue limits and tenant weights to Redis (`limits.rs`) and (8) refreshes
//! the planner statistics of `jobs` once enough of it changed (cached plans never outlive the
//! table size they were made for); less often it (9) prunes finished jobs and audit rows past
//! their retention. Every step works in bounded batches driven by indexes, so a pass never
//! rescans the whole backlog.

pub mod cron;
pub mod limits;
mod losses;
mod registry;
pub mod webhooks;

use std::time::Duration;

use switchyard_core::job::known_queues;
use switchyard_queue::Queue;
use switchyard_store::Store;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Time between passes.
    pub interval: Duration,
    /// A committed job younger than this is left to the API's own dispatch.
    pub undispatched_min_age: Duration,
    /// Rows per batch.
    pub batch: i64,
    /// Batches per step per pass (bounds one pass).
    pub max_batches: usize,
    /// The job lease; a running job whose lease ran out more than this long ago is re-dispatched.
    pub lease: Duration,
    /// Audit rows older than this are pruned (`None`: kept forever).
    pub audit_retention: Option<Duration>,
    /// How often retention runs.
    pub audit_prune_every: Duration,
    /// Finished jobs are kept this many days unless their tenant says otherwise (0: forever).
    pub job_retention_days: u32,
    /// How often finished jobs past retention are pruned.
    pub job_prune_every: Duration,
    /// Webhook deliveries (`None`: this scheduler delivers none).
    pub webhooks: Option<switchyard_core::webhook::WebhookConfig>,
    /// Jobs of a queue running at once across all workers (`queue_limits`).
    pub queue_limits: std::collections::BTreeMap<String, u64>,
    /// A tenant's jobs running at once in one queue, unless it has its own (`quotas.concurrent_jobs`).
    pub tenant_concurrency: Option<u64>,
    /// Every tenant's quotas unless it has its own (`[quotas]`): cron runs are held to them.
    pub quota_defaults: switchyard_core::quota::QuotaLimits,
    /// How often the limits are written to Redis.
    pub limits_every: Duration,
    /// How often idle stream consumers are deleted (each worker start reads under a new
    /// consumer name, which Redis keeps until deleted).
    pub consumer_prune_every: Duration,
    /// A consumer without pending entries idle this long is deleted.
    pub consumer_idle: Duration,
    /// How often the planner statistics of `jobs` are checked (and refreshed once enough of
    /// the table changed: see `Store::refresh_statistics`).
    pub statistics_every: Duration,
    /// How often what Redis holds per queue is compared with what was dispatched
    /// (`losses.rs`).
    pub loss_check_every: Duration,
    /// Only jobs that kept their state this long count in that comparison (younger ones may
    /// be on their way into Redis).
    pub loss_settle: Duration,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            interval: Duration::from_secs(1),
            undispatched_min_age: Duration::from_secs(5),
            batch: 1000,
            max_batches: 20,
            lease: Duration::from_secs(30),
            audit_retention: Some(Duration::from_secs(365 * 24 * 3600)),
            audit_prune_every: Duration::from_secs(3600),
            job_retention_days: 30,
            job_prune_every: Duration::from_secs(60),
            webhooks: Some(Default::default()),
            queue_limits: Default::default(),
            tenant_concurrency: None,
            quota_defaults: switchyard_core::quota::QuotaConfig::default().defaults(),
            limits_every: Duration::from_secs(5),
            consumer_prune_every: Duration::from_secs(600),
            consumer_idle: Duration::from_secs(3600),
            statistics_every: Duration::from_secs(5),
            loss_check_every: Duration::from_secs(60),
            loss_settle: Duration::from_secs(30),
        }
    }
}

/// What one pass did (for logs and tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub new_epoch: Option<i64>,
    pub redispatched: usize,
    pub expired: usize,
    pub moved_due: usize,
    pub scheduled: usize,
    pub audited: usize,
    pub audit_pruned: u64,
    pub jobs_pruned: usize,
    /// Idle stream consumers deleted.
    pub consumers_pruned: usize,
    /// Named queues dropped from the registry (nothing used them).
    pub queues_dropped: usize,
    /// Queues found to have lost part of their Redis data (a new epoch follows).
    pub lost_queues: usize,
    /// Whether this pass refreshed the statistics of `jobs`.
    pub analyzed: bool,
    /// The audit outbox still held changes when the pass had chained `max_batches` batches:
    /// the next pass starts at once instead of after `interval` (workers can produce changes
    /// faster than one pass per interval chains them).
    pub backlog: bool,
}

pub struct Scheduler {
    store: Store,
    queue: Queue,
    opts: SchedulerOptions,
    last_prune: std::sync::Mutex<Option<std::time::Instant>>,
    last_job_prune: std::sync::Mutex<Option<std::time::Instant>>,
    last_limits: std::sync::Mutex<Option<std::time::Instant>>,
    last_statistics: std::sync::Mutex<Option<std::time::Instant>>,
    last_consumer_prune: std::sync::Mutex<Option<std::time::Instant>>,
    last_registry_prune: std::sync::Mutex<Option<std::time::Instant>>,
    last_loss_check: std::sync::Mutex<Option<std::time::Instant>>,
    /// Queues found short at the last loss check (by how many jobs).
    short: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl Scheduler {
    pub fn new(store: Store, queue: Queue, opts: SchedulerOptions) -> Scheduler {
        Scheduler {
            store,
            queue,
            opts,
            last_prune: std::sync::Mutex::new(None),
            last_job_prune: std::sync::Mutex::new(None),
            last_limits: std::sync::Mutex::new(None),
            last_statistics: std::sync::Mutex::new(None),
            last_consumer_prune: std::sync::Mutex::new(None),
            last_registry_prune: std::sync::Mutex::new(None),
            last_loss_check: std::sync::Mutex::new(None),
            short: std::sync::Mutex::new(Default::default()),
        }
    }

    /// Runs passes (and webhook deliveries) until `stop`; errors (Redis or Postgres down) are
    /// logged and retried.
    pub async fn run(self, stop: CancellationToken) {
        let deliverer = self.opts.webhooks.clone().and_then(|cfg| {
            webhooks::Deliverer::new(self.store.clone(), cfg)
                .map_err(|e| tracing::error!(error = %e, "webhooks disabled"))
                .ok()
        });
        let deliveries = async {
            if let Some(d) = deliverer {
                d.run(stop.clone()).await;
            }
        };
        tokio::join!(self.reconcile(stop.clone()), deliveries);
    }

    async fn reconcile(&self, stop: CancellationToken) {
        tracing::info!("scheduler started");
        let mut failures = 0u32;
        loop {
            let mut backlog = false;
            match self.pass().await {
                Ok(r) => {
                    failures = 0;
                    backlog = r.backlog;
                    if r != PassReport::default() {
                        tracing::info!(?r, "reconciler pass");
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "reconciler pass failed; retrying");
                }
            }
            let wait = match (failures, backlog) {
                (0, true) => Duration::ZERO,
                (0, false) => self.opts.interval,
                _ => (self.opts.interval * failures.min(5)).min(Duration::from_secs(5)),
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::info!("scheduler stopped");
    }

    /// Dispatches the jobs Redis does not hold in the current epoch (all of them after Redis
    /// lost its data). The caller holds the dispatch lock.
    async fn redispatch(&self, report: &mut PassReport) -> anyhow::Result<()> {
        let (epoch, new) = self.ensure_epoch().await?;
        if new {
            report.new_epoch = Some(epoch);
        }
        // a fresh epoch re-dispatches everything unfinished, however young
        let min_age = if new {
            Duration::ZERO
        } else {
            self.opts.undispatched_min_age
        };
        for _ in 0..self.opts.max_batches {
            let items = self
                .store
                .undispatched(epoch, min_age, self.opts.batch)
                .await?;
            if items.is_empty() {
                break;
            }
            let (items, attempts): (Vec<_>, Vec<_>) = items.into_iter().unzip();
            self.queue.dispatch(&items).await?;
            let jobs: Vec<_> = items.iter().map(|i| i.id).zip(attempts).collect();
            self.store.mark_redispatched(&jobs, epoch).await?;
            report.redispatched += items.len();
            if (items.len() as i64) < self.opts.batch {
                break;
            }
        }
        if !new && due(&self.last_loss_check, self.opts.loss_check_every) {
            report.lost_queues = self.check_losses(epoch).await?.len();
        }
        Ok(())
    }

    /// Ensures Redis holds an epoch that Postgres agrees on; returns it and whether it is new.
    /// Call it under the dispatch lock (two schedulers would each start an epoch).
    pub async fn ensure_epoch(&self) -> anyhow::Result<(i64, bool)> {
        let pg = self.store.redis_epoch().await?;
        let seen = self.queue.epoch().await?;
        if let Some(e) = seen.filter(|e| *e >= pg && *e > 0) {
            // a shard of a Redis Cluster can lose its data alone: each queue's slot is marked
            let lost = self.queue.check_queue_epochs(e).await?;
            if lost.is_empty() {
                return Ok((e, false));
            }
            tracing::warn!(queues = ?lost, epoch = e, "redis lost the data of these queues (their epoch mark is gone): re-dispatching unfinished jobs from postgres");
        }
        let new = self.store.bump_redis_epoch(seen.unwrap_or(0)).await?;
        self.queue.set_epoch(new).await?;
        for q in known_queues() {
            self.queue.ensure_group(q).await?;
        }
        // the queues' slots carry the new epoch before anything is re-dispatched in it (a slot
        // losing its data before being marked would look new, not lost)
        self.queue.check_queue_epochs(new).await?;
        if pg > 0 {
            tracing::warn!(
                old = pg,
                new,
                "new redis epoch (data lost): re-dispatching unfinished jobs from postgres"
            );
        } else {
            tracing::info!(epoch = new, "redis epoch initialised");
        }
        Ok((new, true))
    }

    /// One reconciliation pass.
    pub async fn pass(&self) -> anyhow::Result<PassReport> {
        let mut report = PassReport::default();
        // one scheduler at a time checks the epoch and re-dispatches; the others go on with
        // the rest of the pass
        if let Some(lock) = self.store.try_dispatch_lock().await? {
            self.redispatch(&mut report).await?;
            // the named queues nothing uses leave the registry, and their keys go: not while
            // another scheduler checks the queues' epoch marks (see `registry.rs`); its read of
            // the workers' reports drops those of workers that died
            if due(&self.last_registry_prune, self.opts.consumer_prune_every) {
                report.queues_dropped = self.prune_queue_registry().await?.len();
            }
            lock.release().await?;
        }
        for _ in 0..self.opts.max_batches {
            let items = self
                .store
                .take_expired_leases(self.opts.lease, self.opts.batch)
                .await?;
            if items.is_empty() {
                break;
            }
            self.queue.dispatch(&items).await?;
            report.expired += items.len();
            if (items.len() as i64) < self.opts.batch {
                break;
            }
        }
        if due(&self.last_statistics, self.opts.statistics_every) {
            // 1,000 rows plus 10 % of the table: early while the table is young (the cached
            // plans of a fresh deployment are re-planned within seconds), rare when it is large
            report.analyzed = self.store.refresh_statistics(1000, 0.1).await?;
        }
        if due(&self.last_limits, self.opts.limits_every) {
            limits::sync(
                &self.store,
                &self.queue,
                &self.opts.queue_limits,
                self.opts.tenant_concurrency,
            )
            .await?;
        }
        report.scheduled = cron::fire(
            &self.store,
            &self.queue,
            &self.opts.quota_defaults,
            self.opts.batch,
            self.opts.max_batches,
        )
        .await?;
        for q in self.queue.queues().await? {
            for _ in 0..self.opts.max_batches {
                let n = self.queue.move_due(&q, self.opts.batch as usize).await?;
                report.moved_due += n;
                if n < self.opts.batch as usize {
                    break;
                }
            }
        }
        for _ in 0..self.opts.max_batches {
            // a page that left nothing behind ends the step: the changes committed meanwhile
            // wait for the next pass rather than one transaction each
            let c = self.store.chain_job_audit(self.opts.batch).await?;
            report.audited += c.changes;
            report.backlog = c.more;
            if !c.more {
                break;
            }
        }
        self.store.prune_idempotency_keys(self.opts.batch).await?;
        if due(&self.last_consumer_prune, self.opts.consumer_prune_every) {
            for q in self.queue.queues().await? {
                report.consumers_pruned += self
                    .queue
                    .prune_consumers(&q, self.opts.consumer_idle)
                    .await?;
            }
        }
        if due(&self.last_job_prune, self.opts.job_prune_every) {
            report.jobs_pruned = self.prune_jobs().await?;
        }
        if let Some(keep) = self.opts.audit_retention {
            if due(&self.last_prune, self.opts.audit_prune_every) {
                let before = chrono::Utc::now() - chrono::Duration::from_std(keep)?;
                report.audit_pruned = self.store.prune_audit_all(before).await?;
            }
        }
        Ok(report)
    }

    /// Retention: finished jobs past their tenant's period go, in batches (each a short
    /// statement over `jobs_tenant_finished`), with their Redis events.
    /// Prunes up to `max_batches` batches of finished jobs past their retention; when they
    /// all came back full (a backlog: more jobs end than one pass a minute removes), the next
    /// pass prunes again instead of waiting for `job_prune_every`.
    async fn prune_jobs(&self) -> anyhow::Result<usize> {
        let mut total = 0;
        for i in 0..self.opts.max_batches {
            let ids = self
                .store
                .prune_finished_jobs(self.opts.job_retention_days as i32, self.opts.batch)
                .await?;
            total += ids.len();
            if let Err(e) = self.queue.forget_jobs(&ids).await {
                tracing::debug!(error = %e, "pruned jobs' events left to expire");
            }
            if (ids.len() as i64) < self.opts.batch {
                break;
            }
            if i + 1 == self.opts.max_batches {
                if let Ok(mut last) = self.last_job_prune.lock() {
                    *last = None;
                }
            }
        }
        Ok(total)
    }
}

/// Whether a periodic step is due (then it is marked as run now).
fn due(last: &std::sync::Mutex<Option<std::time::Instant>>, every: Duration) -> bool {
    let Ok(mut l) = last.lock() else {
        return false;
    };
    if l.is_none_or(|t| t.elapsed() >= every) {
        *l = Some(std::time::Instant::now());
        true
    } else {
        false
    }
}
