//! Rate limit of failed authentication per source address: after `per_minute` failures (a
//! `governor` quota per IP) the source is refused with 429 and `Retry-After` for every request,
//! valid key or not, until its quota recovers — so guessing keys cannot go faster than that.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Sources tracked at most (a flood of distinct addresses resets the table).
const MAX_SOURCES: usize = 100_000;

pub struct AuthFailures {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

impl AuthFailures {
    pub fn new(per_minute: u32) -> AuthFailures {
        let n = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
        AuthFailures {
            limiter: RateLimiter::keyed(Quota::per_minute(n)),
            blocked: Mutex::new(HashMap::new()),
        }
    }

    /// How long `source` must still wait, if it is blocked.
    pub fn blocked_for(&self, source: IpAddr) -> Option<Duration> {
        let mut map = self.blocked.lock().ok()?;
        let until = *map.get(&source)?;
        let now = Instant::now();
        if until > now {
            Some(until - now)
        } else {
            map.remove(&source);
            None
        }
    }

    /// Counts a failure; returns the wait when it used up the source's quota.
    pub fn failed(&self, source: IpAddr) -> Option<Duration> {
        match self.limiter.check_key(&source) {
            Ok(()) => None,
            Err(not_until) => {
                let wait = not_until
                    .wait_time_from(DefaultClock::default().now())
                    .max(Duration::from_secs(1));
                if let Ok(mut map) = self.blocked.lock() {
                    if map.len() >= MAX_SOURCES {
                        map.clear();
                        self.limiter.retain_recent();
                    }
                    map.insert(source, Instant::now() + wait);
                }
                Some(wait)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_a_source_after_its_quota() {
        let f = AuthFailures::new(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(f.failed(a).is_none());
        }
        assert!(f.blocked_for(a).is_none());
        let wait = f.failed(a).expect("over quota");
        assert!(wait >= Duration::from_secs(1));
        assert!(f.blocked_for(a).is_some());
        assert!(f.blocked_for(b).is_none());
        assert!(f.failed(b).is_none());
    }
}
