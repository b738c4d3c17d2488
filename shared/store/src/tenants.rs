//! Tenants and API keys (stored as SHA-256 digests only).

use chrono::{DateTime, Utc};
use switchyard_core::apikey;
use switchyard_core::authz::{Permission, Role};
use switchyard_core::quota::QuotaLimits;
use uuid::Uuid;

use crate::{Result, Store, StoreError};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Tenant {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyRecord {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// `owner`, `admin`, `developer` or `viewer`.
    pub role: String,
    /// Permissions the key is narrowed to (`None`: all its role grants).
    pub scopes: Option<Vec<String>>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Last use, to within a minute (never written per request).
    pub last_used_at: Option<DateTime<Utc>>,
}

/// The columns of [`ApiKeyRecord`].
pub(crate) const KEY_COLUMNS: &str =
    "id, tenant_id, name, prefix, created_at, revoked_at, role, scopes, expires_at, last_used_at";

/// How a caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A tenant's API key (the tenant's own staff and services).
    Key(Uuid),
    /// A JWT of one of the tenant's end users (`sub`).
    Token { subject: String },
}

/// Who is calling: the tenant, and the key or end user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant_id: Uuid,
    pub credential: Credential,
    /// The tenant caches LLM responses unless a request says otherwise.
    pub llm_cache: bool,
    /// The models the tenant may use (`None`: all); see [`Principal::may_use`].
    pub allowed_models: Option<Vec<String>>,
    pub role: Role,
    /// The key's scopes (`None`: everything its role grants).
    pub scopes: Option<Vec<Permission>>,
    /// When the key stops working (caches must not outlive it).
    pub expires_at: Option<DateTime<Utc>>,
    /// The tenant's own quotas (unset fields: the configured defaults).
    pub quotas: QuotaLimits,
}

impl Principal {
    /// Whether the tenant may use `model`: every model when no list is set, else an exact
    /// entry or a prefix entry ending in `*`.
    pub fn may_use(&self, model: &str) -> bool {
        model_allowed(self.allowed_models.as_deref(), model)
    }

    /// Whether the caller may do `p` (its role, narrowed by its scopes).
    pub fn can(&self, p: Permission) -> bool {
        switchyard_core::authz::allows(self.role, self.scopes.as_deref(), p)
    }

    /// The `created_by` recorded on jobs and conversations: `key:<id>` or `user:<sub>`.
    pub fn subject(&self) -> String {
        match &self.credential {
            Credential::Key(id) => format!("key:{id}"),
            Credential::Token { subject } => format!("user:{subject}"),
        }
    }

    /// The API key, when the caller used one.
    pub fn key_id(&self) -> Option<Uuid> {
        match self.credential {
            Credential::Key(id) => Some(id),
            Credential::Token { .. } => None,
        }
    }

    /// What the caller may see: API keys see their whole tenant; end users see what they
    /// created unless their role is `admin` or higher.
    pub fn scope(&self) -> crate::Scope {
        match &self.credential {
            Credential::Token { .. } if self.role < Role::Admin => {
                crate::Scope::creator(self.tenant_id, self.subject())
            }
            _ => crate::Scope::tenant(self.tenant_id),
        }
    }
}

/// Whether a tenant with the model list `allowed` (`None`: every model) may use `model`: an
/// exact entry or a prefix entry ending in `*`.
pub fn model_allowed(allowed: Option<&[String]>, model: &str) -> bool {
    match allowed {
        None => true,
        Some(list) => list.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => model.starts_with(prefix),
            None => p == model,
        }),
    }
}

