//! The audit trail: append-only rows hash-chained per tenant (each row's hash covers the
//! previous row's hash and its own fields), appended in batches (one chain-head lock per
//! tenant per batch), listed with filters, verified link by link, and pruned with an anchor
//! the verifier starts from.

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{Result, Store};

/// The hash a chain starts from.
pub const GENESIS: [u8; 32] = [0; 32];

/// One thing to record.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub tenant_id: Uuid,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: i32,
    pub request_id: String,
    pub source: String,
    pub details: Value,
}

/// A stored row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AuditRow {
    pub tenant_id: Uuid,
    pub seq: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: i32,
    pub request_id: String,
    pub source: String,
    #[schema(value_type = Object)]
    pub details: Value,
    /// Hex of the previous row's hash and of this row's.
    #[serde(serialize_with = "hex_bytes")]
    #[schema(value_type = String)]
    pub prev_hash: Vec<u8>,
    #[serde(serialize_with = "hex_bytes")]
    #[schema(value_type = String)]
    pub hash: Vec<u8>,
}

fn hex_bytes<S: serde::Serializer>(b: &[u8], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(b))
}

/// The hash of a row: SHA-256 over the previous hash and the row's fields, each
/// length-prefixed (so no two rows encode alike).
#[allow(clippy::too_many_arguments)]
pub fn chain_hash(
    prev: &[u8],
    tenant: Uuid,
    seq: i64,
    at: DateTime<Utc>,
    actor: &str,
    action: &str,
    target: &str,
    outcome: i32,
    request_id: &str,
    source: &str,
    details: &Value,
) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut field = |b: &[u8]| {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    };
    field(prev);
    field(tenant.as_bytes());
    field(&seq.to_be_bytes());
    field(&at.timestamp_micros().to_be_bytes());
    field(actor.as_bytes());
    field(action.as_bytes());
    field(target.as_bytes());
    field(&outcome.to_be_bytes());
    field(request_id.as_bytes());
    field(source.as_bytes());
    field(details.to_string().as_bytes());
    h.finalize().into()
}

fn row_hash(prev: &[u8], r: &AuditRow) -> [u8; 32] {
    chain_hash(
        prev,
        r.tenant_id,
        r.seq,
        r.at,
        &r.actor,
        &r.action,
        &r.target,
        r.outcome,
        &r.request_id,
        &r.source,
        &r.details,
    )
}

/// Filters of [`Store::list_audit`].
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub after_seq: i64,
    pub limit: i64,
    pub action: Option<String>,
    pub actor: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// What [`Store::verify_audit`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditVerification {
    /// Rows checked.
    pub checked: u64,
    /// The first row whose link or hash does not match (`None`: the chain is intact).
    pub first_broken: Option<i64>,
    /// Why, for the first broken row.
    pub reason: Option<String>,
}

/// One batch's rows as columns (for `UNNEST`).
#[derive(Default)]
struct Columns {
    seq: Vec<i64>,
    at: Vec<DateTime<Utc>>,
    actor: Vec<String>,
    action: Vec<String>,
    target: Vec<String>,
    outcome: Vec<i32>,
    request_id: Vec<String>,
    source: Vec<String>,
    details: Vec<Value>,
    prev_hash: Vec<Vec<u8>>,
    hash: Vec<Vec<u8>>,
}

const COLUMNS: &str =
    "tenant_id, seq, at, actor, action, target, outcome, request_id, source, details, prev_hash, hash";

/// Most rows one call of `switchyard_prune_audit` deletes (migration 30).
const AUDIT_PRUNE_BATCH: i64 = 10_000;

