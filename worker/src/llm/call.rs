//! One `llm.chat` completion inside one job attempt: resolve the model chain from the table,
//! call each provider with time limits, retry transient failures with exponential backoff and
//! jitter (honouring `retry-after`), fall back to the next model, and announce a restart
//! (a `status` event) whenever output already streamed would otherwise be spliced.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use secrecy::SecretString;
use serde_json::json;
use switchyard_core::config::LlmConfig;
use switchyard_core::event::types;
use switchyard_core::job::{ChatMessage, LlmChatInput};
use switchyard_core::models::{ModelTable, ProviderKind, ResolvedModel};

use super::context::Tokenizer;
use super::conversation::fit_prompt;
use super::window::{stated_window, LearnedWindows};
use super::{
    Anthropic, ChatOutput, Failure, LlmProvider, OpenAi, ProviderError, ProviderRequest, Sink,
};
use crate::executor::ExecError;

/// Time limits and retry policy of provider calls.
#[derive(Debug, Clone)]
pub struct CallPolicy {
    /// Retries of one model inside one attempt.
    pub max_retries: u32,
    pub retry_base: Duration,
    /// Cap of one backoff; a `retry-after` longer than this is not waited for inside the
    /// attempt (the next model is tried, or the job retries later honouring it).
    pub retry_max: Duration,
    pub ttft: Duration,
    pub call_timeout: Duration,
    pub idle: Duration,
}

impl CallPolicy {
    pub fn from_config(cfg: &LlmConfig) -> CallPolicy {
        CallPolicy {
            max_retries: cfg.max_retries,
            retry_base: Duration::from_millis(cfg.retry_base_ms),
            retry_max: Duration::from_millis(cfg.retry_max_ms),
            ttft: Duration::from_millis(cfg.ttft_timeout_ms),
            call_timeout: Duration::from_secs(cfg.call_timeout_s),
            idle: Duration::from_secs(cfg.request_timeout_s),
        }
    }

    /// Backoff before retry number `n` (0-based): `base · 2ⁿ` capped, times a jitter in
    /// [0.5, 1]; a provider's `retry-after` wins when it is longer.
    pub fn delay(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .retry_base
            .saturating_mul(1u32 << n.min(16))
            .min(self.retry_max);
        let jittered = exp.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
        retry_after.map_or(jittered, |ra| ra.max(jittered))
    }
}

/// See [`Providers::history_bytes`].
const HISTORY_BYTES_PER_TOKEN: u64 = 16;
/// The window a conversation's history is read for when its model's is unknown (tokens):
/// larger than any listed model's, so fitting by the provider still decides.
const UNKNOWN_WINDOW_READ: u64 = 262_144;

/// The providers of the model table, by name, and the policy for calling them.
#[derive(Clone)]
pub struct Providers {
    table: ModelTable,
    by_name: HashMap<String, Arc<dyn LlmProvider>>,
    policy: CallPolicy,
    /// Model that summarizes conversations (`summarize` strategy); default: the turn's model.
    summary_model: Option<String>,
    /// Windows of models outside the table, as their providers stated them.
    learned: LearnedWindows,
}

/// A completion and how it was obtained.
#[derive(Debug, Clone)]
pub struct Completion {
    pub output: ChatOutput,
    /// The model that answered (after fallbacks).
    pub model: ResolvedModel,
    /// Provider calls made, retries and fallbacks included.
    pub calls: u32,
}

