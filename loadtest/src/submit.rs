//! REST side: job submission (`POST /v1/jobs`) and status checks (`GET /v1/jobs/{id}`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::stats::{new_histogram, record_us, Shared, Terminal};

/// Everything the REST calls need; cheap to clone.
#[derive(Clone)]
pub struct Api {
    pub client: reqwest::Client,
    pub base: Arc<str>,
    pub auth: HeaderValue,
}

impl Api {
    /// One HTTP/1.1 client with a pool sized for `concurrency` connections.
    pub fn new(base: &str, api_key: &str, concurrency: usize) -> anyhow::Result<Api> {
        let client = reqwest::Client::builder()
            .http1_only()
            .pool_max_idle_per_host(concurrency)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()?;
        let mut auth = HeaderValue::from_str(&format!("Bearer {api_key}"))
            .map_err(|_| anyhow::anyhow!("API key contains characters not allowed in a header"))?;
        auth.set_sensitive(true);
        Ok(Api {
            client,
            base: Arc::from(base),
            auth,
        })
    }

    /// `GET /v1/jobs/{id}` → the job's `status` string.
    pub async fn job_status(&self, id: Uuid) -> anyhow::Result<String> {
        #[derive(Deserialize)]
        struct JobStatus {
            status: String,
        }
        let resp = self
            .client
            .get(format!("{}/v1/jobs/{id}", self.base))
            .header(AUTHORIZATION, self.auth.clone())
            .send()
            .await?;
        let code = resp.status();
        if !code.is_success() {
            let body = resp.text().await.unwrap_or_default();
            anyhow::bail!("GET /v1/jobs/{id}: HTTP {code}: {}", truncate(&body, 300));
        }
        Ok(resp.json::<JobStatus>().await?.status)
    }
}

/// Only the field we need from the 202 job object.
#[derive(Deserialize)]
struct Accepted {
    id: Uuid,
}

/// Cut a string to at most `max` bytes on a char boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Shared submit-rate limiter (`--rate`): hands out send slots at least one
/// period (`1/R` s) apart, across all submitters.
///
/// A slot is never earlier than the moment it is reserved, so time lost while
/// every submitter was busy is not made up later by a burst: the submit rate
/// stays at or below `R` over any window. Each submitter sleeps once per job
/// (no spinning); slots are computed, not taken from wake-up times, so the
/// timer's millisecond granularity does not lower the achieved rate.
pub struct Pacer {
    period: Duration,
    next: Mutex<Option<Instant>>,
}

impl Pacer {
    /// A pacer for `rate` jobs per second (`rate` must be positive and finite).
    pub fn new(rate: f64) -> Pacer {
        Pacer {
            period: Duration::from_secs_f64(1.0 / rate),
            next: Mutex::new(None),
        }
    }

    /// Reserve the next slot, given the current time: the later of `now` and
    /// one period after the previously reserved slot.
    pub fn reserve(&self, now: Instant) -> Instant {
        let mut next = self.next.lock().unwrap();
        let slot = match *next {
            Some(n) if n > now => n,
            _ => now,
        };
        *next = Some(slot + self.period);
        slot
    }

    /// Wait for the next slot. Returns false if `stop` became true first.
    pub async fn wait(&self, stop: &mut watch::Receiver<bool>) -> bool {
        let now = Instant::now();
        let slot = self.reserve(now);
        if slot <= now {
            return !*stop.borrow();
        }
        tokio::select! {
            biased;
            _ = crate::stopped(stop) => false,
            _ = tokio::time::sleep_until(slot.into()) => true,
        }
    }
}