/// A tenant's stored quotas; unreadable ones (from a newer version) count as unset.
pub(crate) fn parse_quotas(v: Option<serde_json::Value>) -> QuotaLimits {
    v.and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

impl Store {
    pub async fn create_tenant(&self, name: &str) -> Result<Tenant> {
        let t = sqlx::query_as::<_, Tenant>(
            "INSERT INTO tenants (id, name) VALUES ($1, $2) RETURNING id, name, created_at",
        )
        .bind(Uuid::now_v7())
        .bind(name)
        .fetch_one(self.pool())
        .await?;
        Ok(t)
    }

    /// Every tenant, by name.
    pub async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        Ok(
            sqlx::query_as::<_, Tenant>("SELECT id, name, created_at FROM tenants ORDER BY name")
                .fetch_all(self.pool())
                .await?,
        )
    }

    pub async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>> {
        Ok(
            sqlx::query_as::<_, Tenant>("SELECT id, name, created_at FROM tenants WHERE name = $1")
                .bind(name)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Creates a tenant unless one with that name exists; returns it either way.
    pub async fn ensure_tenant(&self, name: &str) -> Result<Tenant> {
        if let Some(t) = self.tenant_by_name(name).await? {
            return Ok(t);
        }
        match self.create_tenant(name).await {
            Err(StoreError::AlreadyExists(_)) => self
                .tenant_by_name(name)
                .await?
                .ok_or_else(|| StoreError::NotFound(name.into())),
            other => other,
        }
    }

    /// Creates an API key. With `fixed` (a well-formed `sy_` key), that key is stored instead of
    /// a random one (used by `SWITCHYARD_DEV_API_KEY`); an existing identical key is returned.
    pub async fn create_api_key(
        &self,
        tenant_id: Uuid,
        name: &str,
        fixed: Option<&str>,
    ) -> Result<(ApiKeyRecord, String)> {
        let key = match fixed {
            Some(f) => apikey::from_full(f).ok_or_else(|| {
                StoreError::NotFound("malformed fixed key: expected sy_<8 alnum>_<40 alnum>".into())
            })?,
            None => apikey::generate(),
        };
        let rec = sqlx::query_as::<_, ApiKeyRecord>(
            "INSERT INTO api_keys (id, tenant_id, name, prefix, digest) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (digest) DO UPDATE SET revoked_at = NULL
             RETURNING id, tenant_id, name, prefix, created_at, revoked_at, role, scopes,
                       expires_at, last_used_at",
        )
        .bind(Uuid::now_v7())
        .bind(tenant_id)
        .bind(name)
        .bind(&key.prefix)
        .bind(&key.digest[..])
        .fetch_one(self.pool())
        .await?;
        Ok((rec, key.full))
    }

    /// Revokes a key by id or by its visible prefix; returns how many keys were revoked.
    pub async fn revoke_api_key(&self, id_or_prefix: &str) -> Result<u64> {
        let res = match Uuid::parse_str(id_or_prefix) {
            Ok(id) => {
                sqlx::query(
                    "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
                )
                .bind(id)
                .execute(self.pool())
                .await?
            }
            Err(_) => sqlx::query(
                "UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL",
            )
            .bind(id_or_prefix)
            .execute(self.pool())
            .await?,
        };
        Ok(res.rows_affected())
    }

    pub async fn list_api_keys(&self, tenant_id: Uuid) -> Result<Vec<ApiKeyRecord>> {
        let mut tx = self.tenant_tx(tenant_id).await?;
        let out = sqlx::query_as::<_, ApiKeyRecord>(
            "SELECT id, tenant_id, name, prefix, created_at, revoked_at, role, scopes, expires_at,
                    last_used_at
             FROM api_keys WHERE tenant_id = $1 ORDER BY created_at",
        )
        .bind(tenant_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Looks up a presented key; `None` for malformed, unknown or revoked keys.
    pub async fn authenticate(&self, presented: &str) -> Result<Option<Principal>> {
        let Some(key) = apikey::from_full(presented) else {
            return Ok(None);
        };
        type Row = (
            Uuid,
            Uuid,
            bool,
            Option<Vec<String>>,
            String,
            Option<Vec<String>>,
            Option<DateTime<Utc>>,
            Option<serde_json::Value>,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT k.id, k.tenant_id, t.llm_cache, t.allowed_models, k.role, k.scopes,
                    k.expires_at, t.quotas
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
             WHERE k.digest = $1 AND k.revoked_at IS NULL
               AND (k.expires_at IS NULL OR k.expires_at > now())",
        )
        .bind(&key.digest[..])
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(
            |(key_id, tenant_id, llm_cache, allowed_models, role, scopes, expires_at, quotas)| {
                Principal {
                    tenant_id,
                    credential: Credential::Key(key_id),
                    llm_cache,
                    allowed_models,
                    // the column's CHECK admits only known roles; anything else gets the least
                    role: Role::parse(&role).unwrap_or(Role::Viewer),
                    // unknown scope names (from a newer version) grant nothing
                    scopes: scopes.map(|s| s.iter().filter_map(|p| Permission::parse(p)).collect()),
                    expires_at,
                    quotas: parse_quotas(quotas),
                }
            },
        ))
    }

    /// Limits the models a tenant may use (`None`: all); false when there is no such tenant.
    pub async fn set_tenant_models(&self, name: &str, models: Option<&[String]>) -> Result<bool> {
        let r = sqlx::query("UPDATE tenants SET allowed_models = $2 WHERE name = $1")
            .bind(name)
            .bind(models)
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// A tenant's own maximum `code.exec` limits (`None`: the worker's defaults apply).
    pub async fn tenant_code_limits(
        &self,
        tenant: Uuid,
    ) -> Result<Option<switchyard_core::code::LimitsRequest>> {
        let v: Option<Option<serde_json::Value>> =
            sqlx::query_scalar("SELECT code_limits FROM tenants WHERE id = $1")
                .bind(tenant)
                .fetch_optional(self.pool())
                .await?;
        Ok(v.flatten().and_then(|v| serde_json::from_value(v).ok()))
    }

    /// Sets a tenant's maximum `code.exec` limits (`None`: the defaults); false when there is
    /// no such tenant.
    pub async fn set_tenant_code_limits(
        &self,
        name: &str,
        limits: Option<&switchyard_core::code::LimitsRequest>,
    ) -> Result<bool> {
        let v = limits.map(|l| serde_json::to_value(l).unwrap_or_default());
        self.set_tenant_json(name, "code_limits", v).await
    }

    /// Sets one JSON setting of a tenant (`column` is a constant of ours, never input); false
    /// when there is no such tenant.
    pub(crate) async fn set_tenant_json(
        &self,
        name: &str,
        column: &'static str,
        v: Option<serde_json::Value>,
    ) -> Result<bool> {
        let r = sqlx::query(&format!("UPDATE tenants SET {column} = $2 WHERE name = $1"))
            .bind(name)
            .bind(v)
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Sets a tenant's default for the LLM response cache; false when there is no such tenant.
    pub async fn set_tenant_llm_cache(&self, name: &str, on: bool) -> Result<bool> {
        let r = sqlx::query("UPDATE tenants SET llm_cache = $2 WHERE name = $1")
            .bind(name)
            .bind(on)
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_allow_lists() {
        let mut p = Principal {
            tenant_id: Uuid::nil(),
            credential: Credential::Key(Uuid::nil()),
            llm_cache: false,
            allowed_models: None,
            role: Role::Owner,
            scopes: None,
            expires_at: None,
            quotas: QuotaLimits::default(),
        };
        assert!(p.may_use("anything"));
        p.allowed_models = Some(vec!["fast".into(), "mock-*".into(), "openai/*".into()]);
        assert!(p.may_use("fast") && p.may_use("mock-echo") && p.may_use("openai/gpt-4o"));
        assert!(!p.may_use("faster") && !p.may_use("anthropic/claude") && !p.may_use("mock"));
        p.allowed_models = Some(vec![]);
        assert!(!p.may_use("fast"));
    }
}
