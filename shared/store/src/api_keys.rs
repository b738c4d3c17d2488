//! API keys managed by a tenant's admins: created with a role, scopes and an expiry, listed
//! and revoked within the tenant only, and their last use recorded in batches.

use chrono::{DateTime, Utc};
use switchyard_core::apikey;
use switchyard_core::authz::{Permission, Role};
use uuid::Uuid;

use crate::tenants::{ApiKeyRecord, KEY_COLUMNS};
use crate::{Result, Store};

impl Store {
    /// A new key of `tenant`; returns the record and the secret (shown once, never stored).
    pub async fn create_scoped_api_key(
        &self,
        tenant: Uuid,
        name: &str,
        role: Role,
        scopes: Option<&[Permission]>,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<(ApiKeyRecord, String)> {
        let key = apikey::generate();
        let scopes: Option<Vec<&str>> = scopes.map(|s| s.iter().map(|p| p.as_str()).collect());
        let rec = sqlx::query_as::<_, ApiKeyRecord>(&format!(
            "INSERT INTO api_keys (id, tenant_id, name, prefix, digest, role, scopes, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {KEY_COLUMNS}"
        ))
        .bind(Uuid::now_v7())
        .bind(tenant)
        .bind(name)
        .bind(&key.prefix)
        .bind(&key.digest[..])
        .bind(role.as_str())
        .bind(scopes)
        .bind(expires_at)
        .fetch_one(self.pool())
        .await?;
        Ok((rec, key.full))
    }

    /// One key of `tenant` (another tenant's key is `None`).
    pub async fn get_tenant_api_key(&self, tenant: Uuid, id: Uuid) -> Result<Option<ApiKeyRecord>> {
        let mut tx = self.tenant_tx(tenant).await?;
        let out = sqlx::query_as::<_, ApiKeyRecord>(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1 AND id = $2"
        ))
        .bind(tenant)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Revokes a key of `tenant`; `None` when the tenant has no such key, else the record
    /// (revoking twice keeps the first time).
    pub async fn revoke_tenant_api_key(
        &self,
        tenant: Uuid,
        id: Uuid,
    ) -> Result<Option<ApiKeyRecord>> {
        let mut tx = self.tenant_tx(tenant).await?;
        let out = sqlx::query_as::<_, ApiKeyRecord>(&format!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now())
             WHERE tenant_id = $1 AND id = $2 RETURNING {KEY_COLUMNS}"
        ))
        .bind(tenant)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Records that these keys were used now (one statement for a batch).
    pub async fn touch_api_keys(&self, ids: &[Uuid]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query("UPDATE api_keys SET last_used_at = now() WHERE id = ANY($1)")
            .bind(ids)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}
