//! Command-line arguments for `switchyard-loadtest`.

use clap::{Parser, ValueEnum};

/// Which kind of job the load test submits.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum JobKind {
    /// `system.noop`: measures pure queue/dispatch overhead.
    Noop,
    /// `llm.chat` against `--model` (use `mock-echo` for a deterministic mock).
    Llm,
}

/// Load generator for a running Switchyard server: submits jobs over REST,
/// follows them over WebSocket and reports latencies and throughput.
#[derive(Parser, Debug, Clone)]
#[command(name = "switchyard-loadtest", version, about)]
pub struct Args {
    /// Base URL of the Switchyard API (http:// or https://).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// API key sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true)]
    pub api_key: String,

    /// Total number of jobs to submit.
    #[arg(long, default_value_t = 10_000)]
    pub jobs: u64,

    /// Number of concurrent submitter tasks (and HTTP pool size).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,

    /// Job kind to submit.
    #[arg(long, value_enum, default_value_t = JobKind::Noop)]
    pub kind: JobKind,

    /// Model for `--kind llm`.
    #[arg(long, default_value = "mock-echo")]
    pub model: String,

    /// Number of WebSocket connections used to follow jobs (round robin).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub ws_connections: u32,

    /// Words in the `--kind llm` prompt; the mock replies with as many tokens plus two, so
    /// `--prompt-words 198` asks for 200-token replies.
    #[arg(long, default_value_t = 3)]
    pub prompt_words: u32,

    /// `max_tokens` of `--kind llm` jobs.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,

    /// Instead of jobs: send OpenAI chat completions (`POST {url}/v1/chat/completions`, not
    /// streamed) open-loop at `--rate` for `--duration-s` and report their latency. Point
    /// `--url` at Switchyard, then at the mock provider, to measure the front door's overhead.
    #[arg(long)]
    pub chat_completions: bool,

    /// Instead of the queue load: run `code.exec` jobs in `LANGUAGE` (python, javascript),
    /// `--concurrency` closed loops of submit → WebSocket → end, and report submit → first
    /// output and submit → completed, and executions per second.
    #[arg(long, value_name = "LANGUAGE")]
    pub code: Option<String>,

    /// Instead of jobs: `--concurrency` closed loops of `GET /v1/jobs?limit=1` spread over these
    /// API replicas (comma-separated base URLs) for `--duration-s`, counting admitted (200) and
    /// refused (429) requests per second: shows a tenant's request quota holding across
    /// replicas.
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    pub quota_urls: Vec<String>,

    /// The tenant's configured requests per minute (for the report's margin).
    #[arg(long, default_value_t = 0)]
    pub quota_rpm: u64,

    /// Sandbox tier of `--code` jobs (wasm, gvisor); default: the worker's choice.
    #[arg(long)]
    pub sandbox: Option<String>,

    /// Length of a `--chat-completions` run.
    #[arg(long, default_value_t = 30)]
    pub duration_s: u64,

    /// Maximum submit rate in jobs per second, across all submitters
    /// (default: unlimited). Use it to measure below saturation.
    #[arg(long, value_name = "R", value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// Seconds to wait for outstanding terminal events after the last submission.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,

    /// Also print a one-line JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    /// The `POST /v1/jobs` body for the selected kind.
    pub fn job_body(&self) -> serde_json::Value {
        match self.kind {
            JobKind::Noop => serde_json::json!({ "kind": "system.noop", "input": {} }),
            JobKind::Llm => serde_json::json!({
                "kind": "llm.chat",
                "input": {
                    "model": self.model,
                    "messages": [{ "role": "user", "content": self.prompt() }],
                    "max_tokens": self.max_tokens
                }
            }),
        }
    }
}

impl Args {
    pub fn prompt(&self) -> String {
        const WORDS: [&str; 3] = ["hello", "load", "test"];
        (0..self.prompt_words.max(1) as usize)
            .map(|i| WORDS[i % WORDS.len()])
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Parse `--rate`: a positive, finite number of jobs per second whose period
/// (`1/R` seconds) fits in a `Duration`.
fn parse_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s.trim().parse().map_err(|e| format!("not a number: {e}"))?;
    if !r.is_finite() || r <= 0.0 {
        return Err("must be a positive number of jobs per second".to_string());
    }
    std::time::Duration::try_from_secs_f64(1.0 / r)
        .map_err(|_| "too small: the interval between jobs does not fit".to_string())?;
    Ok(r)
}

/// The base URL without trailing slashes.
pub fn base_url(url: &str) -> &str {
    url.trim_end_matches('/')
}

/// Derive the WebSocket endpoint (`ws[s]://host/.../v1/ws`) from the HTTP base URL.
pub fn ws_url(url: &str) -> anyhow::Result<String> {
    let base = base_url(url);
    let rest = if let Some(r) = base.strip_prefix("http://") {
        format!("ws://{r}")
    } else if let Some(r) = base.strip_prefix("https://") {
        format!("wss://{r}")
    } else if base.starts_with("ws://") || base.starts_with("wss://") {
        base.to_string()
    } else {
        anyhow::bail!("--url must start with http:// or https:// (got {url:?})");
    };
    Ok(format!("{rest}/v1/ws"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_url_from_http() {
        assert_eq!(
            ws_url("http://127.0.0.1:8080").unwrap(),
            "ws://127.0.0.1:8080/v1/ws"
        );
        assert_eq!(
            ws_url("https://h.example/api/").unwrap(),
            "wss://h.example/api/v1/ws"
        );
        assert!(ws_url("ftp://x").is_err());
    }

    #[test]
    fn parses_defaults() {
        let a = Args::try_parse_from(["switchyard-loadtest", "--api-key", "sy_x"]).unwrap();
        assert_eq!(a.jobs, 10_000);
        assert_eq!(a.concurrency, 100);
        assert_eq!(a.kind, JobKind::Noop);
        assert_eq!(a.ws_connections, 4);
        assert_eq!(a.timeout_s, 120);
        assert_eq!(a.rate, None);
        assert_eq!(a.job_body()["kind"], "system.noop");
    }

    #[test]
    fn parses_rate() {
        let a = Args::try_parse_from(["switchyard-loadtest", "--api-key", "k", "--rate", "250.5"])
            .unwrap();
        assert_eq!(a.rate, Some(250.5));
        for bad in ["0", "-3", "abc", "inf", "NaN", "1e-300"] {
            assert!(
                Args::try_parse_from(["switchyard-loadtest", "--api-key", "k", "--rate", bad])
                    .is_err(),
                "{bad}"
            );
        }
    }
}