impl Providers {
    /// Adapters for every configured provider (keys from `api_key` or `api_key_env`).
    pub fn from_config(cfg: &LlmConfig) -> Providers {
        let table = cfg.table();
        let connect = Duration::from_secs(cfg.request_timeout_s.clamp(1, 30));
        let mut by_name: HashMap<String, Arc<dyn LlmProvider>> = HashMap::new();
        for (name, p) in &table.providers {
            let key = p.api_key.clone().or_else(|| {
                let var = p.api_key_env.as_deref()?;
                std::env::var(var).ok().map(SecretString::from)
            });
            if key.is_none() && !name.starts_with("mock") {
                match &p.api_key_env {
                    Some(var) => tracing::warn!(provider = %name, env = %var,
                        "the provider's API key variable is not set; its calls will fail with provider_auth unless it needs none"),
                    None => {
                        tracing::info!(provider = %name, "provider configured without an API key")
                    }
                }
            }
            let adapter: Arc<dyn LlmProvider> = match p.kind {
                ProviderKind::Openai | ProviderKind::OpenaiCompatible => Arc::new(
                    OpenAi::new(&p.base_url, key, p.headers.clone(), connect)
                        .budget_field(p.token_limit_field())
                        .stream_usage(p.stream_usage),
                ),
                ProviderKind::Anthropic => {
                    Arc::new(Anthropic::new(&p.base_url, key, p.headers.clone(), connect))
                }
            };
            by_name.insert(name.clone(), adapter);
        }
        Providers {
            table,
            by_name,
            policy: CallPolicy::from_config(cfg),
            summary_model: cfg.summary_model.clone(),
            learned: LearnedWindows::default(),
        }
    }

    pub fn table(&self) -> &ModelTable {
        &self.table
    }

    pub fn policy(&self) -> &CallPolicy {
        &self.policy
    }

    pub fn summary_model(&self) -> Option<&str> {
        self.summary_model.as_deref()
    }

    /// What `model` resolves to, for the response cache's key: provider, upstream model,
    /// window and default reply budget of the chain's first model (only its replies are
    /// cached).
    pub fn route_of(&self, model: &str) -> Option<String> {
        let chain = self.table.chain(model).ok()?;
        let m = chain.first()?;
        Some(format!(
            "{}/{}/{}/{}",
            m.provider, m.upstream, m.config.context_window, m.config.max_output_tokens
        ))
    }

    /// Bytes of a conversation's history worth reading for `model`: more than the largest
    /// window of its chain can hold (16 bytes per token; a token is rarely more than 4), so
    /// that fitting, not reading, decides what is dropped. A model outside the table (its
    /// window unknown) counts as [`UNKNOWN_WINDOW_READ`] tokens: a conversation on one was
    /// read whole on every turn. `None` only when the model does not resolve.
    pub fn history_bytes(&self, model: &str) -> Option<u64> {
        let chain = self.table.chain(model).ok()?;
        let widest = chain
            .iter()
            .map(|m| match m.config.context_window {
                0 => UNKNOWN_WINDOW_READ,
                w => u64::from(w),
            })
            .max()?;
        Some(widest.saturating_mul(HISTORY_BYTES_PER_TOKEN))
    }