impl Store {
    /// Appends entries (any tenants) in one transaction: per tenant, the chain head is locked
    /// once (tenants in id order, so concurrent batches never deadlock), the rows are numbered
    /// and hashed in order, and the head moves to the last one.
    pub async fn append_audit(&self, entries: Vec<AuditEntry>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool().begin().await?;
        append_in(&mut tx, entries).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deletes every tenant's audit rows older than `before` (retention), re-anchoring each
    /// chain; returns how many rows went.
    pub async fn prune_audit_all(&self, before: DateTime<Utc>) -> Result<u64> {
        let tenants: Vec<Uuid> = sqlx::query_scalar("SELECT tenant_id FROM audit_heads")
            .fetch_all(self.pool())
            .await?;
        let mut n = 0;
        for t in tenants {
            n += self.prune_audit(t, before).await?;
        }
        Ok(n)
    }
}

/// Appends entries (any tenants) inside `tx`; see [`Store::append_audit`].
pub(crate) async fn append_in(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    entries: Vec<AuditEntry>,
) -> Result<()> {
    let mut by_tenant: BTreeMap<Uuid, Vec<AuditEntry>> = BTreeMap::new();
    for mut e in entries {
        // the stored precision, so the hash is computed over what is stored
        e.at = e.at.trunc_subsecs(6);
        by_tenant.entry(e.tenant_id).or_default().push(e);
    }
    for (tenant, rows) in by_tenant {
        sqlx::query(
            "INSERT INTO audit_heads (tenant_id, seq, hash, anchor_hash) VALUES ($1, 0, $2, $2)
             ON CONFLICT (tenant_id) DO NOTHING",
        )
        .bind(tenant)
        .bind(&GENESIS[..])
        .execute(&mut **tx)
        .await?;
        let (mut seq, mut prev): (i64, Vec<u8>) =
            sqlx::query_as("SELECT seq, hash FROM audit_heads WHERE tenant_id = $1 FOR UPDATE")
                .bind(tenant)
                .fetch_one(&mut **tx)
                .await?;
        let n = rows.len();
        let mut cols = Columns::default();
        for e in rows {
            seq += 1;
            let hash = chain_hash(
                &prev,
                tenant,
                seq,
                e.at,
                &e.actor,
                &e.action,
                &e.target,
                e.outcome,
                &e.request_id,
                &e.source,
                &e.details,
            );
            cols.seq.push(seq);
            cols.at.push(e.at);
            cols.actor.push(e.actor);
            cols.action.push(e.action);
            cols.target.push(e.target);
            cols.outcome.push(e.outcome);
            cols.request_id.push(e.request_id);
            cols.source.push(e.source);
            cols.details.push(e.details);
            cols.prev_hash
                .push(std::mem::replace(&mut prev, hash.to_vec()));
            cols.hash.push(hash.to_vec());
        }
        sqlx::query(
            "INSERT INTO audit_events (tenant_id, seq, at, actor, action, target, outcome,
                                       request_id, source, details, prev_hash, hash)
             SELECT $1, * FROM UNNEST($2::bigint[], $3::timestamptz[], $4::text[], $5::text[],
                    $6::text[], $7::int[], $8::text[], $9::text[], $10::jsonb[], $11::bytea[],
                    $12::bytea[])",
        )
        .bind(tenant)
        .bind(&cols.seq)
        .bind(&cols.at)
        .bind(&cols.actor)
        .bind(&cols.action)
        .bind(&cols.target)
        .bind(&cols.outcome)
        .bind(&cols.request_id)
        .bind(&cols.source)
        .bind(&cols.details)
        .bind(&cols.prev_hash)
        .bind(&cols.hash)
        .execute(&mut **tx)
        .await?;
        sqlx::query("UPDATE audit_heads SET seq = $2, hash = $3 WHERE tenant_id = $1")
            .bind(tenant)
            .bind(seq)
            .bind(&prev)
            .execute(&mut **tx)
            .await?;
        tracing::trace!(%tenant, n, "audit rows appended");
    }
    Ok(())
}

