//! The `llm.chat` executor: parses the input, reads a conversation's history when the job
//! answers one, serves it from the response cache or runs the prompt through the model chain,
//! and shapes the job output (text, tool calls, usage, the model that answered, cost); a
//! conversation gets the reply appended.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use switchyard_core::job::{parse_at, ChatMessage, LlmChatInput};
use switchyard_store::Store;

use super::cache::{self, Entry, Lookup, ResponseCache};
use super::{conversation, summarize, ChatOutput, Providers, Sink};
use crate::executor::{ExecError, Executor, JobContext};

/// Longest wait for an identical request's call (single flight) before calling ourselves.
/// The wait normally ends sooner: the leader holds its lock only while its call runs (it
/// extends it; one that died lets it lapse within the lock's TTL, and a waiter leads then).
/// The global call timeout was the bound before, shorter than a model's own `call_timeout_s`
/// can be: identical requests to a slow model each called it.
const SHARED_WAIT_MAX: Duration = Duration::from_secs(30 * 60);

pub struct LlmChatExecutor {
    pub providers: Providers,
    /// Needed for conversation turns.
    pub store: Option<Store>,
    /// The response cache (requests opt in).
    pub cache: Option<ResponseCache>,
}

/// A reply and where it came from.
struct Answer {
    output: ChatOutput,
    model: String,
    provider: String,
    cost_usd: f64,
    calls: u32,
    cached: bool,
}

impl LlmChatExecutor {
    pub fn new(providers: Providers, store: Option<Store>, cache: Option<ResponseCache>) -> Self {
        LlmChatExecutor {
            providers,
            store,
            cache,
        }
    }

    async fn call(
        &self,
        input: &LlmChatInput,
        head: &[ChatMessage],
        history: &[ChatMessage],
        sink: &Sink<'_>,
    ) -> Result<Answer, ExecError> {
        let done = self.providers.complete(input, head, history, sink).await?;
        let u = &done.output.usage;
        Ok(Answer {
            cost_usd: done
                .model
                .config
                .cost_usd(u.prompt_tokens, u.completion_tokens),
            model: done.model.alias,
            provider: done.model.provider,
            calls: done.calls,
            cached: false,
            output: done.output,
        })
    }

    /// Through the cache: a hit replays the stored reply; a miss calls (holding the
    /// single-flight lock, extended while the call runs) and stores the reply.
    async fn cached_call(
        &self,
        cache: &ResponseCache,
        ctx: &JobContext,
        input: &LlmChatInput,
        head: &[ChatMessage],
        history: &[ChatMessage],
        sink: &Sink<'_>,
    ) -> Result<Answer, ExecError> {
        let route = self.providers.route_of(&input.model);
        let fp = cache::fingerprint(input, head, history, route.as_deref());
        match cache
            .lookup(ctx.tenant_id, &fp, ctx.job_id, SHARED_WAIT_MAX)
            .await
        {
            Lookup::Hit { entry, shared } => {
                tracing::debug!(shared, "response cache hit");
                for c in &entry.chunks {
                    sink.text(c.clone()).await;
                }
                for (i, c) in entry.tool_calls.iter().enumerate() {
                    sink.tool_call(i, c).await;
                }
                Ok(Answer {
                    output: entry.output(),
                    model: entry.model,
                    provider: entry.provider,
                    cost_usd: 0.0,
                    calls: 0,
                    cached: true,
                })
            }
            Lookup::Bypass => self.call(input, head, history, sink).await,
            Lookup::Lead => {
                let mut lead = LeadGuard {
                    cache: cache.clone(),
                    tenant: ctx.tenant_id,
                    fp: fp.clone(),
                    job: ctx.job_id,
                    armed: true,
                };
                let call = self.call(input, head, history, sink);
                // the lock is extended beside the call, never instead of polling it (a slow
                // Redis held up the reply's stream, and could run out its token timers)
                let extend = async {
                    let mut tick = tokio::time::interval(cache::LOCK_EXTEND);
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        cache.extend(ctx.tenant_id, &fp, ctx.job_id).await;
                    }
                };
                let result = tokio::select! {
                    r = call => r,
                    never = extend => never,
                };
                match &result {
                    // a fallback's reply is not stored under the requested model's key: the
                    // requested model would otherwise keep answering with it for the TTL
                    Ok(a) if a.model != input.model => {
                        cache.unserved(ctx.tenant_id, &fp, ctx.job_id).await
                    }
                    Ok(a) => {
                        let entry = Entry {
                            text: a.output.text.clone(),
                            finish_reason: a.output.finish_reason.clone(),
                            tool_calls: a.output.tool_calls.clone(),
                            prompt_tokens: a.output.usage.prompt_tokens,
                            completion_tokens: a.output.usage.completion_tokens,
                            model: a.model.clone(),
                            provider: a.provider.clone(),
                            chunks: sink.recorded(),
                            refusal: a.output.refusal.clone(),
                        };
                        cache.put(ctx.tenant_id, &fp, ctx.job_id, &entry).await;
                    }
                    Err(_) => cache.unserved(ctx.tenant_id, &fp, ctx.job_id).await,
                }
                lead.armed = false;
                result
            }
        }
    }
}

