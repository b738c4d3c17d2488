//! Job state changes into the audit trail: the triggers on `jobs` leave each statement's
//! changes in `job_audit_changes` (typed arrays; earlier releases: a JSON array per
//! `job_audit_batches` row, and before that one change per `audit_outbox` row), and the
//! scheduler moves them into the hash-chained `audit_events`, one row per change.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::audit::{append_in, AuditEntry};
use crate::{Result, Store};

/// One job state change in a `job_audit_batches` row (the JSON shape before the arrays).
#[derive(serde::Deserialize)]
struct OutboxChange {
    actor: String,
    action: String,
    target: String,
    details: Value,
}

impl Store {
    /// Moves about `limit` job state changes from the outbox into the chained trail, in one
    /// transaction (none when another scheduler is chaining). Rows left in `audit_outbox` (one
    /// change each, written before batches) go first, then those left in `job_audit_batches`
    /// (JSON, written before the arrays), then `job_audit_changes` (one row per statement and
    /// tenant, from the triggers on `jobs`): batches taken whole, oldest first, until `limit`
    /// is reached (at least one). One chainer at a time (an advisory lock), so changes are
    /// chained in the order their ids were committed: a job's later change never lands before
    /// its earlier one. [`Chained::more`] says whether changes were left behind: a caller
    /// that stops when it is false does not chase the changes committed while it chained
    /// (under load that turned into a transaction per statement, not per page).
    pub async fn chain_job_audit(&self, limit: i64) -> Result<Chained> {
        let mut tx = self.pool().begin().await?;
        let mine: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(JOB_AUDIT_CHAIN_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !mine {
            return Ok(Chained::default());
        }
        // the formats of earlier releases: whatever is there, more may follow
        let mut entries = take_single_changes(&mut tx, limit).await?;
        let mut more = !entries.is_empty();
        if entries.is_empty() {
            entries = take_batches::<JsonBatch>(&mut tx, limit).await?.0;
            more = !entries.is_empty();
        }
        if entries.is_empty() {
            (entries, more) = take_batches::<ArrayBatch>(&mut tx, limit).await?;
        }
        let changes = entries.len();
        if changes > 0 {
            append_in(&mut tx, entries).await?;
            tx.commit().await?;
        }
        Ok(Chained { changes, more })
    }
}

/// What one [`Store::chain_job_audit`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Chained {
    /// Changes appended to the trail.
    pub changes: usize,
    /// Changes were left in the outbox (a full page, or a format of an earlier release).
    pub more: bool,
}

/// Key of the advisory lock that lets one scheduler at a time chain job state changes.
pub const JOB_AUDIT_CHAIN_LOCK: i64 = 0x5357_4a41_5544_4954;

fn job_change(
    tenant_id: Uuid,
    at: DateTime<Utc>,
    actor: String,
    action: String,
    target: String,
    details: Value,
) -> AuditEntry {
    AuditEntry {
        tenant_id,
        at,
        actor,
        action,
        target,
        outcome: 0,
        request_id: String::new(),
        source: String::new(),
        details,
    }
}

/// Up to `limit` single-change rows of `audit_outbox` (the format before batches), in order.
async fn take_single_changes(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    limit: i64,
) -> Result<Vec<AuditEntry>> {
    type Row = (i64, Uuid, DateTime<Utc>, String, String, String, Value);
    let mut rows: Vec<Row> = sqlx::query_as(
        "DELETE FROM audit_outbox WHERE id IN (SELECT id FROM audit_outbox ORDER BY id LIMIT $1)
         RETURNING id, tenant_id, at, actor, action, target, details",
    )
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?;
    // DELETE ... RETURNING has no order: chain in the order the changes happened
    rows.sort_by_key(|r| (r.2, r.0));
    Ok(rows
        .into_iter()
        .map(|(_, t, at, actor, action, target, details)| {
            job_change(t, at, actor, action, target, details)
        })
        .collect())
}

/// A table job state changes wait in, a row per statement and tenant.
trait Batch: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin {
    const TABLE: &'static str;
    /// (when the statement wrote it, its id): the order to chain rows in.
    fn order(&self) -> (DateTime<Utc>, i64);
    /// Appends the row's changes to `out`.
    fn expand(self, out: &mut Vec<AuditEntry>) -> Result<()>;
}

