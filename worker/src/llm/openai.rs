//! OpenAI-compatible Chat Completions client (streaming SSE parsed into token deltas).
//! The wire format stays private to this module.

use std::time::Duration;

use async_trait::async_trait;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use switchyard_core::job::LlmChatInput;

use super::{ChatOutput, LlmProvider, Usage};
use crate::executor::{ExecError, JobContext};

pub struct OpenAiCompatible {
    client: reqwest::Client,
    /// e.g. `https://api.openai.com/v1`
    base_url: String,
    api_key: Option<SecretString>,
    /// Longest silence tolerated between two stream chunks.
    idle_timeout: Duration,
}

impl OpenAiCompatible {
    pub fn new(base_url: &str, api_key: Option<SecretString>, idle_timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(256)
            .build()
            .expect("reqwest client");
        OpenAiCompatible {
            client,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key,
            idle_timeout,
        }
    }
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    stream: bool,
    stream_options: StreamOptions,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: u64,
}

fn status_error(
    status: reqwest::StatusCode,
    retry_after: Option<Duration>,
    body: &str,
) -> ExecError {
    let snippet: String = body.chars().take(300).collect();
    let msg = format!("provider answered {status}: {snippet}");
    let mut e = match status.as_u16() {
        429 => ExecError::retryable("provider_rate_limited", msg),
        408 | 409 | 500..=599 => ExecError::retryable("provider_error", msg),
        401 | 403 => ExecError::fatal("provider_auth", msg),
        _ => ExecError::fatal("provider_bad_request", msg),
    };
    e.retry_after = retry_after;
    e
}

#[async_trait]
impl LlmProvider for OpenAiCompatible {
    async fn chat(&self, input: &LlmChatInput, ctx: &JobContext) -> Result<ChatOutput, ExecError> {
        let body = WireRequest {
            model: &input.model,
            messages: input
                .messages
                .iter()
                .map(|m| WireMessage {
                    role: &m.role,
                    content: &m.content,
                })
                .collect(),
            max_tokens: input.max_tokens,
            temperature: input.temperature,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
        };
        let mut req = self
            .client
            .post(format!("{}/chat/completions", self.base_url))
            .json(&body);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k.expose_secret());
        }
        let resp = tokio::time::timeout(self.idle_timeout, req.send())
            .await
            .map_err(|_| ExecError::retryable("provider_timeout", "no response from provider"))?
            .map_err(|e| {
                ExecError::retryable(
                    "provider_unavailable",
                    format!("provider request failed: {e}"),
                )
            })?;
        let status = resp.status();
        if !status.is_success() {
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let text = resp.text().await.unwrap_or_default();
            return Err(status_error(status, retry_after, &text));
        }
        let mut stream = resp.bytes_stream().eventsource();
        let mut text = String::new();
        let mut finish: Option<String> = None;
        let mut usage = None;
        let mut done = false;
        loop {
            let next = tokio::time::timeout(self.idle_timeout, stream.next())
                .await
                .map_err(|_| ExecError::retryable("provider_timeout", "provider stream stalled"))?;
            let Some(item) = next else { break };
            let ev = item.map_err(|e| {
                ExecError::retryable("provider_error", format!("provider stream broke: {e}"))
            })?;
            if ev.data.trim() == "[DONE]" {
                done = true;
                break;
            }
            let chunk: Chunk = serde_json::from_str(&ev.data).map_err(|e| {
                ExecError::retryable("provider_error", format!("unparseable stream chunk: {e}"))
            })?;
            if let Some(u) = chunk.usage {
                usage = Some(Usage {
                    prompt_tokens: u.prompt_tokens,
                    completion_tokens: u.completion_tokens,
                    total_tokens: u.total_tokens,
                });
            }
            for c in chunk.choices {
                if let Some(d) = c.delta.and_then(|d| d.content) {
                    if !d.is_empty() {
                        text.push_str(&d);
                        ctx.delta(d).await;
                    }
                }
                if c.finish_reason.is_some() {
                    finish = c.finish_reason;
                }
            }
        }
        if !done && finish.is_none() {
            return Err(ExecError::retryable(
                "provider_error",
                "provider stream ended before completion",
            ));
        }
        Ok(ChatOutput {
            text,
            finish_reason: finish.unwrap_or_else(|| "stop".into()),
            usage: usage.unwrap_or_default(),
        })
    }
}