    /// Runs `input` with the prompt `head` (kept whole) + `history` (oldest dropped first)
    /// through the model chain, fitting the prompt into each model's window minus the reply
    /// budget.
    pub async fn complete(
        &self,
        input: &LlmChatInput,
        head: &[ChatMessage],
        history: &[ChatMessage],
        sink: &Sink<'_>,
    ) -> Result<Completion, ExecError> {
        let chain = self
            .table
            .chain(&input.model)
            .map_err(|e| ExecError::fatal("unknown_model", e.to_string()))?;
        let mut calls = 0u32;
        let mut tried: Vec<String> = Vec::new();
        // the failure that sent the chain on to the next model: what the job reports if no
        // later model gets called (e.g. the prompt fits none of them), not the later model's
        // own refusal (a rate limit is retried later; a prompt too long for a fallback is not)
        let mut passed_on: Option<ProviderError> = None;
        'chain: for (ci, m) in chain.iter().enumerate() {
            let Some(provider) = self.by_name.get(&m.provider) else {
                continue;
            };
            tried.push(m.alias.clone());
            // a model outside the table has no window until its provider states one
            let mut known = match m.config.context_window {
                0 => self.learned.get(&m.provider, &m.upstream),
                w => Some(w),
            };
            'fit: loop {
                let max_tokens = reply_budget(m, known, input.max_tokens);
                let fitted = fit_to(m, known, max_tokens, input, head, history).await;
                let (messages, prompt_tokens) = match fitted {
                    Ok(fitted) => fitted,
                    Err(e) if ci + 1 < chain.len() => {
                        tracing::info!(model = %m.alias, error = %e, "prompt does not fit; trying the next model");
                        continue 'chain;
                    }
                    Err(e) => {
                        return Err(match passed_on {
                            Some(p) => job_error(p, &tried, calls),
                            None => e,
                        })
                    }
                };
                let messages = &messages[..];
                let limit = m
                    .config
                    .call_timeout_s
                    .map_or(self.policy.call_timeout, Duration::from_secs);
                let req = ProviderRequest {
                    model: &m.upstream,
                    messages,
                    max_tokens,
                    max_tokens_explicit: input.max_tokens.is_some(),
                    temperature: input.temperature,
                    sampling: input.sampling(),
                    tools: input.tools.as_deref().unwrap_or_default(),
                    tool_choice: input.tool_choice.as_ref(),
                    parallel_tool_calls: input.parallel_tool_calls,
                    stream: m.config.stream,
                    headers: &m.config.headers,
                    // a reply that is not streamed is its own first token: it has the call's
                    // whole limit (a first-token limit of 30 s cut every longer generation)
                    ttft_timeout: if m.config.stream {
                        m.config
                            .ttft_timeout_ms
                            .map_or(self.policy.ttft, Duration::from_millis)
                    } else {
                        limit
                    },
                    idle_timeout: self.policy.idle,
                };
                let mut retry = 0u32;
                loop {
                    calls += 1;
                    sink.begin_call(prompt_tokens);
                    let result = tokio::time::timeout(limit, provider.chat(&req, sink))
                        .await
                        .unwrap_or_else(|_| {
                            Err(ProviderError::new(
                                Failure::Timeout,
                                format!("the call took longer than {limit:?}"),
                            ))
                        });
                    sink.end_call(result.as_ref().ok().map(|o| &o.usage));
                    let e = match result {
                        Ok(output) => {
                            return Ok(Completion {
                                output,
                                model: m.clone(),
                                calls,
                            })
                        }
                        Err(e) => e,
                    };
                    if let Some(w) = self.learn_window(m, &e, known) {
                        // refused before any token (a 4xx): fit to the stated window, call again
                        tracing::info!(model = %m.alias, window = w, "the provider stated the model's window; fitting the prompt to it");
                        sink.discard_recorded();
                        known = Some(w);
                        continue 'fit;
                    }
                    let wait = self.policy.delay(retry, e.retry_after);
                    let again = e.failure.transient()
                        && retry < self.policy.max_retries
                        && wait <= self.policy.retry_max;
                    let next = chain[ci + 1..]
                        .iter()
                        .find(|n| self.by_name.contains_key(&n.provider))
                        .filter(|_| e.failure.falls_back());
                    tracing::info!(
                        model = %m.alias, provider = %m.provider, call = calls, error = %e,
                        retry = again, fallback = next.map(|n| n.alias.as_str()),
                        "provider call failed"
                    );
                    if !again && next.is_none() {
                        return Err(job_error(e, &tried, calls));
                    }
                    if sink.streamed() {
                        // the client saw part of a reply that will not be continued: say so
                        let model = if again {
                            &m.alias
                        } else {
                            &next.unwrap_or(m).alias
                        };
                        announce_restart(sink, &e, model, calls + 1).await;
                    }
                    // a silent sink records too (the cache): never splice the next reply onto this
                    sink.discard_recorded();
                    if !again {
                        passed_on = Some(e);
                        break 'fit;
                    }
                    tokio::time::sleep(wait).await;
                    retry += 1;
                }
            }
        }
        Err(match passed_on {
            Some(p) => job_error(p, &tried, calls),
            None => ExecError::fatal(
                "no_provider",
                format!("no provider is configured for model `{}`", input.model),
            ),
        })
    }
}

impl Providers {
    /// The window a refusal of an unlisted model states, when it is news (none known, or
    /// smaller than the one the prompt was fitted to): learned for later calls too.
    fn learn_window(
        &self,
        m: &ResolvedModel,
        e: &ProviderError,
        known: Option<u32>,
    ) -> Option<u32> {
        if e.failure != Failure::ContextLength || m.config.context_window != 0 {
            return None;
        }
        let w = stated_window(&e.message).filter(|w| known.is_none_or(|k| *w < k))?;
        self.learned.learn(&m.provider, &m.upstream, w);
        Some(w)
    }
}

