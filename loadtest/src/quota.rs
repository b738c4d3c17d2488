//! `--quota-urls`: many clients of one tenant hammer several API replicas; the per-second
//! counts of admitted (200) and refused (429) requests show whether the tenant's requests per
//! minute hold across replicas (the limit lives in Redis, not in any one process).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::Args;

/// Counts per second of the run.
struct Buckets {
    ok: Vec<AtomicU64>,
    refused: Vec<AtomicU64>,
    other: AtomicU64,
}

pub async fn run(args: &Args) -> anyhow::Result<bool> {
    let secs = args.duration_s.max(1) as usize;
    let buckets = Arc::new(Buckets {
        ok: (0..secs).map(|_| AtomicU64::new(0)).collect(),
        refused: (0..secs).map(|_| AtomicU64::new(0)).collect(),
        other: AtomicU64::new(0),
    });
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency as usize)
        .build()?;
    let start = Instant::now();
    let end = start + Duration::from_secs(secs as u64);
    let mut tasks = Vec::new();
    for i in 0..args.concurrency as usize {
        let url = format!(
            "{}/v1/jobs?limit=1",
            args.quota_urls[i % args.quota_urls.len()].trim_end_matches('/')
        );
        let (http, key, b) = (http.clone(), args.api_key.clone(), buckets.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let r = http.get(&url).bearer_auth(&key).send().await;
                let sec = start.elapsed().as_secs() as usize;
                if sec >= b.ok.len() {
                    break;
                }
                match r.map(|r| r.status().as_u16()) {
                    Ok(200) => b.ok[sec].fetch_add(1, Ordering::Relaxed),
                    Ok(429) => b.refused[sec].fetch_add(1, Ordering::Relaxed),
                    _ => b.other.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let ok: Vec<u64> = buckets
        .ok
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    let refused: u64 = buckets
        .refused
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum();
    let other = buckets.other.load(Ordering::Relaxed);
    let admitted: u64 = ok.iter().sum();
    // the most admitted in any window of 60 s (or the whole run, if shorter)
    let w = secs.min(60);
    let max_window = (0..=secs - w)
        .map(|i| ok[i..i + w].iter().sum::<u64>())
        .max()
        .unwrap_or(0);
    let minutes = secs as f64 / 60.0;
    println!(
        "{} replicas, {} clients, {secs} s: {admitted} admitted ({:.0}/min), {refused} refused (429), {other} other",
        args.quota_urls.len(),
        args.concurrency,
        admitted as f64 / minutes
    );
    println!("most admitted in any {w} s window: {max_window}");
    if args.quota_rpm > 0 {
        let allowed = args.quota_rpm as f64 * w as f64 / 60.0;
        let burst = (args.quota_rpm / 6).max(1) as f64;
        println!(
            "limit {} /min: a {w} s window may admit {:.0} (+ a burst of {burst:.0}); \
             measured {max_window} = {:+.1}% over the sustained rate",
            args.quota_rpm,
            allowed,
            (max_window as f64 / allowed - 1.0) * 100.0
        );
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "replicas": args.quota_urls.len(), "clients": args.concurrency,
                    "seconds": secs, "admitted": admitted, "refused": refused, "other": other,
                    "max_window": max_window, "window_s": w, "limit_per_min": args.quota_rpm,
                })
            );
        }
        return Ok(other == 0 && (max_window as f64) <= allowed + burst + 1.0);
    }
    Ok(other == 0)
}
