//! Authentication: `Authorization: Bearer ...` (or `?token=` where headers are impossible:
//! browsers' WebSocket and EventSource) with a tenant's API key (`sy_...`) or an end user's JWT
//! (anything else; see `jwt`). Lookups are cached for a few seconds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use switchyard_store::{Principal, Store};

use crate::error::ApiError;
use crate::AppState;

const AUTH_CACHE_MAX: usize = 10_000;

/// Small TTL cache of credential digest → principal, and the JWT verifier.
pub struct AuthCache {
    map: Mutex<HashMap<[u8; 32], (Principal, Instant)>>,
    jwt: crate::jwt::JwtVerifier,
    /// How long a lookup is reused (`auth_cache_ttl_s`): a change announced over Redis clears
    /// the cache at once, this bounds a replica that missed the announcement.
    ttl: Duration,
}

impl AuthCache {
    pub fn new(jwt: switchyard_core::jwt_config::JwtConfig, ttl: Duration) -> AuthCache {
        AuthCache {
            map: Mutex::new(HashMap::new()),
            jwt: crate::jwt::JwtVerifier::new(jwt),
            ttl,
        }
    }

    pub async fn authenticate(
        &self,
        store: &Store,
        presented: &str,
    ) -> Result<Principal, ApiError> {
        let digest = switchyard_core::apikey::digest(presented);
        if let Ok(map) = self.map.lock() {
            if let Some((p, at)) = map.get(&digest) {
                let expired = p.expires_at.is_some_and(|e| e <= chrono::Utc::now());
                if at.elapsed() < self.ttl && !expired {
                    return Ok(p.clone());
                }
            }
        }
        let principal = if presented.starts_with(switchyard_core::apikey::KEY_PREFIX) {
            store
                .authenticate(presented)
                .await?
                .ok_or_else(ApiError::unauthorized)?
        } else {
            match self.jwt.verify(store, presented).await? {
                Ok(p) => p,
                Err(why) => {
                    tracing::info!(reason = %why, "bearer token refused");
                    return Err(ApiError::unauthorized());
                }
            }
        };
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= AUTH_CACHE_MAX {
                map.clear();
            }
            map.insert(digest, (principal.clone(), Instant::now()));
        }
        Ok(principal)
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Auth(pub Principal);

fn token_from_query(query: Option<&str>) -> Option<String> {
    url_query_param(query?, "token")
}

/// Reads one parameter of a query string (percent-decoded).
pub fn url_query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                    }
                    _ => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a long-lived request's credential still authenticates (through the auth cache: a
/// revoked key fails within its TTL, at once on the replica that revoked it; a token past
/// `exp`). Postgres down is not the credential's fault: the next check decides.
pub(crate) async fn still_valid(state: &AppState, credential: &str) -> bool {
    match state
        .auth_cache
        .authenticate(&state.store, credential)
        .await
    {
        Ok(_) => true,
        Err(e) => e.code != switchyard_core::ErrorCode::Unauthorized,
    }
}

/// A credential checked again every `every` while a request lives (a front-door relay):
/// `revoked` is cancelled once it no longer authenticates. Dropping the watch stops the checks.
pub(crate) struct CredentialWatch {
    pub revoked: tokio_util::sync::CancellationToken,
    _stop: tokio_util::sync::DropGuard,
}

impl CredentialWatch {
    /// Without a credential (none to check again: the request was let in without one) the
    /// watch never fires.
    pub(crate) fn start(
        state: &AppState,
        credential: Option<String>,
        every: Duration,
    ) -> CredentialWatch {
        let revoked = tokio_util::sync::CancellationToken::new();
        let stop = tokio_util::sync::CancellationToken::new();
        let Some(credential) = credential.filter(|c| !c.is_empty()) else {
            return CredentialWatch {
                revoked,
                _stop: stop.drop_guard(),
            };
        };
        let (st, flag, done) = (state.clone(), revoked.clone(), stop.clone());
        state.tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = done.cancelled() => return,
                    _ = st.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if !still_valid(&st, &credential).await {
                    flag.cancel();
                    return;
                }
            }
        });
        CredentialWatch {
            revoked,
            _stop: stop.drop_guard(),
        }
    }
}

/// The credential a request presents: `Authorization: Bearer ...`, else `?token=`.
pub fn presented_credential(
    headers: &axum::http::HeaderMap,
    query: Option<&str>,
) -> Option<String> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let presented = match header {
        Some(h) => {
            let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
            if !scheme.eq_ignore_ascii_case("bearer") {
                return None;
            }
            rest.trim().to_string()
        }
        None => token_from_query(query)?,
    };
    (!presented.is_empty()).then_some(presented)
}

impl<S> FromRequestParts<S> for Auth
where
    AppState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // normally the authorization layer already authenticated the caller
        if let Some(a) = parts.extensions.get::<Auth>() {
            return Ok(a.clone());
        }
        let app = AppState::from_ref(state);
        let presented = presented_credential(&parts.headers, parts.uri.query())
            .ok_or_else(ApiError::unauthorized)?;
        let p = app.auth_cache.authenticate(&app.store, &presented).await?;
        Ok(Auth(p))
    }
}

/// Last use of API keys, written at most once a minute per key by this process (batched by a
/// background task), never once per request.
#[derive(Default)]
pub struct KeyUsage {
    last: Mutex<HashMap<uuid::Uuid, Instant>>,
    pending: Mutex<Vec<uuid::Uuid>>,
}

/// How often a key's last use is written at most (per API process).
pub const KEY_USAGE_EVERY: Duration = Duration::from_secs(60);

impl KeyUsage {
    pub fn used(&self, key: uuid::Uuid) {
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        if last
            .get(&key)
            .is_some_and(|t| t.elapsed() < KEY_USAGE_EVERY)
        {
            return;
        }
        if last.len() >= AUTH_CACHE_MAX {
            last.clear();
        }
        last.insert(key, Instant::now());
        if let Ok(mut p) = self.pending.lock() {
            p.push(key);
        }
    }

    /// Writes what is pending (one statement).
    pub async fn flush(&self, store: &Store) {
        let ids = match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => return,
        };
        if let Err(e) = store.touch_api_keys(&ids).await {
            tracing::debug!(error = %e, "could not record API key use");
        }
    }
}

impl AuthCache {
    /// Forgets every cached lookup (after a revocation through this process).
    pub fn clear(&self) {
        if let Ok(mut map) = self.map.lock() {
            map.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_decode() {
        assert_eq!(
            url_query_param("a=1&token=sy_x%5Fy", "token").as_deref(),
            Some("sy_x_y")
        );
        assert_eq!(url_query_param("after=3", "token"), None);
        assert_eq!(
            url_query_param("token=%zz", "token").as_deref(),
            Some("%zz")
        );
    }
}
