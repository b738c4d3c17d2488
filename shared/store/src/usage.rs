//! Usage per tenant: tokens and cost of finished `llm.chat` jobs (the replies of succeeded ones
//! and the conversation summaries written for them; the tokens every attempt was charged,
//! whatever it ended as), grouped by model or UTC day (served by the partial index
//! `jobs_chat_finished`).

use chrono::{DateTime, Utc};

use crate::{Result, Scope, Store};

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

    /// The SQL grouping key of a job's reply or of its summary call (a constant expression
    /// per variant, never user input).
    fn key_sql(self, summary: bool) -> &'static str {
        match (self, summary) {
            (UsageGroup::Model, false) => "COALESCE(output->>'model', input->>'model', '')",
            (UsageGroup::Model, true) => "COALESCE(output #>> '{summary,model}', '')",
            (UsageGroup::Day, _) => "to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        }
    }
}

/// Sums over a set of jobs.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct UsageSums {
    pub requests: i64,
    pub failed_requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub cost_usd: f64,
    pub charged_tokens: i64,
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
        "CASE WHEN jsonb_typeof(output #> '{{{path}}}') = 'number' \
         THEN (output #>> '{{{path}}}')::numeric ELSE 0 END"
    )
}

/// The SQL of one counted part of a job's output: the reply (top level) or the summary call
/// (under `summary`).
struct Part {
    prompt: String,
    completion: String,
    total: String,
    cost: String,
}

impl Part {
    fn at(prefix: &str) -> Part {
        let prompt = number(&format!("{prefix}usage,prompt_tokens"));
        let completion = number(&format!("{prefix}usage,completion_tokens"));
        // total_tokens when the provider reported it, else prompt + completion
        let path = format!("{prefix}usage,total_tokens");
        let total = format!(
            "CASE WHEN jsonb_typeof(output #> '{{{path}}}') = 'number' \
             THEN (output #>> '{{{path}}}')::numeric ELSE {prompt} + {completion} END"
        );
        Part {
            cost: number(&format!("{prefix}cost_usd")),
            prompt,
            completion,
            total,
        }
    }

    fn reply() -> Part {
        Part::at("")
    }

    fn summary() -> Part {
        Part::at("summary,")
    }
}

impl Store {
    /// Usage of the `llm.chat` jobs in `scope` (a tenant's, or an end user's own) that finished
    /// in `[from, to)`: a succeeded job counts its reply (under the model that answered) and,
    /// when the turn wrote a conversation summary, that call's tokens and cost (under the
    /// summary's model; no request of its own); a failed or cancelled one counts as a failed
    /// request (under the model asked for); every job adds the tokens its attempts were charged
    /// against the tenant's daily quota (`charged_tokens`: cut, failed and retried attempts
    /// included, a cache hit nothing).
    /// Sums are exact (`numeric`) and the total comes from the same scan (a grouping set), so it
    /// equals the sum of the rows.
    pub async fn usage(
        &self,
        scope: impl Into<Scope>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        group: UsageGroup,
    ) -> Result<UsageReport> {
        let scope = scope.into();
        let tenant_id = scope.tenant_id;
        let mut tx = self.tenant_tx(tenant_id).await?;
        let (reply, summary) = (Part::reply(), Part::summary());
        // a job's `cost_usd` is its whole cost: the reply's share is what the summary left
        let reply_cost = format!("{} - {}", reply.cost, summary.cost);
        // The literal `kind` and `status` predicates match the partial index. Only a succeeded
        // job's output counts (a failed one has none, or one it could not keep).
        let sql = format!(
            "SELECT k AS key, GROUPING(k) = 1 AS is_total,
                    COALESCE(sum(n), 0)::bigint AS requests,
                    COALESCE(sum(f), 0)::bigint AS failed_requests,
                    COALESCE(sum(p), 0)::bigint AS prompt_tokens,
                    COALESCE(sum(c), 0)::bigint AS completion_tokens,
                    COALESCE(sum(t), 0)::bigint AS total_tokens,
                    COALESCE(sum(u), 0)::float8 AS cost_usd,
                    COALESCE(sum(ch), 0)::bigint AS charged_tokens
             FROM (
                SELECT part.*
                FROM jobs CROSS JOIN LATERAL (VALUES
                    (true, {reply_key}, (status = 'succeeded')::int, (status <> 'succeeded')::int,
                     CASE WHEN status = 'succeeded' THEN {rp} ELSE 0 END,
                     CASE WHEN status = 'succeeded' THEN {rc} ELSE 0 END,
                     CASE WHEN status = 'succeeded' THEN {rt} ELSE 0 END,
                     CASE WHEN status = 'succeeded' THEN {reply_cost} ELSE 0 END, charged_tokens),
                    (false, {summary_key}, 0, 0, {sp}, {sc}, {st}, {su}, 0::bigint)
                ) AS part(reply, k, n, f, p, c, t, u, ch)
                WHERE tenant_id = $1 AND kind = 'llm.chat'
                  AND status IN ('succeeded', 'failed', 'cancelled')
                  AND finished_at >= $2 AND finished_at < $3
                  AND ($4::text IS NULL OR created_by = $4)
                  AND (part.reply OR (status = 'succeeded'
                       AND jsonb_typeof(output -> 'summary') = 'object'))
             ) j
             GROUP BY GROUPING SETS ((k), ())
             ORDER BY is_total, k COLLATE \"C\"",
            reply_key = group.key_sql(false),
            summary_key = group.key_sql(true),
            rp = reply.prompt,
            rc = reply.completion,
            rt = reply.total,
            sp = summary.prompt,
            sc = summary.completion,
            st = summary.total,
            su = summary.cost,
        );
        let rows = sqlx::query_as::<_, Grouped>(&sql)
            .bind(tenant_id)
            .bind(from)
            .bind(to)
            .bind(scope.creator.as_deref())
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
