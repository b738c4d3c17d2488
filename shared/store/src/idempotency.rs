//! Idempotent job submission: an `Idempotency-Key` and the job it created, written in one
//! transaction (concurrent duplicates wait on the key's row and then see it), kept 24 h.

use uuid::Uuid;

use crate::{NewJob, Result, Store};

/// How long a key keeps returning its job.
pub const IDEMPOTENCY_TTL_H: i64 = 24;

/// What submitting under a key did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Idempotent {
    /// The key was new (or expired): the job was inserted.
    Created,
    /// The key was used with the same body: this is its job.
    Existing(Uuid),
    /// The key was used with a different body.
    Conflict(Uuid),
}

impl Store {
    /// Inserts `job` under `key` unless the key is live; see [`Idempotent`].
    pub async fn insert_job_idempotent(
        &self,
        key: &str,
        digest: &[u8; 32],
        job: &NewJob,
    ) -> Result<Idempotent> {
        let mut tx = self.tenant_tx(job.tenant_id).await?;
        sqlx::query("DELETE FROM idempotency_keys WHERE tenant_id = $1 AND key = $2 AND expires_at <= now()")
            .bind(job.tenant_id)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        // a concurrent request with the same key waits here until the first one commits
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (tenant_id, key, request_digest, job_id, expires_at)
             VALUES ($1, $2, $3, $4, now() + make_interval(hours => $5))
             ON CONFLICT (tenant_id, key) DO NOTHING",
        )
        .bind(job.tenant_id)
        .bind(key)
        .bind(&digest[..])
        .bind(job.id)
        .bind(IDEMPOTENCY_TTL_H as i32)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if inserted {
            crate::insert::insert_jobs_with(&mut *tx, std::slice::from_ref(job)).await?;
            tx.commit().await?;
            return Ok(Idempotent::Created);
        }
        let (stored, job_id): (Vec<u8>, Uuid) = sqlx::query_as(
            "SELECT request_digest, job_id FROM idempotency_keys WHERE tenant_id = $1 AND key = $2",
        )
        .bind(job.tenant_id)
        .bind(key)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(if stored == digest[..] {
            Idempotent::Existing(job_id)
        } else {
            Idempotent::Conflict(job_id)
        })
    }

    /// What a live `key` of `tenant` says of a request with `digest`: its job
    /// ([`Idempotent::Existing`]) or [`Idempotent::Conflict`]; `None` when the key is not
    /// live (the request goes on to [`Store::insert_job_idempotent`], which settles races).
    pub async fn live_idempotency_key(
        &self,
        tenant: Uuid,
        key: &str,
        digest: &[u8; 32],
    ) -> Result<Option<Idempotent>> {
        let row: Option<(Vec<u8>, Uuid)> = sqlx::query_as(
            "SELECT request_digest, job_id FROM idempotency_keys
             WHERE tenant_id = $1 AND key = $2 AND expires_at > now()",
        )
        .bind(tenant)
        .bind(key)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|(stored, job)| {
            if stored == digest[..] {
                Idempotent::Existing(job)
            } else {
                Idempotent::Conflict(job)
            }
        }))
    }

    /// Deletes up to `limit` expired keys; returns how many.
    pub async fn prune_idempotency_keys(&self, limit: i64) -> Result<u64> {
        Ok(sqlx::query(
            "DELETE FROM idempotency_keys WHERE ctid IN
                (SELECT ctid FROM idempotency_keys WHERE expires_at <= now() LIMIT $1)",
        )
        .bind(limit)
        .execute(self.pool())
        .await?
        .rows_affected())
    }

    /// Inserts one tenant's jobs, all or nothing, confined to that tenant (a batch submit).
    pub async fn insert_tenant_jobs(&self, tenant: Uuid, jobs: &[NewJob]) -> Result<()> {
        let mut tx = self.tenant_tx(tenant).await?;
        crate::insert::insert_jobs_with(&mut *tx, jobs).await?;
        tx.commit().await?;
        Ok(())
    }
}
