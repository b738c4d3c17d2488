//! `--chat-completions`: an open-loop load of OpenAI chat completions at a fixed rate against
//! any OpenAI-compatible URL (Switchyard's front door, or the mock provider directly), reporting
//! the latency of each request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::task::JoinSet;

use crate::cli::Args;
use crate::stats::{new_histogram, record_us, LatencySummary};

/// Requests in flight at most (a slower server makes the tool report errors, not queue).
const MAX_IN_FLIGHT: usize = 4096;

pub async fn run(args: &Args) -> anyhow::Result<bool> {
    let rate = args
        .rate
        .ok_or_else(|| anyhow::anyhow!("--chat-completions needs --rate"))?;
    let url = format!("{}/v1/chat/completions", crate::cli::base_url(&args.url));
    let total = (rate * args.duration_s as f64).round() as u64;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .tcp_nodelay(true)
        .build()?;
    let body = Arc::new(json!({
        "model": args.model,
        "messages": [{"role": "user", "content": args.prompt()}],
        "max_tokens": args.max_tokens,
    }));
    let hist = Arc::new(Mutex::new(new_histogram()));
    let errors = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = JoinSet::new();
    let t0 = Instant::now();
    for _ in 0..total {
        tick.tick().await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (http, url, body, hist, errors) = (
            http.clone(),
            url.clone(),
            body.clone(),
            hist.clone(),
            errors.clone(),
        );
        let key = args.api_key.clone();
        tasks.spawn(async move {
            let start = Instant::now();
            let ok = match http.post(&url).bearer_auth(key).json(&*body).send().await {
                Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                _ => false,
            };
            let us = start.elapsed().as_micros() as u64;
            if ok {
                if let Ok(mut h) = hist.lock() {
                    record_us(&mut h, us);
                }
            } else {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = t0.elapsed();
    let summary = hist
        .lock()
        .map(|h| LatencySummary::from_histogram(&h))
        .map_err(|_| anyhow::anyhow!("histogram lock poisoned"))?;
    let errors = errors.load(Ordering::Relaxed);
    println!(
        "switchyard-loadtest: chat completions at {rate}/s for {}s against {url}",
        args.duration_s
    );
    println!(
        "  requests:   {total} ({} ok, {errors} errors) in {:.1}s",
        summary.count,
        elapsed.as_secs_f64()
    );
    println!("  latency:    {}", summary.human());
    if args.json {
        println!(
            "{}",
            json!({ "requests": total, "errors": errors, "latency": summary.json() })
        );
    }
    Ok(errors == 0)
}
