//! Webhook delivery: claims due deliveries, POSTs the signed job end to each URL (no
//! redirects; every resolved address checked at connect time, so a name that rebinds to a
//! private address is refused), and retries with exponential backoff and jitter.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use rand::Rng;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use serde_json::json;
use switchyard_core::webhook::{is_public, sign_with, WebhookConfig, SIGNATURE_HEADER};
use switchyard_store::{DeliveryOutcome, DeliveryTask, Store};
use tokio_util::sync::CancellationToken;

/// Deliveries claimed per round.
const BATCH: i64 = 64;
/// Idle wait between rounds.
const IDLE: Duration = Duration::from_millis(500);

/// Resolves names like the system does, then keeps only addresses a delivery may reach.
struct GuardedResolver {
    allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_string();
            // one answer for "no such name" and "private names only", which tenants read in
            // their deliveries: they must not learn which internal names exist
            let refused = || {
                format!(
                    "refused: {host} has no public address (it does not resolve, or only to \
                     private, loopback or link-local addresses)"
                )
            };
            let all: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), 0)).await {
                Ok(a) => a.collect(),
                Err(e) => {
                    tracing::debug!(host = %host, error = %e, "webhook host lookup failed");
                    return Err(refused().into());
                }
            };
            let ok: Vec<SocketAddr> = all
                .into_iter()
                .filter(|a| allow || is_public(a.ip()))
                .collect();
            if ok.is_empty() {
                return Err(refused().into());
            }
            let addrs: Addrs = Box::new(ok.into_iter());
            Ok(addrs)
        })
    }
}

pub struct Deliverer {
    store: Store,
    cfg: WebhookConfig,
    http: reqwest::Client,
}