/// Whole rows of `B`'s table, oldest first, while they fit in `limit` changes (at least one
/// row), expanded into their changes; and whether rows were left behind.
async fn take_batches<B: Batch>(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    limit: i64,
) -> Result<(Vec<AuditEntry>, bool)> {
    let candidates: Vec<(i64, i32)> = sqlx::query_as(&format!(
        "SELECT id, n FROM {} ORDER BY id LIMIT $1",
        B::TABLE
    ))
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?;
    let full_page = candidates.len() as i64 >= limit;
    let seen = candidates.len();
    let mut take = Vec::new();
    let mut changes = 0i64;
    for (id, n) in candidates {
        if !take.is_empty() && changes + i64::from(n) > limit {
            break;
        }
        take.push(id);
        changes += i64::from(n);
    }
    if take.is_empty() {
        return Ok((Vec::new(), false));
    }
    let more = full_page || take.len() < seen;
    let mut rows: Vec<B> = sqlx::query_as(&format!(
        "DELETE FROM {} WHERE id = ANY($1) RETURNING *",
        B::TABLE
    ))
    .bind(&take)
    .fetch_all(&mut **tx)
    .await?;
    rows.sort_by_key(B::order);
    let mut out = Vec::with_capacity(changes as usize);
    for row in rows {
        row.expand(&mut out)?;
    }
    Ok((out, more))
}

/// A `job_audit_batches` row: a JSON array of changes (written before the arrays).
#[derive(sqlx::FromRow)]
struct JsonBatch {
    id: i64,
    tenant_id: Uuid,
    at: DateTime<Utc>,
    entries: Value,
}

impl Batch for JsonBatch {
    const TABLE: &'static str = "job_audit_batches";

    fn order(&self) -> (DateTime<Utc>, i64) {
        (self.at, self.id)
    }

    fn expand(self, out: &mut Vec<AuditEntry>) -> Result<()> {
        let (tenant, at) = (self.tenant_id, self.at);
        let batch: Vec<OutboxChange> = serde_json::from_value(self.entries).map_err(malformed)?;
        out.extend(
            batch
                .into_iter()
                .map(|c| job_change(tenant, at, c.actor, c.action, c.target, c.details)),
        );
        Ok(())
    }
}

/// A `job_audit_changes` row: typed arrays, one element per change.
#[derive(sqlx::FromRow)]
struct ArrayBatch {
    id: i64,
    tenant_id: Uuid,
    at: DateTime<Utc>,
    job_ids: Vec<Uuid>,
    statuses: Vec<String>,
    actors: Vec<String>,
    attempts: Vec<i32>,
    /// inserted jobs
    kinds: Option<Vec<String>>,
    /// updated jobs
    from_statuses: Option<Vec<Option<String>>>,
    error_codes: Option<Vec<Option<Value>>>,
}

impl Batch for ArrayBatch {
    const TABLE: &'static str = "job_audit_changes";

    fn order(&self) -> (DateTime<Utc>, i64) {
        (self.at, self.id)
    }

    /// The actor, action, target and details the JSON shape held: an insert's details are
    /// `{kind, attempt}`, an update's `{from, attempt}` and, when the job has one, `error`
    /// (its error code).
    fn expand(self, out: &mut Vec<AuditEntry>) -> Result<()> {
        let n = self.job_ids.len();
        if self.statuses.len() != n || self.actors.len() != n || self.attempts.len() != n {
            return Err(malformed(format!(
                "job audit batch {}: arrays of different lengths",
                self.id
            )));
        }
        let mut kinds = self.kinds.map(Vec::into_iter);
        let mut from = self.from_statuses.map(Vec::into_iter);
        let mut codes = self.error_codes.map(Vec::into_iter);
        let changes = (self.job_ids.into_iter())
            .zip(self.statuses)
            .zip(self.actors)
            .zip(self.attempts);
        for (((id, status), actor), attempt) in changes {
            let mut details = serde_json::Map::new();
            details.insert("attempt".into(), attempt.into());
            if let Some(kind) = kinds.as_mut().and_then(Iterator::next) {
                details.insert("kind".into(), kind.into());
            }
            if let Some(Some(f)) = from.as_mut().and_then(Iterator::next) {
                details.insert("from".into(), f.into());
            }
            if let Some(Some(code)) = codes.as_mut().and_then(Iterator::next) {
                if !code.is_null() {
                    details.insert("error".into(), code);
                }
            }
            out.push(job_change(
                self.tenant_id,
                self.at,
                actor,
                format!("job.{status}"),
                format!("job:{id}"),
                Value::Object(details),
            ));
        }
        Ok(())
    }
}

fn malformed(e: impl std::fmt::Display) -> crate::StoreError {
    crate::StoreError::Database(sqlx::Error::Decode(e.to_string().into()))
}
