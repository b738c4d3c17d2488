//! What the API needs to accept the JWTs of a tenant's end users and to enforce quotas: the
//! tenant's HS256 issuer and secret, the tenant settings a principal carries, quotas.

use secrecy::SecretString;
use switchyard_core::quota::QuotaLimits;
use uuid::Uuid;

use crate::{Result, Store};

/// The tenant settings every principal of the tenant carries.
#[derive(Debug, Clone)]
pub struct TenantSettings {
    pub tenant_id: Uuid,
    pub llm_cache: bool,
    pub allowed_models: Option<Vec<String>>,
    pub quotas: QuotaLimits,
}

/// A tenant's HS256 signing secret (found by its issuer).
#[derive(Debug, Clone)]
pub struct TenantJwt {
    pub settings: TenantSettings,
    pub secret: SecretString,
}

type SettingsRow = (Uuid, bool, Option<Vec<String>>, Option<serde_json::Value>);

fn settings((tenant_id, llm_cache, allowed_models, quotas): SettingsRow) -> TenantSettings {
    TenantSettings {
        tenant_id,
        llm_cache,
        allowed_models,
        quotas: crate::tenants::parse_quotas(quotas),
    }
}

impl Store {
    /// The tenant whose HS256 issuer is `issuer`, with its secret.
    pub async fn tenant_jwt_by_issuer(&self, issuer: &str) -> Result<Option<TenantJwt>> {
        type Row = (
            Uuid,
            bool,
            Option<Vec<String>>,
            Option<serde_json::Value>,
            String,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT id, llm_cache, allowed_models, quotas, jwt_secret FROM tenants
             WHERE jwt_issuer = $1 AND jwt_secret IS NOT NULL",
        )
        .bind(issuer)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|(id, cache, models, quotas, secret)| TenantJwt {
            settings: settings((id, cache, models, quotas)),
            secret: SecretString::from(secret),
        }))
    }

    /// A tenant's settings, by id or (when `key` is not a UUID) by name.
    pub async fn tenant_settings(&self, key: &str) -> Result<Option<TenantSettings>> {
        let id = Uuid::parse_str(key).ok();
        let row: Option<SettingsRow> = sqlx::query_as(
            "SELECT id, llm_cache, allowed_models, quotas FROM tenants
             WHERE ($1::uuid IS NOT NULL AND id = $1) OR ($1::uuid IS NULL AND name = $2)",
        )
        .bind(id)
        .bind(key)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(settings))
    }

    /// Sets a tenant's own quotas (`None`: the configured defaults); false when there is no
    /// such tenant.
    pub async fn set_tenant_quotas(
        &self,
        name: &str,
        quotas: Option<&QuotaLimits>,
    ) -> Result<bool> {
        let v = quotas.map(|q| serde_json::to_value(q).unwrap_or_default());
        self.set_tenant_json(name, "quotas", v).await
    }

    /// Jobs of the tenant running now (for `GET /v1/quotas`).
    pub async fn running_jobs(&self, tenant_id: Uuid) -> Result<i64> {
        let mut tx = self.tenant_tx(tenant_id).await?;
        let out = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE tenant_id = $1 AND status = 'running'",
        )
        .bind(tenant_id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Tenants with their own concurrency limit or queue weight: `(tenant, concurrent_jobs,
    /// queue_weight)` (what the scheduler writes into each queue's limits).
    pub async fn queue_shares(&self) -> Result<Vec<(Uuid, Option<i64>, Option<i32>)>> {
        Ok(sqlx::query_as(
            "SELECT id, (quotas ->> 'concurrent_jobs')::bigint, queue_weight FROM tenants
             WHERE (quotas ->> 'concurrent_jobs') IS NOT NULL OR queue_weight IS NOT NULL",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// Sets (or with `None` clears) a tenant's queue weight; false when there is no such tenant.
    pub async fn set_tenant_queue_weight(&self, name: &str, weight: Option<i32>) -> Result<bool> {
        let r = sqlx::query("UPDATE tenants SET queue_weight = $2 WHERE name = $1")
            .bind(name)
            .bind(weight)
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The tenant's queued jobs, counted up to `cap` (an index-only walk of at most `cap`
    /// entries of `jobs_tenant_status_id`).
    pub async fn queued_jobs(&self, tenant_id: Uuid, cap: i64) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM jobs WHERE tenant_id = $1 AND status = 'queued'
             LIMIT $2) q",
        )
        .bind(tenant_id)
        .bind(cap)
        .fetch_one(self.pool())
        .await?)
    }

    /// Sets (or with `None` removes) a tenant's HS256 issuer and secret; false when there is no
    /// such tenant. An issuer another tenant uses is `AlreadyExists`.
    pub async fn set_tenant_jwt(&self, name: &str, jwt: Option<(&str, &str)>) -> Result<bool> {
        let r = sqlx::query("UPDATE tenants SET jwt_issuer = $2, jwt_secret = $3 WHERE name = $1")
            .bind(name)
            .bind(jwt.map(|j| j.0))
            .bind(jwt.map(|j| j.1))
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected() == 1)
    }
}
