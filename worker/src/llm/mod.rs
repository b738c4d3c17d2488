//! `llm.chat`: the provider seam (`LlmProvider`), routing by model name, and the executor.

mod openai;

pub use openai::OpenAiCompatible;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;
use switchyard_core::job::{parse_at, LlmChatInput};

use crate::executor::{ExecError, Executor, JobContext};

/// Token counts reported by a provider.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// The output of `llm.chat`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatOutput {
    pub text: String,
    pub finish_reason: String,
    pub usage: Usage,
}

/// An LLM provider. Implementations stream text through `ctx.delta` and keep their wire format
/// private.
#[async_trait]
pub trait LlmProvider: Send + Sync {
    async fn chat(&self, input: &LlmChatInput, ctx: &JobContext) -> Result<ChatOutput, ExecError>;
}

/// Picks a provider by model name: `mock-*` → the mock provider, anything else → the
/// OpenAI-compatible provider (when configured).
#[derive(Clone, Default)]
pub struct ProviderRouter {
    pub mock: Option<Arc<dyn LlmProvider>>,
    pub default: Option<Arc<dyn LlmProvider>>,
}

impl ProviderRouter {
    pub fn route(&self, model: &str) -> Option<Arc<dyn LlmProvider>> {
        if model.starts_with("mock-") {
            self.mock.clone()
        } else {
            self.default.clone()
        }
    }
}

pub struct LlmChatExecutor {
    pub router: ProviderRouter,
}

#[async_trait]
impl Executor for LlmChatExecutor {
    async fn execute(&self, ctx: &JobContext) -> Result<Value, ExecError> {
        let input: LlmChatInput = parse_at("input", &ctx.input)
            .map_err(|e| ExecError::fatal("invalid_input", e.to_string()))?;
        let provider = self.router.route(&input.model).ok_or_else(|| {
            ExecError::fatal(
                "no_provider",
                format!("no provider is configured for model `{}`", input.model),
            )
        })?;
        let out = provider.chat(&input, ctx).await?;
        serde_json::to_value(out).map_err(|e| ExecError::fatal("internal", e.to_string()))
    }
}