/// The reply budget of a call to `m` whose window is `known`: the request's, else the table's
/// default; a learned window keeps at most a quarter for a reply nobody sized (the table's
/// default could take all of a small one). Never more than the window leaves.
fn reply_budget(m: &ResolvedModel, known: Option<u32>, asked: Option<u32>) -> u32 {
    let default = match (m.config.context_window, known) {
        (0, Some(w)) => m.config.max_output_tokens.min(w / 4),
        _ => m.config.max_output_tokens,
    };
    let window = known.unwrap_or(u32::MAX);
    asked
        .unwrap_or(default)
        .min(window.saturating_sub(16).max(1))
}

/// `head` + `history` fitted into `m`'s window `known` minus `max_tokens` (oldest history
/// dropped first), with its token count; sent whole when the window is unknown (the provider
/// judges).
async fn fit_to(
    m: &ResolvedModel,
    known: Option<u32>,
    max_tokens: u32,
    input: &LlmChatInput,
    head: &[ChatMessage],
    history: &[ChatMessage],
) -> Result<(Vec<ChatMessage>, u64), ExecError> {
    let Some(window) = known else {
        let all = [head, history].concat();
        let tokens = super::estimate_prompt(&all);
        return Ok((all, tokens));
    };
    let tok = Tokenizer::for_model(m.config.tokenizer.as_deref(), &m.upstream);
    let budget = u64::from(window.saturating_sub(max_tokens));
    let extra = tok.request_extra(input);
    fit_prompt(tok, head.to_vec(), history.to_vec(), budget, extra).await
}

async fn announce_restart(sink: &Sink<'_>, e: &ProviderError, model: &str, call: u32) {
    let ctx = sink.ctx();
    sink.reset();
    ctx.event(
        types::STATUS,
        json!({
            "status": "running",
            "attempt": ctx.attempt,
            "restart": {
                "reason": e.failure.code(),
                "message": e.message,
                "model": model,
                "call": call,
                "discard_output": true,
            },
        }),
    )
    .await;
}

fn job_error(e: ProviderError, tried: &[String], calls: u32) -> ExecError {
    let message = format!(
        "{} (after {calls} call{} to {})",
        e.message,
        if calls == 1 { "" } else { "s" },
        tried.join(", ")
    );
    let mut out = if e.failure.transient() {
        ExecError::retryable(e.failure.code(), message)
    } else {
        ExecError::fatal(e.failure.code(), message)
    };
    out.retry_after = e.retry_after;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_history_is_read_within_a_bound_even_when_a_window_is_unknown() {
        let mut cfg =
            switchyard_core::config::Config::for_tests("postgres://x/y", "redis://x", "t").llm;
        cfg.mock_base_url = Some("http://127.0.0.1:9".into());
        let p = Providers::from_config(&cfg);
        // listed: the default window of 8,192 tokens
        assert_eq!(p.history_bytes("mock-echo"), Some(8_192 * 16));
        // `<provider>/<model>` is outside the table: its window is unknown
        assert_eq!(
            p.history_bytes("mock/anything"),
            Some(UNKNOWN_WINDOW_READ * 16)
        );
        assert_eq!(p.history_bytes("no-such-model"), None);
    }

    #[test]
    fn backoff_grows_caps_and_honours_retry_after() {
        let p = CallPolicy {
            max_retries: 3,
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_millis(1000),
            ttft: Duration::from_secs(1),
            call_timeout: Duration::from_secs(1),
            idle: Duration::from_secs(1),
        };
        for _ in 0..50 {
            let d0 = p.delay(0, None);
            assert!(d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100));
            let d3 = p.delay(3, None);
            assert!(d3 >= Duration::from_millis(400) && d3 <= Duration::from_millis(800));
            assert!(p.delay(10, None) <= Duration::from_millis(1000));
            assert_eq!(
                p.delay(0, Some(Duration::from_secs(2))),
                Duration::from_secs(2)
            );
        }
    }
}
