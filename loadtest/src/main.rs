//! `switchyard-loadtest`: submit many jobs to a running Switchyard server over
//! REST, follow them over WebSocket and report latency and throughput.

mod chat;
mod cli;
mod code;
mod quota;
mod stats;
mod submit;
mod ws;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::{mpsc, watch};

use crate::cli::{Args, JobKind};
use crate::stats::{new_histogram, LatencySummary, Report, Shared, Terminal};
use crate::submit::{Api, Pacer};

/// How often the progress bars and the completion check run.
const TICK: Duration = Duration::from_millis(200);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    if let Some(lang) = args.code.clone() {
        match code::run(&args, &lang).await {
            Ok(ok) => std::process::exit(if ok { 0 } else { 1 }),
            Err(e) => {
                eprintln!("switchyard-loadtest: error: {e:#}");
                std::process::exit(2);
            }
        }
    }
    if !args.quota_urls.is_empty() {
        match quota::run(&args).await {
            Ok(ok) => std::process::exit(if ok { 0 } else { 1 }),
            Err(e) => {
                eprintln!("switchyard-loadtest: error: {e:#}");
                std::process::exit(2);
            }
        }
    }
    if args.chat_completions {
        match chat::run(&args).await {
            Ok(ok) => std::process::exit(if ok { 0 } else { 1 }),
            Err(e) => {
                eprintln!("switchyard-loadtest: error: {e:#}");
                std::process::exit(2);
            }
        }
    }
    let report = match run(&args).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchyard-loadtest: error: {e:#}");
            std::process::exit(2);
        }
    };
    println!("{}", report.human());
    if args.json {
        println!("{}", report.json());
    }
    std::process::exit(if report.ok() { 0 } else { 1 });
}

/// Resolves once the stop flag is set (or its sender is gone). The `watch::Ref`
/// is dropped inside, so the future stays `Send`.
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn progress_bars(jobs: u64) -> (MultiProgress, ProgressBar, ProgressBar) {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr_with_hz(5)
    } else {
        ProgressDrawTarget::hidden()
    };
    let mp = MultiProgress::with_draw_target(target);
    let style = ProgressStyle::with_template(
        "{prefix:>9} [{bar:40.cyan/blue}] {pos:>7}/{len:7} {elapsed_precise}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    let submitted = mp.add(
        ProgressBar::new(jobs)
            .with_style(style.clone())
            .with_prefix("submitted"),
    );
    let finished = mp.add(
        ProgressBar::new(jobs)
            .with_style(style)
            .with_prefix("finished"),
    );
    (mp, submitted, finished)
}

