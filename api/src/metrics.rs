//! Prometheus metrics of the API process; job and queue gauges are read at scrape time from
//! Postgres and Redis, so every replica reports the same cluster-wide numbers.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::AppState;

type Labels = Vec<(String, String)>;

/// Prefix of every metric name.
pub const PREFIX: &str = "switchyard";
/// The backlog gauge (entries not yet delivered, per queue and priority): the signal the
/// autoscalers read (`deploy/k8s`; checked against the manifests by a test).
pub const QUEUE_BACKLOG: &str = "queue_backlog";

/// The full name of the backlog gauge as Prometheus sees it.
pub fn queue_backlog_metric() -> String {
    format!("{PREFIX}_{QUEUE_BACKLOG}")
}

/// Unfinished jobs counted on a scrape at most; past it, `switchyard_jobs` are estimates.
const EXACT_JOB_COUNTS: i64 = 100_000;

pub struct Metrics {
    registry: Mutex<Registry>,
    submit_latency: Family<Labels, Histogram>,
    delivery_latency: Histogram,
    pub ws_connections: Gauge,
    pub ws_slow_disconnects: Counter,
    jobs: Family<Labels, Gauge>,
    queue_depth: Family<Labels, Gauge>,
    queue_delayed: Family<Labels, Gauge>,
    queue_backlog: Family<Labels, Gauge>,
    queue_in_flight: Family<Labels, Gauge>,
    lease_reclaims: Family<Labels, Gauge>,
    jobs_estimate: Gauge,
    /// 1 while `jobs` holds the planner's estimates (a backlog too large to count per scrape).
    jobs_estimated: Gauge,
    oldest_queued: Family<Labels, Gauge<f64, AtomicU64>>,
    llm_cache: Family<Labels, Gauge>,
    code_runs: Family<Labels, Gauge>,
    code_run_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
    code_start_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
    code_pool: Family<Labels, Gauge>,
    source_up: Family<Labels, Gauge>,
}

/// Longest wait for one read of a scrape.
const SOURCE_READ_LIMIT: Duration = Duration::from_secs(2);

