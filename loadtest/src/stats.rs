//! Shared counters, histogram helpers and the final report.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use uuid::Uuid;

/// Highest latency the histograms track, in microseconds (1 hour).
const MAX_TRACKED_US: u64 = 3_600_000_000;

/// A latency histogram in microseconds with 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_TRACKED_US, 3).expect("valid histogram bounds")
}

/// Record a latency (µs), saturating instead of failing on out-of-range values.
#[inline]
pub fn record_us(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.max(1));
}

/// Terminal job statuses as counted by the load test.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Terminal {
    Succeeded,
    Failed,
    Cancelled,
}

impl Terminal {
    /// Parse a terminal status string; `None` for non-terminal or unknown values.
    pub fn from_status(s: &str) -> Option<Terminal> {
        match s {
            "succeeded" => Some(Terminal::Succeeded),
            "failed" => Some(Terminal::Failed),
            "cancelled" | "canceled" => Some(Terminal::Cancelled),
            _ => None,
        }
    }
}

/// Counters shared by every task. Only atomics and rarely-touched mutexes.
pub struct Shared {
    /// Reference point for all "time since start" values (first submit).
    pub t0: Instant,
    /// Next job index to submit (submitters `fetch_add` until `>= jobs`).
    pub next: AtomicU64,
    /// Jobs accepted with 202.
    pub submitted: AtomicU64,
    /// Submissions that did not return 202 (including transport errors).
    pub submit_errors: AtomicU64,
    /// First few submit error bodies, for the report.
    pub submit_error_samples: Mutex<Vec<String>>,
    /// Jobs that reached a terminal status (by any route).
    pub finished: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub cancelled: AtomicU64,
    /// Jobs counted as finished from `GET /v1/jobs/{id}` rather than a WS terminal event.
    pub finished_without_ws: AtomicU64,
    /// Microseconds since `t0` of the last terminal observation used for e2e throughput.
    pub last_terminal_us: AtomicU64,
    /// WebSocket `error` frames and undecodable frames.
    pub ws_errors: AtomicU64,
    /// WebSocket reconnects after a dropped connection.
    pub ws_reconnects: AtomicU64,
    /// `reset` events received (job then followed via GET).
    pub resets: AtomicU64,
    /// Jobs currently followed by HTTP polling (after `reset`/`error`); claimed by removal.
    pub polling: Mutex<HashSet<Uuid>>,
}

/// How many error bodies to keep for the report.
pub const MAX_ERROR_SAMPLES: usize = 5;

impl Shared {
    pub fn new(t0: Instant) -> Shared {
        Shared {
            t0,
            next: AtomicU64::new(0),
            submitted: AtomicU64::new(0),
            submit_errors: AtomicU64::new(0),
            submit_error_samples: Mutex::new(Vec::new()),
            finished: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            finished_without_ws: AtomicU64::new(0),
            last_terminal_us: AtomicU64::new(0),
            ws_errors: AtomicU64::new(0),
            ws_reconnects: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            polling: Mutex::new(HashSet::new()),
        }
    }

    /// Count one job as finished with `t`. `update_end` moves the e2e end time.
    pub fn record_terminal(&self, t: Terminal, via_ws: bool, update_end: bool) {
        match t {
            Terminal::Succeeded => &self.succeeded,
            Terminal::Failed => &self.failed,
            Terminal::Cancelled => &self.cancelled,
        }
        .fetch_add(1, Ordering::Relaxed);
        if !via_ws {
            self.finished_without_ws.fetch_add(1, Ordering::Relaxed);
        }
        if update_end {
            let us = self.t0.elapsed().as_micros() as u64;
            self.last_terminal_us.fetch_max(us, Ordering::Relaxed);
        }
        self.finished.fetch_add(1, Ordering::Release);
    }

    /// Count a failed submission and keep its body if we have few samples so far.
    pub fn record_submit_error(&self, sample: impl FnOnce() -> String) {
        let n = self.submit_errors.fetch_add(1, Ordering::Relaxed);
        if (n as usize) < MAX_ERROR_SAMPLES {
            let s = sample();
            eprintln!("submit error: {s}");
            self.submit_error_samples.lock().unwrap().push(s);
        }
    }
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Round to 2 decimals.
pub fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn us_to_ms(us: u64) -> f64 {
    round2(us as f64 / 1000.0)
}

impl LatencySummary {
    /// Summarise a µs histogram (all zeros when empty).
    pub fn from_histogram(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary {
                count: 0,
                p50_ms: 0.0,
                p90_ms: 0.0,
                p99_ms: 0.0,
                max_ms: 0.0,
            };
        }
        LatencySummary {
            count: h.len(),
            p50_ms: us_to_ms(h.value_at_quantile(0.50)),
            p90_ms: us_to_ms(h.value_at_quantile(0.90)),
            p99_ms: us_to_ms(h.value_at_quantile(0.99)),
            max_ms: us_to_ms(h.max()),
        }
    }

