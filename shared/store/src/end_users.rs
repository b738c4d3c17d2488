//! What the API needs to accept the JWTs of a tenant's end users: the tenant's HS256 issuer and
//! secret, and the tenant settings a token's principal carries.

use secrecy::SecretString;
use uuid::Uuid;

use crate::{Result, Store};

/// The tenant settings every principal of the tenant carries.
#[derive(Debug, Clone)]
pub struct TenantSettings {
    pub tenant_id: Uuid,
    pub llm_cache: bool,
    pub allowed_models: Option<Vec<String>>,
}

/// A tenant's HS256 signing secret (found by its issuer).
#[derive(Debug, Clone)]
pub struct TenantJwt {
    pub settings: TenantSettings,
    pub secret: SecretString,
}

impl Store {
    /// The tenant whose HS256 issuer is `issuer`, with its secret.
    pub async fn tenant_jwt_by_issuer(&self, issuer: &str) -> Result<Option<TenantJwt>> {
        let row: Option<(Uuid, bool, Option<Vec<String>>, String)> = sqlx::query_as(
            "SELECT id, llm_cache, allowed_models, jwt_secret FROM tenants
             WHERE jwt_issuer = $1 AND jwt_secret IS NOT NULL",
        )
        .bind(issuer)
        .fetch_optional(self.pool())
        .await?;
        Ok(
            row.map(|(tenant_id, llm_cache, allowed_models, secret)| TenantJwt {
                settings: TenantSettings {
                    tenant_id,
                    llm_cache,
                    allowed_models,
                },
                secret: SecretString::from(secret),
            }),
        )
    }

    /// A tenant's settings, by id or (when `key` is not a UUID) by name.
    pub async fn tenant_settings(&self, key: &str) -> Result<Option<TenantSettings>> {
        let id = Uuid::parse_str(key).ok();
        let row: Option<(Uuid, bool, Option<Vec<String>>)> = sqlx::query_as(
            "SELECT id, llm_cache, allowed_models FROM tenants
             WHERE ($1::uuid IS NOT NULL AND id = $1) OR ($1::uuid IS NULL AND name = $2)",
        )
        .bind(id)
        .bind(key)
        .fetch_optional(self.pool())
        .await?;
        Ok(
            row.map(|(tenant_id, llm_cache, allowed_models)| TenantSettings {
                tenant_id,
                llm_cache,
                allowed_models,
            }),
        )
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