/// One read of a scrape from a source still `up`; a failed or slow read marks it down.
async fn read<T, E>(
    up: &mut bool,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Option<T> {
    if !*up {
        return None;
    }
    match tokio::time::timeout(SOURCE_READ_LIMIT, f).await {
        Ok(Ok(v)) => Some(v),
        _ => {
            *up = false;
            None
        }
    }
}

/// A worker's warm-pool report older than this is ignored (the worker is gone).
const POOL_REPORT_TTL_S: i64 = 120;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix(PREFIX);
        let submit_latency = Family::<Labels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let delivery_latency = latency_histogram();
        let ws_connections = Gauge::default();
        let ws_slow_disconnects = Counter::default();
        let jobs = Family::<Labels, Gauge>::default();
        let queue_depth = Family::<Labels, Gauge>::default();
        let queue_delayed = Family::<Labels, Gauge>::default();
        let queue_backlog = Family::<Labels, Gauge>::default();
        let queue_in_flight = Family::<Labels, Gauge>::default();
        let lease_reclaims = Family::<Labels, Gauge>::default();
        let jobs_estimate = Gauge::default();
        let jobs_estimated = Gauge::default();
        let oldest_queued = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let source_up = Family::<Labels, Gauge>::default();
        let llm_cache = Family::<Labels, Gauge>::default();
        let code_runs = Family::<Labels, Gauge>::default();
        let code_run_seconds = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let code_start_seconds = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let code_pool = Family::<Labels, Gauge>::default();
        registry.register(
            "code_runs",
            "code.exec runs since Redis started, by tier, language and outcome (ok, exit_nonzero, timeout, cpu, memory, output, cancelled, error)",
            code_runs.clone(),
        );
        registry.register(
            "code_run_seconds_sum",
            "Total run time of code.exec programs by tier and language (divide by code_runs for the mean)",
            code_run_seconds.clone(),
        );
        registry.register(
            "code_start_seconds_sum",
            "Total time from taking a code.exec job to its program's start (pool hit, cold start, compile) by tier and language",
            code_start_seconds.clone(),
        );
        registry.register(
            "code_pool_ready",
            "Started gVisor sandboxes waiting for a job, by language, summed over the workers",
            code_pool.clone(),
        );
        registry.register(
            "submit_latency_seconds",
            "Time to accept a job (validation + durable commit), by kind",
            submit_latency.clone(),
        );
        registry.register(
            "event_delivery_latency_seconds",
            "Time from an event's publication by a worker to its hand-off to a client",
            delivery_latency.clone(),
        );
        registry.register(
            "ws_connections",
            "Open WebSocket connections",
            ws_connections.clone(),
        );
        registry.register(
            "ws_slow_disconnects",
            "WebSocket clients closed with 1008 because they stopped reading",
            ws_slow_disconnects.clone(),
        );
        registry.register(
            "jobs",
            "Unfinished jobs (queued, running) by kind and status",
            jobs.clone(),
        );
        registry.register(
            "jobs_estimate",
            "All jobs, the planner's estimate (no scan)",
            jobs_estimate.clone(),
        );
        registry.register(
            "jobs_estimated",
            "1 while switchyard_jobs are the planner's estimates (more unfinished jobs than are counted on a scrape)",
            jobs_estimated.clone(),
        );
        registry.register(
            QUEUE_BACKLOG,
            "Entries of a queue not yet delivered to any worker, per priority: what an autoscaler reads",
            queue_backlog.clone(),
        );
        registry.register(
            "queue_in_flight",
            "Entries delivered to workers and not yet acknowledged, per priority",
            queue_in_flight.clone(),
        );
        registry.register(
            "lease_reclaims",
            "Deliveries taken over from a worker whose lease expired, per queue, since Redis started",
            lease_reclaims.clone(),
        );
        registry.register(
            "queue_depth",
            "Entries in a queue's streams (waiting and in flight)",
            queue_depth.clone(),
        );
        registry.register(
            "queue_delayed",
            "Jobs of a queue waiting for a retry time",
            queue_delayed.clone(),
        );
        registry.register(
            "oldest_queued_age_seconds",
            "How long the oldest job ready to run (not delayed, not waiting for a retry) has waited, per queue",
            oldest_queued.clone(),
        );
        registry.register(
            "metrics_source_up",
            "1 when this scrape read everything it reports from the source (postgres, redis); 0 when a read failed and its series were left out rather than shown stale",
            source_up.clone(),
        );
        registry.register(
            "llm_cache_lookups",
            "LLM response cache lookups since Redis started, by result (hits, misses, shared = served by an identical request's call)",
            llm_cache.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            submit_latency,
            delivery_latency,
            ws_connections,
            ws_slow_disconnects,
            jobs,
            queue_depth,
            queue_delayed,
            queue_backlog,
            queue_in_flight,
            lease_reclaims,
            jobs_estimate,
            jobs_estimated,
            oldest_queued,
            llm_cache,
            code_runs,
            code_run_seconds,
            code_start_seconds,
            code_pool,
            source_up,
        }
    }

    pub fn observe_submit(&self, kind: &str, d: Duration) {
        self.submit_latency
            .get_or_create(&vec![("kind".to_string(), kind.to_string())])
            .observe(d.as_secs_f64());
    }

    pub fn observe_delivery(&self, published: DateTime<Utc>) {
        let secs = (Utc::now() - published)
            .num_microseconds()
            .unwrap_or(0)
            .max(0) as f64
            / 1e6;
        self.delivery_latency.observe(secs);
    }

    pub async fn render(&self, state: &AppState) -> String {
        // a series whose source could not be read is left out, not shown with its last value
        // (an autoscaler would act on a stale backlog); `metrics_source_up` says which failed.
        // After a source's first failed read, the scrape reads nothing more from it: a scrape
        // stays within a few seconds when Redis or Postgres is down.
        let (mut pg, mut redis) = (true, true);
        self.jobs.clear();
        if let Some((counts, estimated)) =
            read(&mut pg, state.store.job_counts(EXACT_JOB_COUNTS)).await
        {
            self.jobs_estimated.set(i64::from(estimated));
            for (kind, status, n) in counts {
                self.jobs
                    .get_or_create(&vec![("kind".into(), kind), ("status".into(), status)])
                    .set(n);
            }
        }
        let queues = read(&mut redis, state.queue.queues())
            .await
            .unwrap_or_else(|| {
                switchyard_core::job::known_queues()
                    .into_iter()
                    .map(String::from)
                    .collect()
            });
        for family in [
            &self.queue_depth,
            &self.queue_delayed,
            &self.queue_backlog,
            &self.queue_in_flight,
        ] {
            family.clear();
        }
        for q in &queues {
            let q = q.as_str();
            if let Some((depth, delayed)) = read(&mut redis, state.queue.depth(q)).await {
                let l = vec![("queue".to_string(), q.to_string())];
                self.queue_depth.get_or_create(&l).set(depth as i64);
                self.queue_delayed.get_or_create(&l).set(delayed as i64);
            }
            for (p, lag, pending) in read(&mut redis, state.queue.backlog(q))
                .await
                .unwrap_or_default()
            {
                let l = vec![
                    ("queue".to_string(), q.to_string()),
                    ("priority".to_string(), p.to_string()),
                ];
                // (Redis cannot always tell a stream's lag: then none is shown)
                if let Some(lag) = lag {
                    self.queue_backlog.get_or_create(&l).set(lag as i64);
                }
                self.queue_in_flight.get_or_create(&l).set(pending as i64);
            }
        }
        if let Some(n) = read(&mut pg, state.store.jobs_estimate()).await {
            self.jobs_estimate.set(n);
        }
        for (q, n) in read(&mut redis, state.queue.reclaims())
            .await
            .unwrap_or_default()
        {
            self.lease_reclaims
                .get_or_create(&vec![("queue".to_string(), q)])
                .set(n);
        }
        self.oldest_queued.clear();
        for (q, age) in read(&mut pg, state.store.oldest_queued(&queues))
            .await
            .unwrap_or_default()
        {
            self.oldest_queued
                .get_or_create(&vec![("queue".to_string(), q)])
                .set(age);
        }
        for (result, n) in read(&mut redis, state.queue.llm_cache_stats())
            .await
            .unwrap_or_default()
        {
            self.llm_cache
                .get_or_create(&vec![("result".to_string(), result)])
                .set(n);
        }
        if let Some((stats, pools)) = read(&mut redis, state.queue.code_stats()).await {
            // every worker process adds its own fields: the stale ones go, or they pile up
            let stale = self.record_code(stats, pools);
            if !stale.is_empty() {
                let _ = read(&mut redis, state.queue.forget_code_pool_reports(&stale)).await;
            }
        }
        for (source, up) in [("postgres", pg), ("redis", redis)] {
            self.source_up
                .get_or_create(&vec![("source".to_string(), source.to_string())])
                .set(i64::from(up));
        }
        let mut out = String::new();
        if let Ok(reg) = self.registry.lock() {
            let _ = encode(&mut out, &reg);
        }
        out
    }

    /// Sets the `code.exec` series; returns the warm-pool reports that are stale (a worker
    /// gone, or idle: it reports again on its next run), to be deleted.
    fn record_code(&self, stats: Vec<(String, i64)>, pools: Vec<(String, String)>) -> Vec<String> {
        let label = |tier: &str, lang: &str| -> Labels {
            vec![
                ("tier".to_string(), tier.to_string()),
                ("language".to_string(), lang.to_string()),
            ]
        };
        for (field, n) in stats {
            let parts: Vec<&str> = field.split('|').collect();
            match parts.as_slice() {
                ["runs", tier, lang, outcome] => {
                    let mut l = label(tier, lang);
                    l.push(("outcome".to_string(), outcome.to_string()));
                    self.code_runs.get_or_create(&l).set(n);
                }
                ["run_ms", tier, lang] => {
                    self.code_run_seconds
                        .get_or_create(&label(tier, lang))
                        .set(n as f64 / 1000.0);
                }
                ["start_ms", tier, lang] => {
                    self.code_start_seconds
                        .get_or_create(&label(tier, lang))
                        .set(n as f64 / 1000.0);
                }
                _ => {}
            }
        }
        let now = Utc::now().timestamp();
        let mut per_lang: std::collections::BTreeMap<String, i64> = Default::default();
        let mut stale = Vec::new();
        for (field, value) in pools {
            let (Some((_, lang)), Some((n, at))) = (field.rsplit_once('|'), value.split_once('|'))
            else {
                stale.push(field);
                continue;
            };
            let (Ok(n), Ok(at)) = (n.parse::<i64>(), at.parse::<i64>()) else {
                stale.push(field);
                continue;
            };
            let sum = per_lang.entry(lang.to_string()).or_default();
            if now - at <= POOL_REPORT_TTL_S {
                *sum += n;
            } else {
                stale.push(field);
            }
        }
        for (lang, n) in per_lang {
            self.code_pool
                .get_or_create(&vec![("language".to_string(), lang)])
                .set(n);
        }
        stale
    }
}
