//! Delays: time to first token, inter-token gaps, random jitter, the request
//! headers that override them, and a shutdown-aware sleep.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use tokio_util::sync::CancellationToken;

use crate::MockLlmConfig;

/// Request header overriding the time to first token, in milliseconds.
pub const TTFT_HEADER: &str = "x-mock-ttft-ms";
/// Request header overriding the delay between tokens, in milliseconds.
pub const INTER_TOKEN_HEADER: &str = "x-mock-inter-token-ms";
/// Request header overriding the jitter bound, in milliseconds: every delay gets
/// a uniform random extra in `0..=jitter`.
pub const JITTER_HEADER: &str = "x-mock-jitter-ms";

/// The delays of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timing {
    pub ttft: Duration,
    pub inter_token: Duration,
    pub jitter: Duration,
}

impl Timing {
    /// The configured delays (the slow ones when `slow`), overridden by headers.
    pub fn for_request(config: &MockLlmConfig, headers: &HeaderMap, slow: bool) -> Self {
        let (ttft, inter_token) = if slow {
            (config.slow_ttft, config.slow_inter_token)
        } else {
            (config.ttft, config.inter_token)
        };
        Self {
            ttft: header_ms(headers, TTFT_HEADER).unwrap_or(ttft),
            inter_token: header_ms(headers, INTER_TOKEN_HEADER).unwrap_or(inter_token),
            jitter: header_ms(headers, JITTER_HEADER).unwrap_or(config.jitter),
        }
    }

    /// The delay before token `i`: the time to first token for `i == 0`, the
    /// inter-token delay after that, plus jitter.
    pub fn token_delay(&self, i: usize, rng: &Rng) -> Duration {
        let base = if i == 0 { self.ttft } else { self.inter_token };
        base.saturating_add(rng.upto(self.jitter))
    }
}

pub(crate) fn header_ms(headers: &HeaderMap, name: &str) -> Option<Duration> {
    let raw = headers.get(name)?;
    match raw.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
        Some(ms) => Some(Duration::from_millis(ms)),
        None => {
            tracing::warn!(header = name, value = ?raw, "ignoring unparseable mock delay header");
            None
        }
    }
}

/// A small lock-free pseudo-random generator (SplitMix64) for jitter; not for
/// anything that needs real randomness.
#[derive(Debug)]
pub(crate) struct Rng {
    state: AtomicU64,
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl Rng {
    /// Seeded from the clock.
    pub fn from_clock() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // Only the low 64 bits of the clock matter for a seed.
        let seed = (nanos & u128::from(u64::MAX)) as u64;
        Self {
            state: AtomicU64::new(seed),
        }
    }

    fn next_u64(&self) -> u64 {
        let mut z = self
            .state
            .fetch_add(GOLDEN_GAMMA, Ordering::Relaxed)
            .wrapping_add(GOLDEN_GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform duration in `0..=max` (nanosecond resolution).
    pub fn upto(&self, max: Duration) -> Duration {
        if max.is_zero() {
            return Duration::ZERO;
        }
        let span = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        let x = self.next_u64();
        let nanos = match span.checked_add(1) {
            Some(m) => x % m,
            None => x,
        };
        Duration::from_nanos(nanos)
    }
}

/// Sleeps for `d` unless shutdown comes first; returns false on shutdown.
/// A zero duration returns immediately without sleeping or yielding.
pub(crate) async fn pause(d: Duration, shutdown: &CancellationToken) -> bool {
    if d.is_zero() {
        return !shutdown.is_cancelled();
    }
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = shutdown.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn delay_headers() {
        let mut h = HeaderMap::new();
        h.insert(TTFT_HEADER, HeaderValue::from_static(" 25 "));
        h.insert(INTER_TOKEN_HEADER, HeaderValue::from_static("nope"));
        h.insert(JITTER_HEADER, HeaderValue::from_static("7"));
        assert_eq!(header_ms(&h, TTFT_HEADER), Some(Duration::from_millis(25)));
        assert_eq!(header_ms(&h, INTER_TOKEN_HEADER), None);
        let config = MockLlmConfig {
            inter_token: Duration::from_millis(3),
            ..MockLlmConfig::default()
        };
        let t = Timing::for_request(&config, &h, false);
        assert_eq!(t.ttft, Duration::from_millis(25));
        assert_eq!(t.inter_token, Duration::from_millis(3));
        assert_eq!(t.jitter, Duration::from_millis(7));
        let slow = Timing::for_request(&config, &HeaderMap::new(), true);
        assert_eq!(slow.ttft, config.slow_ttft);
        assert_eq!(slow.inter_token, config.slow_inter_token);
    }

    #[test]
    fn jitter_stays_in_bounds_and_varies() {
        let rng = Rng::from_clock();
        let max = Duration::from_millis(10);
        let samples: Vec<Duration> = (0..1000).map(|_| rng.upto(max)).collect();
        assert!(samples.iter().all(|d| *d <= max));
        assert!(samples.iter().any(|d| *d < max / 4));
        assert!(samples.iter().any(|d| *d > max * 3 / 4));
        assert_eq!(rng.upto(Duration::ZERO), Duration::ZERO);
        let t = Timing {
            ttft: Duration::from_millis(5),
            inter_token: Duration::from_millis(1),
            jitter: Duration::from_millis(2),
        };
        for i in 0..100 {
            let d = t.token_delay(i, &rng);
            let base = if i == 0 { t.ttft } else { t.inter_token };
            assert!(d >= base && d <= base + t.jitter);
        }
    }
}
