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

/// Deliveries claimed at once at most.
const BATCH: i64 = 64;
/// Deliveries of one tenant in one claim at most (tenants in a random order): a tenant with
/// many due does not fill every free slot.
const PER_TENANT: i64 = 4;
/// Wait before looking for due deliveries again when there were none.
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

    /// Delivers until `stop`; Postgres trouble is logged and retried. Slots are refilled as
    /// attempts end (claimed just before they start, a few at a time): a slow or dead
    /// receiver holds only the slots of its own attempts, and no claimed delivery waits
    /// behind it. On `stop` no attempt starts and those in flight finish (each within the
    /// timeout); nothing is left claimed but not started.
    pub async fn run(self, stop: CancellationToken) {
        let slots = self.cfg.concurrency.max(1);
        // claims of at least this many (or whatever is free when nothing runs): a claim per
        // ending attempt would cost a statement per delivery
        let refill_at = (slots / 4).max(1);
        // each attempt starts as soon as it is claimed and ends within the timeout; as much
        // again (and a little) for recording its outcome with Postgres slow
        let lease = 2.0 * self.cfg.timeout_s.max(1) as f64 + 5.0;
        let max = i32::try_from(self.cfg.max_attempts.max(1)).unwrap_or(i32::MAX);
        let mut running = futures::stream::FuturesUnordered::new();
        // when to look for due deliveries again after a claim found fewer than it asked for
        let mut idle_until: Option<tokio::time::Instant> = None;
        loop {
            let free = slots - running.len();
            let idle = idle_until.is_some_and(|t| tokio::time::Instant::now() < t);
            if !stop.is_cancelled() && !idle && (free >= refill_at || running.is_empty()) {
                let want = free.min(BATCH as usize) as i64;
                match self
                    .store
                    .claim_deliveries(want, PER_TENANT, lease, max)
                    .await
                {
                    Ok(tasks) => {
                        idle_until = ((tasks.len() as i64) < want)
                            .then(|| tokio::time::Instant::now() + IDLE);
                        for t in tasks {
                            running.push(self.attempt(t));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming webhook deliveries failed; retrying");
                        idle_until = Some(tokio::time::Instant::now() + IDLE);
                    }
                }
                continue;
            }
            let wake = idle_until.unwrap_or_else(|| tokio::time::Instant::now() + IDLE);
            tokio::select! {
                _ = stop.cancelled(), if !stop.is_cancelled() => {}
                Some(()) = running.next(), if !running.is_empty() => {}
                _ = tokio::time::sleep_until(wake), if !stop.is_cancelled() => {}
                else => break,
            }
            if stop.is_cancelled() && running.is_empty() {
                break;
            }
        }
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
            // signed with the body: a receiver can tell a delivery meant for another of the
            // tenant's URLs (a job's own, set by whoever submitted it) replayed to it
            "url": t.url,
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
