//! `code.exec` metrics: each worker adds its runs to cluster-wide counters in Redis (by tier,
//! language and outcome; run and start time sums) and reports its warm pools; every API's
//! `/metrics` reads them.

use switchyard_core::code::{CodeExecOutput, KilledBy, Language, Tier};
use switchyard_queue::Keys;
use switchyard_queue::RedisConn;

/// Where a worker's code metrics go.
#[derive(Clone)]
pub struct CodeMetrics {
    conn: RedisConn,
    keys: Keys,
    /// This process (pool reports are per worker).
    instance: String,
}

/// How a run ended, as a metric label.
pub fn outcome_label(out: &CodeExecOutput) -> &'static str {
    match (out.killed_by, out.exit_code) {
        (Some(KilledBy::Timeout), _) => "timeout",
        (Some(KilledBy::Cpu), _) => "cpu",
        (Some(KilledBy::Memory), _) => "memory",
        (Some(KilledBy::Output), _) => "output",
        (Some(KilledBy::Disk), _) => "disk",
        (None, Some(0)) => "ok",
        (None, Some(_)) => "exit_nonzero",
        (None, None) => "cancelled",
    }
}

impl CodeMetrics {
    pub fn new(conn: RedisConn, keys: Keys) -> CodeMetrics {
        CodeMetrics {
            conn,
            keys,
            instance: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// Counts one run (`outcome`: [`outcome_label`], or `error` when the sandbox failed) and
    /// reports the warm pools. Best effort: metrics never fail a job.
    pub async fn record(
        &self,
        tier: Tier,
        language: Language,
        outcome: &str,
        run_ms: u64,
        start_ms: u64,
        pools: &[(Language, usize)],
    ) {
        let (t, l) = (tier.as_str(), language.as_str());
        let stats = self.keys.code_stats();
        let mut p = redis::pipe();
        p.hincr(&stats, format!("runs|{t}|{l}|{outcome}"), 1)
            .ignore()
            .hincr(&stats, format!("run_ms|{t}|{l}"), run_ms)
            .ignore()
            .hincr(&stats, format!("start_ms|{t}|{l}"), start_ms)
            .ignore();
        let now = chrono::Utc::now().timestamp();
        for (lang, n) in pools {
            p.hset(
                self.keys.code_pool(),
                format!("{}|{}", self.instance, lang.as_str()),
                format!("{n}|{now}"),
            )
            .ignore();
        }
        let mut c = self.conn.clone();
        if let Err(e) = p.query_async::<()>(&mut c).await {
            tracing::debug!(error = %e, "code metrics not recorded");
        }
    }
}