impl Store {
    /// A tenant's audit rows after `after_seq`, oldest first, filtered.
    pub async fn list_audit(&self, tenant: Uuid, f: &AuditFilter) -> Result<Vec<AuditRow>> {
        let mut tx = self.tenant_tx(tenant).await?;
        let out = sqlx::query_as::<_, AuditRow>(&format!(
            "SELECT {COLUMNS} FROM audit_events
             WHERE tenant_id = $1 AND seq > $2
               AND ($3::text IS NULL OR action = $3)
               AND ($4::text IS NULL OR actor = $4)
               AND ($5::timestamptz IS NULL OR at >= $5)
               AND ($6::timestamptz IS NULL OR at < $6)
             ORDER BY seq LIMIT $7"
        ))
        .bind(tenant)
        .bind(f.after_seq)
        .bind(&f.action)
        .bind(&f.actor)
        .bind(f.since)
        .bind(f.until)
        .bind(f.limit.clamp(1, 1000))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Checks a tenant's chain from its anchor to its head: every row must link to the previous
    /// row's hash, hash to its stored hash, and follow without gaps; the head must match the
    /// last row. The head and the rows are read in one snapshot, so rows appended while it
    /// runs (the API's trail, the scheduler's chaining) neither break nor lengthen the chain
    /// it checks.
    pub async fn verify_audit(&self, tenant: Uuid) -> Result<AuditVerification> {
        let mut tx = self
            .pool()
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let head: Option<(i64, Vec<u8>, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT seq, hash, anchor_seq, anchor_hash FROM audit_heads WHERE tenant_id = $1",
        )
        .bind(tenant)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((head_seq, head_hash, anchor_seq, anchor_hash)) = head else {
            return Ok(AuditVerification {
                checked: 0,
                first_broken: None,
                reason: None,
            });
        };
        let mut prev = anchor_hash;
        let mut expected = anchor_seq + 1;
        let mut checked = 0u64;
        let broken = |seq: i64, why: String, checked: u64| AuditVerification {
            checked,
            first_broken: Some(seq),
            reason: Some(why),
        };
        loop {
            let rows = sqlx::query_as::<_, AuditRow>(&format!(
                "SELECT {COLUMNS} FROM audit_events WHERE tenant_id = $1 AND seq >= $2
                 ORDER BY seq LIMIT 1000"
            ))
            .bind(tenant)
            .bind(expected)
            .fetch_all(&mut *tx)
            .await?;
            if rows.is_empty() {
                break;
            }
            for r in rows {
                if r.seq != expected {
                    return Ok(broken(
                        expected,
                        format!("row {expected} is missing"),
                        checked,
                    ));
                }
                if r.prev_hash != prev {
                    return Ok(broken(
                        r.seq,
                        "does not link to the previous row".into(),
                        checked,
                    ));
                }
                let h = row_hash(&prev, &r);
                if r.hash != h {
                    return Ok(broken(
                        r.seq,
                        "contents do not match its hash".into(),
                        checked,
                    ));
                }
                prev = h.to_vec();
                expected += 1;
                checked += 1;
            }
        }
        if expected - 1 != head_seq || prev != head_hash {
            return Ok(broken(
                expected,
                format!(
                    "the chain ends at {} but its head says {head_seq}",
                    expected - 1
                ),
                checked,
            ));
        }
        Ok(AuditVerification {
            checked,
            first_broken: None,
            reason: None,
        })
    }

    /// The youngest rows pruning may delete (`audit_settings.min_retention`, which only the
    /// database owner can change; 30 days unless it did).
    pub async fn audit_min_retention(&self) -> Result<std::time::Duration> {
        let secs: f64 = sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM min_retention)::float8 FROM audit_settings",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(std::time::Duration::from_secs_f64(secs.max(0.0)))
    }

    /// Deletes the oldest stretch of a tenant's chain whose rows are all older than `before`
    /// (and than the minimum retention, see [`Store::audit_min_retention`]): a row with an old
    /// time chained after newer ones does not take them along. Re-anchors the chain at the
    /// last one deleted, so verification starts there. Returns the rows deleted.
    pub async fn prune_audit(&self, tenant: Uuid, before: DateTime<Utc>) -> Result<u64> {
        // as the owner (the services' role may not delete audit rows): migration 26; in
        // batches of at most AUDIT_PRUNE_BATCH rows, the head locked for one batch at a time
        // (migration 30)
        let mut total = 0u64;
        loop {
            let n: i64 = sqlx::query_scalar("SELECT switchyard_prune_audit($1, $2)")
                .bind(tenant)
                .bind(before)
                .fetch_one(self.pool())
                .await?;
            total += n.max(0) as u64;
            if n < AUDIT_PRUNE_BATCH {
                break;
            }
        }
        Ok(total)
    }
}
