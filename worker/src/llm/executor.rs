//! The `llm.chat` executor: parses the input, runs it through the model chain and shapes the
//! job output (text, tool calls, usage, the model that answered, cost).

use async_trait::async_trait;
use serde_json::{json, Value};
use switchyard_core::job::{parse_at, LlmChatInput};

use super::{Providers, Sink};
use crate::executor::{ExecError, Executor, JobContext};

pub struct LlmChatExecutor {
    pub providers: Providers,
}

impl LlmChatExecutor {
    pub fn new(providers: Providers) -> Self {
        LlmChatExecutor { providers }
    }
}

#[async_trait]
impl Executor for LlmChatExecutor {
    async fn execute(&self, ctx: &JobContext) -> Result<Value, ExecError> {
        let input: LlmChatInput = parse_at("input", &ctx.input)
            .map_err(|e| ExecError::fatal("invalid_input", e.to_string()))?;
        let sink = Sink::new(ctx);
        let done = self
            .providers
            .complete(&input, &input.messages, &sink)
            .await?;
        let out = &done.output;
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