/// One submitter task: pulls indices from `shared.next` until `jobs` are taken,
/// waits for a `pacer` slot if `--rate` is set, posts each job, records the
/// submit latency (µs) and hands the id to a WebSocket connection (round robin
/// over `ws_tx` by job index). `stop` (Ctrl-C) cuts a pacer wait short.
pub async fn submitter(
    api: Api,
    shared: Arc<Shared>,
    body: Bytes,
    jobs: u64,
    ws_tx: Arc<[mpsc::Sender<Uuid>]>,
    pacer: Option<Arc<Pacer>>,
    mut stop: watch::Receiver<bool>,
) -> Histogram<u64> {
    let mut hist = new_histogram();
    let url = format!("{}/v1/jobs", api.base);
    let json = HeaderValue::from_static("application/json");
    loop {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if i >= jobs {
            break;
        }
        if let Some(pacer) = &pacer {
            if !pacer.wait(&mut stop).await {
                break;
            }
        }
        let start = Instant::now();
        let res = api
            .client
            .post(&url)
            .header(AUTHORIZATION, api.auth.clone())
            .header(CONTENT_TYPE, json.clone())
            .body(body.clone())
            .send()
            .await;
        let resp = match res {
            Ok(r) => r,
            Err(e) => {
                shared.record_submit_error(|| format!("transport error: {e}"));
                continue;
            }
        };
        let code = resp.status();
        if code != StatusCode::ACCEPTED {
            let text = resp.text().await.unwrap_or_default();
            shared.record_submit_error(|| format!("HTTP {code}: {}", truncate(&text, 500)));
            continue;
        }
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => {
                shared.record_submit_error(|| format!("HTTP 202 but reading body failed: {e}"));
                continue;
            }
        };
        // Latency is "request start → 202 received" (including the small body).
        record_us(&mut hist, start.elapsed().as_micros() as u64);
        let id = match serde_json::from_slice::<Accepted>(&bytes) {
            Ok(a) => a.id,
            Err(e) => {
                shared.record_submit_error(|| {
                    format!(
                        "HTTP 202 without a job id ({e}): {}",
                        truncate(&String::from_utf8_lossy(&bytes), 500)
                    )
                });
                continue;
            }
        };
        shared.submitted.fetch_add(1, Ordering::Relaxed);
        let tx = &ws_tx[(i % ws_tx.len() as u64) as usize];
        if tx.send(id).await.is_err() {
            // The connection task is gone (should not happen); follow the job by polling.
            shared.polling.lock().unwrap().insert(id);
        }
    }
    hist
}

/// Follow a job by HTTP polling (after a `reset` or a per-job WS `error`),
/// until it is terminal or `stop` becomes true. Counted only if still claimed
/// in `shared.polling` (so the final check never double counts it).
pub async fn poll_until_terminal(
    api: Api,
    shared: Arc<Shared>,
    id: Uuid,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        if let Ok(status) = api.job_status(id).await {
            if let Some(t) = Terminal::from_status(&status) {
                if shared.polling.lock().unwrap().remove(&id) {
                    shared.record_terminal(t, false, true);
                }
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = crate::stopped(&mut stop) => return,
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_spaces_slots_and_never_bursts() {
        let p = Pacer::new(1000.0); // 1ms period
        let t = Instant::now();
        let ms = Duration::from_millis(1);
        // Back-to-back reservations are one period apart.
        assert_eq!(p.reserve(t), t);
        assert_eq!(p.reserve(t), t + ms);
        assert_eq!(p.reserve(t), t + 2 * ms);
        // After an idle gap the next slot is "now", not a catch-up burst.
        let later = t + 100 * ms;
        assert_eq!(p.reserve(later), later);
        assert_eq!(p.reserve(later), later + ms);
    }

    #[tokio::test]
    async fn pacer_wait_limits_rate_and_stops() {
        let p = Pacer::new(200.0); // 5ms period
        let (tx, mut rx) = watch::channel(false);
        let start = Instant::now();
        for _ in 0..5 {
            assert!(p.wait(&mut rx).await);
        }
        // Slots at 0, 5, 10, 15, 20 ms: never earlier.
        assert!(start.elapsed() >= Duration::from_millis(20));
        // A pending wait is cut short by the stop signal.
        let p = Pacer::new(0.01); // 100s period
        assert!(p.wait(&mut rx).await); // first slot is immediate
        let waiting = tokio::spawn(async move { p.wait(&mut rx).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.send(true).unwrap();
        assert!(!tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("wait returns on stop")
            .unwrap());
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("hello", 10), "hello");
        assert_eq!(truncate("hello", 3), "hel");
        assert_eq!(truncate("héllo", 2), "h");
    }
}
