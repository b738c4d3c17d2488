//! The `llm.chat` executor: parses the input, reads a conversation's history when the job
//! answers one, runs the prompt through the model chain and shapes the job output (text, tool
//! calls, usage, the model that answered, cost); a conversation gets the reply appended.

use async_trait::async_trait;
use serde_json::{json, Value};
use switchyard_core::job::{parse_at, LlmChatInput};
use switchyard_store::Store;

use super::{conversation, Providers, Sink};
use crate::executor::{ExecError, Executor, JobContext};

pub struct LlmChatExecutor {
    pub providers: Providers,
    /// Needed for conversation turns.
    pub store: Option<Store>,
}

impl LlmChatExecutor {
    pub fn new(providers: Providers, store: Option<Store>) -> Self {
        LlmChatExecutor { providers, store }
    }
}

#[async_trait]
impl Executor for LlmChatExecutor {
    async fn execute(&self, ctx: &JobContext) -> Result<Value, ExecError> {
        let input: LlmChatInput = parse_at("input", &ctx.input)
            .map_err(|e| ExecError::fatal("invalid_input", e.to_string()))?;
        let (head, history) = match (input.conversation, &self.store) {
            (None, _) => {
                // the system prompt is kept whole; the rest is history, oldest dropped first
                let split = input
                    .messages
                    .iter()
                    .take_while(|m| m.role == "system")
                    .count();
                let (h, rest) = input.messages.split_at(split);
                (h.to_vec(), rest.to_vec())
            }
            (Some(conv), Some(store)) => conversation::history(store, ctx, conv).await?,
            (Some(_), None) => {
                return Err(ExecError::fatal(
                    "no_store",
                    "this worker cannot answer conversation turns (no database)",
                ))
            }
        };
        let sink = Sink::new(ctx);
        let done = self
            .providers
            .complete(&input, &head, &history, &sink)
            .await?;
        let out = &done.output;
        if let (Some(conv), Some(store)) = (input.conversation, &self.store) {
            conversation::append(store, ctx, conv, &input, out, &done.model.alias).await?;
        }
        let cost = done
            .model
            .config
            .cost_usd(out.usage.prompt_tokens, out.usage.completion_tokens);
        let mut v = json!({
            "text": out.text,
            "finish_reason": out.finish_reason,
            "usage": out.usage,
            "model": done.model.alias,
            "requested_model": input.model,
            "provider": done.model.provider,
            "cost_usd": cost,
            "provider_calls": done.calls,
        });
        if !out.tool_calls.is_empty() {
            v["tool_calls"] = serde_json::to_value(&out.tool_calls)
                .map_err(|e| ExecError::fatal("internal", e.to_string()))?;
        }
        Ok(v)
    }
}