#[async_trait]
impl Executor for LlmChatExecutor {
    async fn execute(&self, ctx: &JobContext) -> Result<Value, ExecError> {
        let input: LlmChatInput = parse_at("input", &ctx.input)
            .map_err(|e| ExecError::fatal("invalid_input", e.to_string()))?;
        let (head, history, summary) = match (input.conversation, &self.store) {
            (None, _) => {
                // the system prompt is kept whole; the rest is history, oldest dropped first
                let split = input
                    .messages
                    .iter()
                    .take_while(|m| m.role == "system")
                    .count();
                let (h, rest) = input.messages.split_at(split);
                (h.to_vec(), rest.to_vec(), None)
            }
            (Some(conv), Some(store)) => {
                let budget = self.providers.history_bytes(&input.model);
                let h = conversation::history(store, ctx, conv, budget).await?;
                if h.conversation.context_strategy == "summarize" {
                    let model = self.providers.summary_model();
                    let p =
                        summarize::prompt(&self.providers, model, store, ctx, &input, h).await?;
                    (p.head, p.history, p.summary)
                } else {
                    (h.head.clone(), h.messages(), None)
                }
            }
            (Some(_), None) => {
                return Err(ExecError::fatal(
                    "no_store",
                    "this worker cannot answer conversation turns (no database)",
                ))
            }
        };
        let silent = input.stream == Some(false);
        let answer = match (&self.cache, input.cache.unwrap_or(false)) {
            (Some(cache), true) => {
                let sink = Sink::recording(ctx).silenced(silent);
                self.cached_call(cache, ctx, &input, &head, &history, &sink)
                    .await?
            }
            _ => {
                let sink = Sink::new(ctx).silenced(silent);
                self.call(&input, &head, &history, &sink).await?
            }
        };
        let out = &answer.output;
        if let (Some(conv), Some(store)) = (input.conversation, &self.store) {
            conversation::append(store, ctx, conv, &input, out, &answer.model).await?;
        }
        let mut v = json!({
            "text": out.text,
            "finish_reason": out.finish_reason,
            "usage": out.usage,
            "model": answer.model,
            "requested_model": input.model,
            "provider": answer.provider,
            // what the job cost: the reply and a summary written for it
            "cost_usd": answer.cost_usd + summary.as_ref().map_or(0.0, |s| s.cost_usd),
            "provider_calls": answer.calls,
            "cached": answer.cached,
        });
        if let Some(s) = &summary {
            v["summary"] = serde_json::to_value(s).map_err(ExecError::internal)?;
        }
        if let Some(r) = &out.refusal {
            v["refusal"] = r.as_str().into();
        }
        if !out.tool_calls.is_empty() {
            v["tool_calls"] = serde_json::to_value(&out.tool_calls).map_err(ExecError::internal)?;
        }
        Ok(v)
    }
}

/// The lock of a leading call, marked unserved if the call is dropped before it stored or
/// marked anything (a cancel, the job's time limit, a front-door client gone): the requests
/// waiting for it call the provider at once instead of waiting out the lock's lifetime.
struct LeadGuard {
    cache: ResponseCache,
    tenant: uuid::Uuid,
    fp: String,
    job: uuid::Uuid,
    armed: bool,
}

impl Drop for LeadGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (cache, tenant, job) = (self.cache.clone(), self.tenant, self.job);
        let fp = std::mem::take(&mut self.fp);
        // one Redis call, bounded: nothing for a shutdown to wait for (the lock would expire
        // by itself; this only spares the waiters its lifetime)
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mark = cache.unserved(tenant, &fp, job);
                let _ = tokio::time::timeout(Duration::from_secs(2), mark).await;
            });
        }
    }
}