async fn run(args: &Args) -> anyhow::Result<Report> {
    let base = cli::base_url(&args.url).to_string();
    let ws_url = cli::ws_url(&args.url)?;
    let concurrency = args.concurrency as usize;
    let ws_conns = args.ws_connections as usize;
    let api = Api::new(&base, &args.api_key, concurrency)?;
    let body = Bytes::from(serde_json::to_vec(&args.job_body())?);

    // Open every WebSocket up front so a bad URL/key fails fast.
    let mut first_conns = Vec::with_capacity(ws_conns);
    for i in 0..ws_conns {
        first_conns.push(
            ws::connect(&ws_url, &api)
                .await
                .with_context(|| format!("opening WebSocket #{i} to {ws_url}"))?,
        );
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    // Set on Ctrl-C: cuts short submitters waiting for a `--rate` slot.
    let (submit_stop_tx, submit_stop_rx) = watch::channel(false);
    let interrupted = Arc::new(AtomicBool::new(false));
    let (mp, pb_submitted, pb_finished) = progress_bars(args.jobs);

    let t0 = Instant::now();
    let shared = Arc::new(Shared::new(t0));

    // WebSocket connection tasks, each fed by a bounded channel.
    let chan_cap = (concurrency * 4).clamp(256, 8192);
    let mut senders = Vec::with_capacity(ws_conns);
    let mut ws_tasks = Vec::with_capacity(ws_conns);
    for (i, conn) in first_conns.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel(chan_cap);
        senders.push(tx);
        ws_tasks.push(tokio::spawn(ws::connection_task(
            i,
            ws_url.clone(),
            api.clone(),
            shared.clone(),
            conn,
            rx,
            stop_rx.clone(),
        )));
    }
    let senders: Arc<[mpsc::Sender<uuid::Uuid>]> = senders.into();

    // Ctrl-C: stop submitting and stop waiting, then report what we have.
    {
        let shared = shared.clone();
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.store(true, Ordering::SeqCst);
                shared.next.store(u64::MAX / 2, Ordering::SeqCst);
                let _ = submit_stop_tx.send(true);
            }
        });
    }

    // Submit phase.
    let pacer = args.rate.map(|r| Arc::new(Pacer::new(r)));
    let mut submitters = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        submitters.push(tokio::spawn(submit::submitter(
            api.clone(),
            shared.clone(),
            body.clone(),
            args.jobs,
            senders.clone(),
            pacer.clone(),
            submit_stop_rx.clone(),
        )));
    }
    drop(submit_stop_rx);
    drop(senders); // channels close once every submitter is done
    let mut all_submitters = futures::future::join_all(submitters);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let update_bars = |shared: &Shared| {
        pb_submitted.set_position(
            shared.submitted.load(Ordering::Relaxed) + shared.submit_errors.load(Ordering::Relaxed),
        );
        pb_finished.set_position(shared.finished.load(Ordering::Relaxed));
    };
    let results = loop {
        tokio::select! {
            r = &mut all_submitters => break r,
            _ = tick.tick() => update_bars(&shared),
        }
    };
    let mut submit_hist = new_histogram();
    for r in results {
        submit_hist
            .add(r.context("submitter task panicked")?)
            .context("merging histograms")?;
    }
    let submit_phase = t0.elapsed();
    let submitted = shared.submitted.load(Ordering::Relaxed);
    pb_submitted.set_length(submitted + shared.submit_errors.load(Ordering::Relaxed));
    pb_finished.set_length(submitted);
    update_bars(&shared);
    pb_submitted.finish();

    // Wait for terminal events (or the timeout) after the last submission.
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    while shared.finished.load(Ordering::Acquire) < submitted
        && Instant::now() < deadline
        && !interrupted.load(Ordering::Relaxed)
    {
        tick.tick().await;
        update_bars(&shared);
    }
    let _ = stop_tx.send(true);

    let mut event_hist = new_histogram();
    let mut live_hist = new_histogram();
    let mut replay_hist = new_histogram();
    let mut unresolved = Vec::new();
    for t in ws_tasks {
        let out = t.await.context("WebSocket task panicked")?;
        event_hist.add(&out.hist).context("merging histograms")?;
        live_hist
            .add(&out.live_hist)
            .context("merging histograms")?;
        replay_hist
            .add(&out.replay_hist)
            .context("merging histograms")?;
        unresolved.extend(out.pending);
    }
    unresolved.extend(std::mem::take(&mut *shared.polling.lock().unwrap()));

    // Final check over HTTP for jobs without a terminal WS event.
    if !unresolved.is_empty() {
        pb_finished.println(format!(
            "checking {} job(s) without a terminal event via GET /v1/jobs/{{id}}",
            unresolved.len()
        ));
    }
    let checks = futures::stream::iter(unresolved.into_iter().map(|id| {
        let api = api.clone();
        async move { (id, api.job_status(id).await) }
    }))
    .buffer_unordered(concurrency);
    tokio::pin!(checks);
    let mut lost = 0u64;
    let mut lost_samples = Vec::new();
    while let Some((id, res)) = checks.next().await {
        match res.as_deref().ok().and_then(Terminal::from_status) {
            Some(t) => shared.record_terminal(t, false, false),
            None => {
                lost += 1;
                if lost_samples.len() < stats::MAX_ERROR_SAMPLES {
                    lost_samples.push(match res {
                        Ok(status) => format!("{id}: status {status}"),
                        Err(e) => format!("{id}: {e:#}"),
                    });
                }
            }
        }
    }
    update_bars(&shared);
    pb_finished.finish();
    let _ = mp.clear();

    let e2e_phase = Duration::from_micros(shared.last_terminal_us.load(Ordering::Relaxed));
    let samples = shared.submit_error_samples.lock().unwrap().clone();
    Ok(Report {
        kind: match args.kind {
            JobKind::Noop => "system.noop",
            JobKind::Llm => "llm.chat",
        }
        .to_string(),
        model: (args.kind == JobKind::Llm).then(|| args.model.clone()),
        jobs_requested: args.jobs,
        concurrency: args.concurrency,
        ws_connections: args.ws_connections,
        rate: args.rate,
        submitted,
        submit_errors: shared.submit_errors.load(Ordering::Relaxed),
        submit_error_samples: samples,
        submit_latency: LatencySummary::from_histogram(&submit_hist),
        submit_phase,
        e2e_phase,
        succeeded: shared.succeeded.load(Ordering::Relaxed),
        failed: shared.failed.load(Ordering::Relaxed),
        cancelled: shared.cancelled.load(Ordering::Relaxed),
        event_latency: LatencySummary::from_histogram(&event_hist),
        live_event_latency: LatencySummary::from_histogram(&live_hist),
        replayed_event_latency: LatencySummary::from_histogram(&replay_hist),
        lost,
        lost_samples,
        finished_without_ws: shared.finished_without_ws.load(Ordering::Relaxed),
        ws_errors: shared.ws_errors.load(Ordering::Relaxed),
        ws_reconnects: shared.ws_reconnects.load(Ordering::Relaxed),
        resets: shared.resets.load(Ordering::Relaxed),
    })
}
