//! Idempotent job submission: an `Idempotency-Key` and the job (or batch of jobs) it created,
//! written in one transaction (concurrent duplicates wait on the key's row and then see it),
//! kept 24 h.

use uuid::Uuid;

use crate::{NewJob, Result, Store, StoreError};

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

/// What submitting a batch under a key did (see [`Idempotent`]); the ids are the batch's jobs
/// in request order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotentBatch {
    Created,
    Existing(Vec<Uuid>),
    Conflict(Vec<Uuid>),
}

/// A live key: its request's digest and its jobs.
type KeyRow = (Vec<u8>, Uuid, Option<Vec<Uuid>>);

fn jobs_of((_, first, all): &KeyRow) -> Vec<Uuid> {
    all.clone().unwrap_or_else(|| vec![*first])
}

impl Store {
    /// Inserts `job` under `key` unless the key is live; see [`Idempotent`].
    pub async fn insert_job_idempotent(
        &self,
        key: &str,
        digest: &[u8; 32],
        job: &NewJob,
    ) -> Result<Idempotent> {
        let jobs = std::slice::from_ref(job);
        Ok(
            match self
                .insert_idempotent(job.tenant_id, key, digest, jobs)
                .await?
            {
                None => Idempotent::Created,
                Some((same, ids)) if same => Idempotent::Existing(ids[0]),
                Some((_, ids)) => Idempotent::Conflict(ids[0]),
            },
        )
    }

    /// Inserts one tenant's batch of jobs under `key`, all or nothing, unless the key is live;
    /// see [`IdempotentBatch`].
    pub async fn insert_batch_idempotent(
        &self,
        tenant: Uuid,
        key: &str,
        digest: &[u8; 32],
        jobs: &[NewJob],
    ) -> Result<IdempotentBatch> {
        Ok(
            match self.insert_idempotent(tenant, key, digest, jobs).await? {
                None => IdempotentBatch::Created,
                Some((true, ids)) => IdempotentBatch::Existing(ids),
                Some((false, ids)) => IdempotentBatch::Conflict(ids),
            },
        )
    }

    /// The key row and the jobs in one transaction (concurrent requests with the key wait on
    /// its row, then see it). `None`: inserted; else whether the live key's request had the
    /// same digest, and its jobs.
    async fn insert_idempotent(
        &self,
        tenant: Uuid,
        key: &str,
        digest: &[u8; 32],
        jobs: &[NewJob],
    ) -> Result<Option<(bool, Vec<Uuid>)>> {
        let Some(first) = jobs.first() else {
            return Ok(Some((false, Vec::new())));
        };
        let mut tx = self.tenant_tx(tenant).await?;
        sqlx::query("DELETE FROM idempotency_keys WHERE tenant_id = $1 AND key = $2 AND expires_at <= now()")
            .bind(tenant)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        let all: Option<Vec<Uuid>> = (jobs.len() > 1).then(|| jobs.iter().map(|j| j.id).collect());
        // the key that kept this request's out can be gone when it is read back (it expired,
        // and a prune or another request's DELETE took it in between): then insert again
        let mut tries = 0;
        let row: KeyRow = loop {
            tries += 1;
            // a concurrent request with the same key waits here until the first one commits
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys (tenant_id, key, request_digest, job_id, job_ids, expires_at)
                 VALUES ($1, $2, $3, $4, $5, now() + make_interval(hours => $6))
                 ON CONFLICT (tenant_id, key) DO NOTHING",
            )
            .bind(tenant)
            .bind(key)
            .bind(&digest[..])
            .bind(first.id)
            .bind(&all)
            .bind(IDEMPOTENCY_TTL_H as i32)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if inserted {
                crate::insert::insert_jobs_with(&mut *tx, jobs).await?;
                tx.commit().await?;
                return Ok(None);
            }
            let row: Option<KeyRow> = sqlx::query_as(
                "SELECT request_digest, job_id, job_ids FROM idempotency_keys
                 WHERE tenant_id = $1 AND key = $2",
            )
            .bind(tenant)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            match row {
                Some(row) => break row,
                None if tries < 3 => continue,
                None => return Err(StoreError::Unavailable(sqlx::Error::RowNotFound)),
            }
        };
        tx.commit().await?;
        Ok(Some((row.0 == digest[..], jobs_of(&row))))
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
        Ok(self
            .live_key(tenant, key, digest)
            .await?
            .map(|(same, ids)| match same {
                true => Idempotent::Existing(ids[0]),
                false => Idempotent::Conflict(ids[0]),
            }))
    }

    /// [`Store::live_idempotency_key`] for a batch.
    pub async fn live_batch_idempotency_key(
        &self,
        tenant: Uuid,
        key: &str,
        digest: &[u8; 32],
    ) -> Result<Option<IdempotentBatch>> {
        Ok(self
            .live_key(tenant, key, digest)
            .await?
            .map(|(same, ids)| match same {
                true => IdempotentBatch::Existing(ids),
                false => IdempotentBatch::Conflict(ids),
            }))
    }

    async fn live_key(
        &self,
        tenant: Uuid,
        key: &str,
        digest: &[u8; 32],
    ) -> Result<Option<(bool, Vec<Uuid>)>> {
        let row: Option<KeyRow> = sqlx::query_as(
            "SELECT request_digest, job_id, job_ids FROM idempotency_keys
             WHERE tenant_id = $1 AND key = $2 AND expires_at > now()",
        )
        .bind(tenant)
        .bind(key)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| (r.0 == digest[..], jobs_of(&r))))
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
