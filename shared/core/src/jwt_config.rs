//! Settings for end users' JWTs: the audience every token must name, the clock leeway, the role
//! of a token without one, and the RS256/ES256 issuers whose keys come from a JWKS file or URL.
//! (HS256 issuers and secrets are per tenant, in the database.)

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::authz::Role;

/// `[jwt]` in the configuration (`SWITCHYARD_JWT__...`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// The `aud` every token must carry (an issuer may override it).
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
    /// Role of a token without a `role` claim.
    pub default_role: Role,
    /// How often a JWKS is re-read (a token with an unknown `kid` re-reads it sooner, at most
    /// every `jwks_min_refresh_s`).
    pub jwks_refresh_s: u64,
    pub jwks_min_refresh_s: u64,
    /// Issuers of RS256/ES256 tokens.
    pub issuers: Vec<JwtIssuer>,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            audience: "switchyard".into(),
            leeway_s: 30,
            default_role: Role::Developer,
            jwks_refresh_s: 300,
            jwks_min_refresh_s: 30,
            issuers: Vec::new(),
        }
    }
}

/// One identity provider whose public keys verify its tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuer {
    /// The exact `iss` of its tokens.
    pub issuer: String,
    /// Where its keys are: a JWKS file ...
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// ... or URL.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// The tenant (name or id) all its tokens belong to. Unset: each token names its tenant in
    /// a `tenant` claim (a platform-wide identity provider).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Overrides `jwt.audience` for this issuer.
    #[serde(default)]
    pub audience: Option<String>,
}

impl JwtConfig {
    /// Problems with the settings, as messages naming the field.
    pub fn check(&self) -> Result<(), String> {
        for (i, iss) in self.issuers.iter().enumerate() {
            if iss.issuer.is_empty() {
                return Err(format!("jwt.issuers[{i}].issuer must not be empty"));
            }
            if iss.jwks_file.is_some() == iss.jwks_url.is_some() {
                return Err(format!(
                    "jwt.issuers[{i}]: set exactly one of jwks_file and jwks_url"
                ));
            }
            if self.issuers[..i].iter().any(|o| o.issuer == iss.issuer) {
                return Err(format!(
                    "jwt.issuers[{i}]: issuer `{}` is listed twice",
                    iss.issuer
                ));
            }
        }
        Ok(())
    }
}