impl Deliverer {
    pub fn new(store: Store, cfg: WebhookConfig) -> anyhow::Result<Deliverer> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(cfg.timeout_s.max(1)))
            .connect_timeout(Duration::from_secs(cfg.timeout_s.clamp(1, 10)))
            .user_agent(concat!("switchyard-webhooks/", env!("CARGO_PKG_VERSION")))
            // direct connections only: through a proxy from the environment (HTTPS_PROXY...)
            // the proxy would resolve the host, past the address check below
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                allow_private: cfg.allow_private,
            }))
            .build()?;
        Ok(Deliverer { store, cfg, http })
    }

    /// Delivers until `stop`; Postgres trouble is logged and retried. On `stop`, attempts in
    /// flight finish (each within the timeout) and the round's others are given back.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            let n = match self.round(&stop).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook round failed; retrying");
                    0
                }
            };
            if n == 0 {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(IDLE) => {}
                }
            } else if stop.is_cancelled() {
                return;
            }
        }
    }

    /// One round: claims due deliveries and attempts them concurrently; returns how many.
    /// Once `stop` fires no attempt starts: those not started are given back (due at once,
    /// their attempt not counted) for another scheduler, rather than left claimed until the
    /// lease runs out and then counted as attempts that never happened. A round takes up to
    /// a timeout per wave, longer than a shutdown's grace period.
    pub async fn round(&self, stop: &CancellationToken) -> anyhow::Result<usize> {
        // the lease covers the whole round: its last wave starts after the others took up
        // to the timeout each (a shorter lease let another scheduler send them again)
        let waves = (BATCH as f64 / self.cfg.concurrency.max(1) as f64).ceil();
        let lease = (self.cfg.timeout_s.max(1) as f64 * (waves + 1.0)).max(5.0);
        let max = i32::try_from(self.cfg.max_attempts.max(1)).unwrap_or(i32::MAX);
        let tasks = self.store.claim_deliveries(BATCH, lease, max).await?;
        let n = tasks.len();
        let unstarted = std::sync::Mutex::new(Vec::new());
        futures::stream::iter(tasks)
            .for_each_concurrent(self.cfg.concurrency.max(1), |t| {
                let unstarted = &unstarted;
                async move {
                    if stop.is_cancelled() {
                        if let Ok(mut u) = unstarted.lock() {
                            u.push((t.id, t.attempt));
                        }
                        return;
                    }
                    self.attempt(t).await;
                }
            })
            .await;
        let unstarted = unstarted.into_inner().unwrap_or_default();
        if !unstarted.is_empty() {
            // not given back: their lease runs out and they are claimed again
            self.store.release_deliveries(&unstarted).await?;
            tracing::info!(
                n = unstarted.len(),
                "stopping: webhook deliveries not started were given back"
            );
        }
        Ok(n - unstarted.len())
    }

    async fn attempt(&self, t: DeliveryTask) {
        let started = Instant::now();
        let (status, error) = match self.send(&t).await {
            Ok(s) => (
                Some(s as i32),
                (!(200..300).contains(&s)).then(|| format!("HTTP {s}")),
            ),
            Err(e) => (None, Some(e)),
        };
        let delivered = error.is_none();
        let gone = t.job.is_none() || t.secret.is_none();
        let outcome = if delivered {
            DeliveryOutcome::Delivered
        } else if gone || t.attempt >= self.cfg.max_attempts as i32 {
            DeliveryOutcome::GiveUp
        } else {
            let wait = self.backoff(t.attempt);
            DeliveryOutcome::Retry {
                at: Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default(),
            }
        };
        let entry = json!({
            "attempt": t.attempt,
            "at": Utc::now(),
            "status": status,
            "error": error,
            "duration_ms": started.elapsed().as_millis() as u64,
        });
        match self
            .store
            .record_delivery(t.id, t.attempt, status, error.as_deref(), &entry, &outcome)
            .await
        {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                delivery = %t.id,
                attempt = t.attempt,
                "a webhook attempt ended after its claim ran out; only its log entry was kept"
            ),
            // the claim's lease runs out and the delivery is tried again
            Err(e) => {
                tracing::warn!(error = %e, delivery = %t.id, "could not record a webhook attempt")
            }
        }
    }

    /// Sends one attempt: the HTTP status, or why there was none.
    async fn send(&self, t: &DeliveryTask) -> Result<u16, String> {
        let (Some(job), Some(secret)) = (&t.job, &t.secret) else {
            return Err("the job no longer exists".into());
        };
        let url = reqwest::Url::parse(&t.url).map_err(|e| format!("invalid URL: {e}"))?;
        // an IP-literal host is never resolved: check it here
        let literal = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            _ => None,
        };
        if literal.is_some_and(|ip| !self.cfg.allow_private && !is_public(ip)) {
            return Err("refused: a private, loopback or link-local address".into());
        }
        let body = serde_json::to_vec(&json!({
            "id": t.id,
            "type": t.event,
            "created_at": t.created_at,
            "data": { "job": job.to_job() },
        }))
        .map_err(|e| e.to_string())?;
        let now = Utc::now().timestamp();
        let r = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .header(SIGNATURE_HEADER, {
                let secrets: Vec<&str> = std::iter::once(secret.as_str())
                    .chain(t.previous_secret.as_deref())
                    .collect();
                sign_with(&secrets, now, &body)
            })
            .header("switchyard-delivery", t.id.to_string())
            .header("switchyard-event", &t.event)
            .body(body)
            .send()
            .await
            .map_err(|e| describe(&e))?;
        Ok(r.status().as_u16())
    }

    fn backoff(&self, attempt: i32) -> Duration {
        let base = Duration::from_millis(self.cfg.retry_base_ms.max(1));
        let exp = base.saturating_mul(1u32 << (attempt.clamp(1, 20) - 1));
        let capped = exp.min(Duration::from_secs(self.cfg.retry_max_s.max(1)));
        capped.mul_f64(rand::thread_rng().gen_range(0.8..1.2))
    }
}

/// The error with its causes (a refused resolution says so).
fn describe(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}
