//! End users' JWTs (any bearer credential without the `sy_` key prefix). HS256 tokens are
//! verified with the secret of the tenant whose issuer (`iss`) they name; RS256/ES256 tokens with
//! the keys of a configured issuer's JWKS (file or URL; cached, re-read on rotation). `alg: none`,
//! other algorithms, and algorithm confusion (an HS256 token for a JWKS issuer, whose public key
//! would otherwise serve as an HMAC secret, or the reverse) are refused. `iss`, `aud`, `exp`,
//! `nbf` are checked with a small leeway; `sub`, `role`, `scope` and (for platform-wide issuers)
//! `tenant` claims map to the principal.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::ExposeSecret;
use serde::Deserialize;
use switchyard_core::authz::{Permission, Role};
use switchyard_core::jwt_config::{JwtConfig, JwtIssuer};
use switchyard_store::{Credential, Principal, Store, TenantSettings};

use crate::error::ApiError;

/// Largest JWKS document read.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// Longest `sub` accepted (it is stored as the creator of jobs).
const MAX_SUBJECT: usize = 255;

/// Why a token was refused (logged; clients see a plain 401).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("malformed token")]
    Malformed,
    #[error("algorithm {0} is not accepted")]
    Algorithm(String),
    #[error("unknown issuer")]
    UnknownIssuer,
    #[error("algorithm does not match the issuer's keys")]
    Confusion,
    #[error("no key matches the token")]
    NoKey,
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("bad claim `{0}`")]
    Claim(&'static str),
    #[error("unknown tenant")]
    UnknownTenant,
}

/// A verified token's principal, or why it was refused; store errors are separate (503).
pub type Verified = Result<Result<Principal, Refusal>, ApiError>;

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// A configured issuer's keys as last read.
#[derive(Default)]
struct Jwks {
    keys: Vec<std::sync::Arc<Key>>,
    /// The last successful read.
    fetched: Option<Instant>,
    /// The last attempt (failed reads are not retried more often than `jwks_min_refresh_s`).
    tried: Option<Instant>,
}

/// One issuer's cache: read without waiting; one read of its JWKS at a time, which holds up
/// only the requests that need that issuer's new keys (a slow identity provider used to stall
/// every end user's authentication behind one lock, and each periodic re-read its own).
#[derive(Default)]
struct IssuerKeys {
    cached: std::sync::RwLock<Jwks>,
    refresh: tokio::sync::Mutex<()>,
}

/// What an issuer's cached keys are good for.
enum Cached {
    /// Serve them.
    Fresh(Vec<std::sync::Arc<Key>>),
    /// Serve them, and re-read them unless another request is.
    Old(Vec<std::sync::Arc<Key>>),
    /// Wait for a read (none yet, or the token's `kid` is not among them).
    Needed,
}

/// Verifies end users' tokens; keeps each issuer's keys.
pub struct JwtVerifier {
    cfg: JwtConfig,
    http: reqwest::Client,
    /// Per configured issuer (`iss`).
    jwks: HashMap<String, IssuerKeys>,
}

#[derive(Deserialize)]
struct Peek {
    iss: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<i64>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
}

impl JwtVerifier {
    pub fn new(cfg: JwtConfig) -> JwtVerifier {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        let jwks = cfg
            .issuers
            .iter()
            .map(|i| (i.issuer.clone(), IssuerKeys::default()))
            .collect();
        JwtVerifier { cfg, http, jwks }
    }