    /// `p50=1.23ms p90=... p99=... max=...`
    pub fn human(&self) -> String {
        format!(
            "p50={:.2}ms p90={:.2}ms p99={:.2}ms max={:.2}ms",
            self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "count": self.count,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
        })
    }
}

/// Jobs per second, 0 when the interval is empty.
pub fn rate(count: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        round2(count as f64 / s)
    } else {
        0.0
    }
}

/// Everything the final report shows.
#[derive(Debug, Clone)]
pub struct Report {
    pub kind: String,
    /// Model name for `llm.chat` runs.
    pub model: Option<String>,
    pub jobs_requested: u64,
    pub concurrency: u32,
    pub ws_connections: u32,
    /// `--rate` (jobs/s across all submitters); `None` = unlimited.
    pub rate: Option<f64>,
    pub submitted: u64,
    pub submit_errors: u64,
    pub submit_error_samples: Vec<String>,
    pub submit_latency: LatencySummary,
    pub submit_phase: Duration,
    pub e2e_phase: Duration,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Delivery latency of every event with a `ts`.
    pub event_latency: LatencySummary,
    /// Events published after the subscribe frame for their job was sent.
    pub live_event_latency: LatencySummary,
    /// Events published before that, i.e. replayed from the job's history.
    pub replayed_event_latency: LatencySummary,
    pub lost: u64,
    pub lost_samples: Vec<String>,
    pub finished_without_ws: u64,
    pub ws_errors: u64,
    pub ws_reconnects: u64,
    pub resets: u64,
}

impl Report {
    pub fn submit_throughput(&self) -> f64 {
        rate(self.submitted, self.submit_phase)
    }

    pub fn e2e_throughput(&self) -> f64 {
        rate(self.succeeded, self.e2e_phase)
    }

    pub fn ok(&self) -> bool {
        self.lost == 0 && self.submit_errors == 0
    }

