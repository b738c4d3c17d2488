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
    /// transaction; returns how many changes (0 also when another scheduler is chaining).
    /// Rows left in `audit_outbox` (one change each, written before batches) go first, then
    /// those left in `job_audit_batches` (JSON, written before the arrays), then
    /// `job_audit_changes` (one row per statement and tenant, from the triggers on `jobs`):
    /// batches taken whole, oldest first, until `limit` is reached (at least one). One chainer at a
    /// time (an advisory lock), so changes are chained in the order their ids were committed:
    /// a job's later change never lands before its earlier one.
    pub async fn chain_job_audit(&self, limit: i64) -> Result<usize> {
        let mut tx = self.pool().begin().await?;
        let mine: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(JOB_AUDIT_CHAIN_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !mine {
            return Ok(0);
        }
        let mut entries = take_single_changes(&mut tx, limit).await?;
        for source in [BatchTable::Json, BatchTable::Arrays] {
            if !entries.is_empty() {
                break;
            }
            entries = take_batches(&mut tx, source, limit).await?;
        }
        let n = entries.len();
        if n > 0 {
            append_in(&mut tx, entries).await?;
            tx.commit().await?;
        }
        Ok(n)
    }
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

/// The tables job state changes wait in, a row per statement and tenant.
#[derive(Clone, Copy)]
enum BatchTable {
    /// `job_audit_batches`: a JSON array of changes (written before the arrays).
    Json,
    /// `job_audit_changes`: typed arrays, one element per change.
    Arrays,
}

impl BatchTable {
    fn name(self) -> &'static str {
        match self {
            BatchTable::Json => "job_audit_batches",
            BatchTable::Arrays => "job_audit_changes",
        }
    }

    /// The columns of a [`BatchRow`] from this table.
    fn columns(self) -> &'static str {
        match self {
            BatchTable::Json => {
                "id, tenant_id, at, entries, NULL::uuid[] AS job_ids, NULL::text[] AS statuses,
                 NULL::text[] AS actors, NULL::int4[] AS attempts, NULL::text[] AS kinds,
                 NULL::text[] AS from_statuses, NULL::jsonb[] AS error_codes"
            }
            BatchTable::Arrays => {
                "id, tenant_id, at, NULL::jsonb AS entries, job_ids, statuses, actors, attempts,
                 kinds, from_statuses, error_codes"
            }
        }
    }
}

/// Whole rows of `table`, oldest first, while they fit in `limit` changes (at least one row),
/// expanded into their changes.
async fn take_batches(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    table: BatchTable,
    limit: i64,
) -> Result<Vec<AuditEntry>> {
    let candidates: Vec<(i64, i32)> = sqlx::query_as(&format!(
        "SELECT id, n FROM {} ORDER BY id LIMIT $1",
        table.name()
    ))
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?;
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
        return Ok(Vec::new());
    }
    let mut rows: Vec<BatchRow> = sqlx::query_as(&format!(
        "DELETE FROM {} WHERE id = ANY($1) RETURNING {}",
        table.name(),
        table.columns()
    ))
    .bind(&take)
    .fetch_all(&mut **tx)
    .await?;
    rows.sort_by_key(|r| (r.at, r.id));
    let mut out = Vec::with_capacity(changes as usize);
    for row in rows {
        row.expand(&mut out)?;
    }
    Ok(out)
}

/// The changes of one statement and tenant: typed arrays (`job_audit_changes`, one element
/// per change), or the JSON shape written before them (`job_audit_batches.entries`).
#[derive(sqlx::FromRow)]
struct BatchRow {
    id: i64,
    tenant_id: Uuid,
    at: DateTime<Utc>,
    entries: Option<Value>,
    job_ids: Option<Vec<Uuid>>,
    statuses: Option<Vec<String>>,
    actors: Option<Vec<String>>,
    attempts: Option<Vec<i32>>,
    kinds: Option<Vec<String>>,
    from_statuses: Option<Vec<Option<String>>>,
    error_codes: Option<Vec<Option<Value>>>,
}

impl BatchRow {
    /// Appends the row's changes to `out`, with the actor, action, target and details the
    /// triggers' JSON shape held: an insert's details are `{kind, attempt}`, an update's
    /// `{from, attempt}` and, when the job has one, `error` (its error code).
    fn expand(self, out: &mut Vec<AuditEntry>) -> Result<()> {
        let (tenant, at) = (self.tenant_id, self.at);
        if let Some(entries) = self.entries {
            let batch: Vec<OutboxChange> = serde_json::from_value(entries).map_err(malformed)?;
            out.extend(
                batch
                    .into_iter()
                    .map(|c| job_change(tenant, at, c.actor, c.action, c.target, c.details)),
            );
            return Ok(());
        }
        let missing = || malformed(format!("job audit batch {} has no changes", self.id));
        let ids = self.job_ids.ok_or_else(missing)?;
        let (statuses, actors, attempts) = (
            self.statuses.ok_or_else(missing)?,
            self.actors.ok_or_else(missing)?,
            self.attempts.ok_or_else(missing)?,
        );
        if statuses.len() != ids.len() || actors.len() != ids.len() || attempts.len() != ids.len() {
            return Err(malformed(format!(
                "job audit batch {}: arrays of different lengths",
                self.id
            )));
        }
        let mut kinds = self.kinds.map(Vec::into_iter);
        let mut from = self.from_statuses.map(Vec::into_iter);
        let mut codes = self.error_codes.map(Vec::into_iter);
        let changes = ids.into_iter().zip(statuses).zip(actors).zip(attempts);
        for (((id, status), actor), attempt) in changes {
            let mut details = serde_json::Map::new();
            details.insert("attempt".into(), attempt.into());
            if let Some(kind) = kinds.as_mut().and_then(Iterator::next) {
                details.insert("kind".into(), kind.into());
            }
            if let Some(Some(f)) = from.as_mut().and_then(Iterator::next) {
                details.insert("from".into(), f.into());
            }
            match codes.as_mut().and_then(Iterator::next) {
                Some(Some(code)) if !code.is_null() => {
                    details.insert("error".into(), code);
                }
                _ => {}
            }
            out.push(job_change(
                tenant,
                at,
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
