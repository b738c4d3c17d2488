//! Usage per tenant: tokens and cost of succeeded `llm.chat` jobs, grouped by model or UTC day
//! (served by the partial index `jobs_chat_succeeded_finished`).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{Result, Store};

/// How usage rows are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGroup {
    /// The alias that served the call (`output.model`, else the requested `input.model`).
    Model,
    /// The UTC day the job finished, `YYYY-MM-DD`.
    Day,
}

impl UsageGroup {
    pub fn parse(s: &str) -> Option<UsageGroup> {
        match s {
            "model" => Some(UsageGroup::Model),
            "day" => Some(UsageGroup::Day),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            UsageGroup::Model => "model",
            UsageGroup::Day => "day",
        }
    }

    /// The SQL grouping key (a constant expression per variant, never user input).
    fn key_sql(self) -> &'static str {
        match self {
            UsageGroup::Model => "COALESCE(output->>'model', input->>'model', '')",
            UsageGroup::Day => "to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        }
    }
}

/// Sums over a set of jobs.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct UsageSums {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub cost_usd: f64,
}

/// One group: its key (a model alias or a day) and its sums.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    pub key: String,
    pub sums: UsageSums,
}

/// The groups, sorted by key, and the total over all of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageReport {
    pub rows: Vec<UsageRow>,
    pub total: UsageSums,
}

#[derive(sqlx::FromRow)]
struct Grouped {
    key: Option<String>,
    is_total: bool,
    #[sqlx(flatten)]
    sums: UsageSums,
}

/// A JSON number at `path` of a job's output, 0 when absent or not a number (old or odd rows
/// never fail the whole report).
fn number(path: &str) -> String {
    format!(
        "CASE WHEN jsonb_typeof(output #> '{path}') = 'number' \
         THEN (output #>> '{path}')::numeric ELSE 0 END"
    )
}

impl Store {
    /// Usage of `tenant_id`'s succeeded `llm.chat` jobs that finished in `[from, to)`. Sums are
    /// exact (`numeric`) and the total comes from the same scan (a grouping set), so it equals the
    /// sum of the rows.
    pub async fn usage(
        &self,
        tenant_id: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        group: UsageGroup,
    ) -> Result<UsageReport> {
        let mut tx = self.tenant_tx(tenant_id).await?;
        let prompt = number("{usage,prompt_tokens}");
        let completion = number("{usage,completion_tokens}");
        // total_tokens when the provider reported it, else prompt + completion
        let total = format!(
            "CASE WHEN jsonb_typeof(output #> '{{usage,total_tokens}}') = 'number' \
             THEN (output #>> '{{usage,total_tokens}}')::numeric ELSE {prompt} + {completion} END"
        );
        let cost = number("{cost_usd}");
        // The literal `kind` and `status` predicates match the partial index.
        let sql = format!(
            "SELECT k AS key, GROUPING(k) = 1 AS is_total,
                    count(*) AS requests,
                    COALESCE(sum(p), 0)::bigint AS prompt_tokens,
                    COALESCE(sum(c), 0)::bigint AS completion_tokens,
                    COALESCE(sum(t), 0)::bigint AS total_tokens,
                    COALESCE(sum(u), 0)::float8 AS cost_usd
             FROM (
                SELECT {key} AS k, {prompt} AS p, {completion} AS c, {total} AS t, {cost} AS u
                FROM jobs
                WHERE tenant_id = $1 AND kind = 'llm.chat' AND status = 'succeeded'
                  AND finished_at >= $2 AND finished_at < $3
             ) j
             GROUP BY GROUPING SETS ((k), ())
             ORDER BY is_total, k COLLATE \"C\"",
            key = group.key_sql(),
        );
        let rows = sqlx::query_as::<_, Grouped>(&sql)
            .bind(tenant_id)
            .bind(from)
            .bind(to)
            .fetch_all(&mut *tx)
            .await?;
        let mut report = UsageReport::default();
        for r in rows {
            if r.is_total {
                report.total = r.sums;
            } else {
                report.rows.push(UsageRow {
                    key: r.key.unwrap_or_default(),
                    sums: r.sums,
                });
            }
        }
        tx.commit().await?;
        Ok(report)
    }
}