    pub fn human(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let model = self
            .model
            .as_deref()
            .map(|m| format!(" model={m}"))
            .unwrap_or_default();
        let rate = self
            .rate
            .map(|r| format!("{r}/s"))
            .unwrap_or_else(|| "unlimited".to_string());
        let _ = writeln!(
            s,
            "switchyard-loadtest: kind={}{model} jobs={} concurrency={} ws_connections={} rate={rate}",
            self.kind, self.jobs_requested, self.concurrency, self.ws_connections
        );
        let _ = writeln!(s, "  jobs submitted:            {}", self.submitted);
        let _ = writeln!(s, "  submit errors:             {}", self.submit_errors);
        for e in &self.submit_error_samples {
            let _ = writeln!(s, "    - {e}");
        }
        let _ = writeln!(
            s,
            "  submit latency:            {}",
            self.submit_latency.human()
        );
        let _ = writeln!(
            s,
            "  submit throughput:         {:.2} jobs/s ({:.2}s submit phase)",
            self.submit_throughput(),
            self.submit_phase.as_secs_f64()
        );
        let _ = writeln!(s, "  end-to-end throughput:     {:.2} jobs/s succeeded ({:.2}s first submit -> last terminal)",
            self.e2e_throughput(), self.e2e_phase.as_secs_f64());
        let _ = writeln!(
            s,
            "  terminal status:           succeeded={} failed={} cancelled={}",
            self.succeeded, self.failed, self.cancelled
        );
        let _ = writeln!(
            s,
            "  event delivery latency:    {} ({} events)",
            self.event_latency.human(),
            self.event_latency.count
        );
        let _ = writeln!(
            s,
            "    live event delivery latency (published after subscribe): {} ({} events)",
            self.live_event_latency.human(),
            self.live_event_latency.count
        );
        let _ = writeln!(
            s,
            "    replayed event latency (published before subscribe):     {} ({} events)",
            self.replayed_event_latency.human(),
            self.replayed_event_latency.count
        );
        let _ = writeln!(s, "  lost jobs:                 {}", self.lost);
        for e in &self.lost_samples {
            let _ = writeln!(s, "    - {e}");
        }
        let _ = writeln!(
            s,
            "  finished w/o terminal WS:  {}",
            self.finished_without_ws
        );
        let _ = writeln!(
            s,
            "  ws errors/reconnects/resets: {}/{}/{}",
            self.ws_errors, self.ws_reconnects, self.resets
        );
        let _ = write!(
            s,
            "  result:                    {}",
            if self.ok() { "OK" } else { "FAIL" }
        );
        s
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": self.kind,
            "model": self.model,
            "jobs_requested": self.jobs_requested,
            "concurrency": self.concurrency,
            "ws_connections": self.ws_connections,
            "rate": self.rate,
            "submitted": self.submitted,
            "submit_errors": self.submit_errors,
            "submit_latency_ms": self.submit_latency.json(),
            "submit_phase_s": round2(self.submit_phase.as_secs_f64()),
            "submit_throughput_jobs_per_s": self.submit_throughput(),
            "e2e_phase_s": round2(self.e2e_phase.as_secs_f64()),
            "e2e_throughput_jobs_per_s": self.e2e_throughput(),
            "terminal": {
                "succeeded": self.succeeded,
                "failed": self.failed,
                "cancelled": self.cancelled,
            },
            "event_latency_ms": self.event_latency.json(),
            "live_event_latency_ms": self.live_event_latency.json(),
            "replayed_event_latency_ms": self.replayed_event_latency.json(),
            "events": self.event_latency.count,
            "lost": self.lost,
            "finished_without_terminal_ws_event": self.finished_without_ws,
            "ws_errors": self.ws_errors,
            "ws_reconnects": self.ws_reconnects,
            "resets": self.resets,
            "ok": self.ok(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_formats_ms_with_two_decimals() {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            record_us(&mut h, us * 10); // 10µs .. 10ms
        }
        let s = LatencySummary::from_histogram(&h);
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 5.0).abs() < 0.02, "{s:?}");
        assert!((s.p99_ms - 9.9).abs() < 0.02, "{s:?}");
        assert!((s.max_ms - 10.0).abs() < 0.02, "{s:?}");
        let text = s.human();
        assert!(text.starts_with("p50=5.0"), "{text}");
        assert!(text.contains("max=10.0"), "{text}");
        // Exactly two decimals everywhere.
        for part in text.split(' ') {
            let v = part.split('=').nth(1).unwrap().trim_end_matches("ms");
            assert_eq!(v.split('.').nth(1).unwrap().len(), 2, "{part}");
        }
    }

    #[test]
    fn empty_histogram_is_zero() {
        let s = LatencySummary::from_histogram(&new_histogram());
        assert_eq!(s.count, 0);
        assert_eq!(s.human(), "p50=0.00ms p90=0.00ms p99=0.00ms max=0.00ms");
    }

    #[test]
    fn rate_and_rounding() {
        assert_eq!(rate(100, Duration::from_secs(3)), 33.33);
        assert_eq!(rate(5, Duration::ZERO), 0.0);
        assert_eq!(round2(1.23456), 1.23);
    }

    #[test]
    fn terminal_parsing() {
        assert_eq!(
            Terminal::from_status("succeeded"),
            Some(Terminal::Succeeded)
        );
        assert_eq!(
            Terminal::from_status("cancelled"),
            Some(Terminal::Cancelled)
        );
        assert_eq!(Terminal::from_status("running"), None);
    }

    fn summary(count: u64, p50_ms: f64) -> LatencySummary {
        LatencySummary {
            count,
            p50_ms,
            p90_ms: p50_ms,
            p99_ms: p50_ms,
            max_ms: p50_ms,
        }
    }

    fn report(rate: Option<f64>) -> Report {
        Report {
            kind: "system.noop".to_string(),
            model: None,
            jobs_requested: 10,
            concurrency: 2,
            ws_connections: 1,
            rate,
            submitted: 10,
            submit_errors: 0,
            submit_error_samples: Vec::new(),
            submit_latency: summary(10, 1.0),
            submit_phase: Duration::from_secs(1),
            e2e_phase: Duration::from_secs(2),
            succeeded: 10,
            failed: 0,
            cancelled: 0,
            event_latency: summary(30, 2.0),
            live_event_latency: summary(20, 0.5),
            replayed_event_latency: summary(10, 7.25),
            lost: 0,
            lost_samples: Vec::new(),
            finished_without_ws: 0,
            ws_errors: 0,
            ws_reconnects: 0,
            resets: 0,
        }
    }

    #[test]
    fn report_shows_live_and_replayed_latency() {
        let r = report(None);
        let text = r.human();
        assert!(
            text.lines().next().unwrap().ends_with(" rate=unlimited"),
            "{text}"
        );
        let live = text
            .lines()
            .find(|l| l.contains("live event delivery latency (published after subscribe)"))
            .expect("live line");
        assert!(
            live.ends_with("p50=0.50ms p90=0.50ms p99=0.50ms max=0.50ms (20 events)"),
            "{live}"
        );
        let replayed = text
            .lines()
            .find(|l| l.contains("replayed event latency (published before subscribe)"))
            .expect("replayed line");
        assert!(replayed.ends_with("max=7.25ms (10 events)"), "{replayed}");
        // The two values line up.
        assert_eq!(live.find("p50="), replayed.find("p50="));

        let j = r.json();
        assert_eq!(j["rate"], serde_json::Value::Null);
        assert_eq!(j["event_latency_ms"]["count"], 30);
        assert_eq!(j["live_event_latency_ms"]["count"], 20);
        assert_eq!(j["live_event_latency_ms"]["p50_ms"], 0.5);
        assert_eq!(j["replayed_event_latency_ms"]["count"], 10);
        assert_eq!(j["replayed_event_latency_ms"]["max_ms"], 7.25);
    }

    #[test]
    fn report_shows_rate() {
        let r = report(Some(250.0));
        assert!(r.human().lines().next().unwrap().ends_with(" rate=250/s"));
        assert_eq!(r.json()["rate"], 250.0);
        let r = report(Some(0.5));
        assert!(r.human().lines().next().unwrap().ends_with(" rate=0.5/s"));
    }
}
