//! `--code LANGUAGE`: `code.exec` jobs in closed loops (`--concurrency` of them): each loop
//! submits a hello-world program, follows it over its own WebSocket and times submit → first
//! `stdout` event and submit → terminal event, as the client sees them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::{base_url, ws_url, Args};
use crate::stats::{new_histogram, record_us, LatencySummary};
use crate::submit::Api;

struct Times {
    first: hdrhistogram::Histogram<u64>,
    done: hdrhistogram::Histogram<u64>,
    errors: u64,
}

fn program(lang: &str) -> anyhow::Result<&'static str> {
    Ok(match lang {
        "python" => "print('hello')",
        "javascript" => "console.log('hello')",
        other => anyhow::bail!("--code takes python or javascript, not {other}"),
    })
}

pub async fn run(args: &Args, lang: &str) -> anyhow::Result<bool> {
    let mut input = json!({"language": lang, "code": program(lang)?});
    if let Some(s) = &args.sandbox {
        input["sandbox"] = json!(s);
    }
    let body = Arc::new(json!({"kind": "code.exec", "input": input}));
    let loops = args.concurrency.max(1) as u64;
    let api = Api::new(base_url(&args.url), &args.api_key, loops as usize)?;
    let ws = ws_url(&args.url)?;
    let times = Arc::new(Mutex::new(Times {
        first: new_histogram(),
        done: new_histogram(),
        errors: 0,
    }));
    let per_loop = args.jobs.div_ceil(loops);
    // `--rate`: each loop starts a job at most every `loops / rate` seconds (lets a warm
    // pool refill between jobs)
    let gap = args
        .rate
        .map(|r| Duration::from_secs_f64(loops as f64 / r))
        .unwrap_or_default();
    let t0 = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..loops {
        let (api, ws, body, times) = (api.clone(), ws.clone(), body.clone(), times.clone());
        let timeout = Duration::from_secs(args.timeout_s);
        tasks.spawn(async move {
            let mut conn = crate::ws::connect(&ws, &api).await?;
            for _ in 0..per_loop {
                let next = tokio::time::Instant::now() + gap;
                match one(&api, &mut conn, &body, timeout).await {
                    Ok((first, done)) => {
                        let mut t = times.lock().unwrap_or_else(|p| p.into_inner());
                        record_us(&mut t.first, first.as_micros() as u64);
                        record_us(&mut t.done, done.as_micros() as u64);
                    }
                    Err(e) => {
                        eprintln!("code job: {e:#}");
                        times.lock().unwrap_or_else(|p| p.into_inner()).errors += 1;
                    }
                }
                tokio::time::sleep_until(next).await;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let elapsed = t0.elapsed();
    let t = times.lock().unwrap_or_else(|p| p.into_inner());
    let first = LatencySummary::from_histogram(&t.first);
    let done = LatencySummary::from_histogram(&t.done);
    println!(
        "switchyard-loadtest: code.exec {lang}{} ×{} in {loops} loop(s)",
        args.sandbox
            .as_deref()
            .map(|s| format!(" ({s})"))
            .unwrap_or_default(),
        done.count
    );
    println!("  submit → first output: {}", first.human());
    println!("  submit → completed:    {}", done.human());
    println!(
        "  executions/s:          {:.1} ({} errors, {:.1}s)",
        done.count as f64 / elapsed.as_secs_f64(),
        t.errors,
        elapsed.as_secs_f64()
    );
    if args.json {
        println!(
            "{}",
            json!({"first_output": first.json(), "completed": done.json(),
                   "per_s": done.count as f64 / elapsed.as_secs_f64(), "errors": t.errors})
        );
    }
    Ok(t.errors == 0)
}

/// One job: submit, subscribe, wait for its first stdout and its end.
async fn one(
    api: &Api,
    conn: &mut crate::ws::WsStream,
    body: &Value,
    timeout: Duration,
) -> anyhow::Result<(Duration, Duration)> {
    let start = Instant::now();
    let r = api
        .client
        .post(format!("{}/v1/jobs", api.base))
        .header(reqwest::header::AUTHORIZATION, api.auth.clone())
        .json(body)
        .send()
        .await?;
    anyhow::ensure!(r.status().as_u16() == 202, "submit: HTTP {}", r.status());
    let job: Value = r.json().await?;
    let id = job["id"].as_str().unwrap_or_default().to_string();
    conn.send(Message::text(format!(
        r#"{{"op":"subscribe","job_id":"{id}","after":0}}"#
    )))
    .await?;
    let mut first = None;
    loop {
        let msg = tokio::time::timeout(timeout, conn.next())
            .await
            .map_err(|_| anyhow::anyhow!("job {id}: no end within {timeout:?}"))?
            .ok_or_else(|| anyhow::anyhow!("WebSocket closed"))??;
        let Message::Text(text) = msg else { continue };
        let ev: Value = serde_json::from_str(&text)?;
        if ev["job_id"].as_str() != Some(id.as_str()) {
            continue;
        }
        match ev["type"].as_str() {
            Some("stdout") if first.is_none() => first = Some(start.elapsed()),
            Some("succeeded") => {
                let done = start.elapsed();
                return Ok((first.unwrap_or(done), done));
            }
            Some(t @ ("failed" | "cancelled")) => anyhow::bail!("job {id} {t}: {ev}"),
            _ => {}
        }
    }
}