    /// Verifies `token` and maps its claims to a principal.
    pub async fn verify(&self, store: &Store, token: &str) -> Verified {
        let header = match jsonwebtoken::decode_header(token) {
            Ok(h) => h,
            // includes `alg: none` and unknown algorithms, which do not parse
            Err(_) => return Ok(Err(Refusal::Malformed)),
        };
        if !matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::RS256 | Algorithm::ES256
        ) {
            return Ok(Err(Refusal::Algorithm(format!("{:?}", header.alg))));
        }
        let Some(iss) = peek_issuer(token) else {
            return Ok(Err(Refusal::Claim("iss")));
        };
        let configured = self.cfg.issuers.iter().find(|i| i.issuer == iss);
        let (keys, audience, tenant) = match (header.alg, configured) {
            // an issuer with public keys never signs with a shared secret
            (Algorithm::HS256, Some(_)) => return Ok(Err(Refusal::Confusion)),
            (Algorithm::HS256, None) => {
                let Some(t) = store.tenant_jwt_by_issuer(&iss).await? else {
                    return Ok(Err(Refusal::UnknownIssuer));
                };
                let key = DecodingKey::from_secret(t.secret.expose_secret().as_bytes());
                let key = std::sync::Arc::new(Key {
                    kid: None,
                    alg: Algorithm::HS256,
                    key,
                });
                (vec![key], self.cfg.audience.clone(), Some(t.settings))
            }
            (_, None) => {
                // a tenant's HS256 issuer, or nobody's: no public keys to verify with
                return Ok(Err(Refusal::UnknownIssuer));
            }
            (alg, Some(issuer)) => {
                let keys = self.keys_for(issuer, header.kid.as_deref()).await;
                let keys: Vec<_> = keys
                    .into_iter()
                    .filter(|k| k.alg == alg)
                    .filter(|k| header.kid.is_none() || k.kid == header.kid)
                    .collect();
                if keys.is_empty() {
                    return Ok(Err(Refusal::NoKey));
                }
                let aud = issuer
                    .audience
                    .clone()
                    .unwrap_or_else(|| self.cfg.audience.clone());
                (keys, aud, None)
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.cfg.leeway_s;
        validation.validate_nbf = true;
        validation.set_issuer(&[&iss]);
        validation.set_audience(&[&audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let mut last = None;
        let mut claims = None;
        for k in &keys {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some(claims) = claims else {
            return Ok(Err(last.map(Refusal::Invalid).unwrap_or(Refusal::NoKey)));
        };
        let settings = match tenant {
            Some(s) => s,
            None => {
                let named = configured
                    .and_then(|i| i.tenant.clone())
                    .or(claims.tenant.clone());
                let Some(named) = named else {
                    return Ok(Err(Refusal::Claim("tenant")));
                };
                match store.tenant_settings(&named).await? {
                    Some(s) => s,
                    None => return Ok(Err(Refusal::UnknownTenant)),
                }
            }
        };
        Ok(self.principal(settings, claims))
    }

    fn principal(&self, t: TenantSettings, c: Claims) -> Result<Principal, Refusal> {
        let subject = c
            .sub
            .filter(|s| !s.is_empty() && s.len() <= MAX_SUBJECT && !s.chars().any(char::is_control))
            .ok_or(Refusal::Claim("sub"))?;
        let role = match c.role.as_deref() {
            None => self.cfg.default_role,
            Some(r) => Role::parse(r).ok_or(Refusal::Claim("role"))?,
        };
        // OAuth-style space-separated scopes; names this version does not know grant nothing
        let scopes = c
            .scope
            .map(|s| s.split_whitespace().filter_map(Permission::parse).collect());
        let expires_at = c.exp.and_then(|e| chrono::DateTime::from_timestamp(e, 0));
        Ok(Principal {
            tenant_id: t.tenant_id,
            credential: Credential::Token { subject },
            llm_cache: t.llm_cache,
            allowed_models: t.allowed_models,
            role,
            scopes,
            expires_at,
            quotas: t.quotas,
        })
    }

    /// An issuer's keys: cached, re-read when stale, or sooner when `kid` is not among them.
    /// Keys that are only old (the token's `kid` is among them) keep serving while one request
    /// re-reads them; the others do not wait for the identity provider.
    async fn keys_for(&self, issuer: &JwtIssuer, kid: Option<&str>) -> Vec<std::sync::Arc<Key>> {
        let Some(slot) = self.jwks.get(&issuer.issuer) else {
            return Vec::new();
        };
        let _reading = match self.current(slot, kid) {
            Cached::Fresh(keys) => return keys,
            Cached::Old(keys) => match slot.refresh.try_lock() {
                Ok(guard) => guard,
                // another request is re-reading them
                Err(_) => return keys,
            },
            Cached::Needed => {
                let guard = slot.refresh.lock().await;
                // another request may have read them while this one waited
                match self.current(slot, kid) {
                    Cached::Fresh(keys) | Cached::Old(keys) => return keys,
                    Cached::Needed => guard,
                }
            }
        };
        let read = self.fetch(issuer).await;
        let mut c = slot.cached.write().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        c.tried = Some(now);
        match read {
            Ok(keys) => {
                c.keys = keys;
                c.fetched = Some(now);
            }
            Err(e) => {
                tracing::warn!(issuer = %issuer.issuer, error = %e, "could not read the JWKS; keeping the keys we have");
            }
        }
        c.keys.clone()
    }

    /// Whether the cached keys serve `kid` as they are.
    fn current(&self, slot: &IssuerKeys, kid: Option<&str>) -> Cached {
        let refresh = Duration::from_secs(self.cfg.jwks_refresh_s);
        let min_refresh = Duration::from_secs(self.cfg.jwks_min_refresh_s);
        let c = slot.cached.read().unwrap_or_else(|e| e.into_inner());
        // a failed read is not retried on every request
        let may_retry = c.tried.is_none_or(|t| t.elapsed() >= min_refresh);
        let Some(at) = c.fetched else {
            return if may_retry {
                Cached::Needed
            } else {
                Cached::Fresh(c.keys.clone())
            };
        };
        let age = at.elapsed();
        let unknown_kid = kid.is_some_and(|k| !c.keys.iter().any(|x| x.kid.as_deref() == Some(k)));
        if !may_retry {
            Cached::Fresh(c.keys.clone())
        } else if unknown_kid && age >= min_refresh {
            Cached::Needed
        } else if age >= refresh {
            Cached::Old(c.keys.clone())
        } else {
            Cached::Fresh(c.keys.clone())
        }
    }

    async fn fetch(&self, issuer: &JwtIssuer) -> anyhow::Result<Vec<std::sync::Arc<Key>>> {
        let body = if let Some(path) = &issuer.jwks_file {
            tokio::fs::read(path).await?
        } else if let Some(url) = &issuer.jwks_url {
            let resp = self.http.get(url).send().await?.error_for_status()?;
            let bytes = resp.bytes().await?;
            bytes.to_vec()
        } else {
            anyhow::bail!("no jwks_file or jwks_url");
        };
        anyhow::ensure!(body.len() <= MAX_JWKS_BYTES, "JWKS larger than 1 MiB");
        let set: JwkSet = serde_json::from_slice(&body)?;
        Ok(set
            .keys
            .iter()
            .filter_map(|jwk| {
                let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
                    (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => {
                        Algorithm::RS256
                    }
                    (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                        if ec.curve == EllipticCurve::P256 =>
                    {
                        Algorithm::ES256
                    }
                    // symmetric keys, other curves and algorithms are never used
                    _ => return None,
                };
                let key = DecodingKey::from_jwk(jwk).ok()?;
                Some(std::sync::Arc::new(Key {
                    kid: jwk.common.key_id.clone(),
                    alg,
                    key,
                }))
            })
            .collect())
    }
}

/// The `iss` of a token before its signature is checked (only to choose the key).
fn peek_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<Peek>(&bytes).ok()?.iss
}
