//! The model table: aliases → provider + upstream model + context window + prices, with an
//! ordered fallback list, and the providers they call. Resolution is pure (no I/O), so the API
//! (`GET /v1/models`, usage costs) and the worker (routing) read the same table.

use std::collections::BTreeMap;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// Wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// OpenAI Chat Completions.
    Openai,
    /// Anthropic Messages (native).
    Anthropic,
    /// Any OpenAI-compatible server (Ollama, vLLM, llama.cpp, OpenRouter, Azure-style URLs):
    /// the OpenAI format with its common variants tolerated.
    OpenaiCompatible,
}

/// The request field an OpenAI-format provider reads the reply budget from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenLimitField {
    /// What OpenAI-compatible servers (vLLM, Ollama, llama.cpp, ...) read.
    MaxTokens,
    /// OpenAI's current name: its reasoning models (o-series, GPT-5) refuse `max_tokens`.
    MaxCompletionTokens,
}

/// One provider endpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// Base URL up to (not including) `/chat/completions` or `/messages`, e.g.
    /// `https://api.openai.com/v1`. Azure-style URLs keep their query (`?api-version=`).
    pub base_url: String,
    /// The key, inline (prefer `api_key_env`).
    #[serde(default)]
    pub api_key: Option<SecretString>,
    /// Name of the environment variable holding the key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Extra request headers (e.g. OpenRouter's `HTTP-Referer`, Azure's `api-key`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// OpenAI formats only: the field of the reply budget; `max_completion_tokens` for
    /// `openai`, `max_tokens` for `openai_compatible` unless set (Azure OpenAI's reasoning
    /// models need `max_completion_tokens`).
    #[serde(default)]
    pub max_tokens_field: Option<TokenLimitField>,
    /// OpenAI formats only: ask for usage in streamed replies (`stream_options.include_usage`,
    /// default true). Off for servers that refuse the field (Azure OpenAI's api-versions
    /// before 2024-09-01-preview answer 400); their streamed usage is then estimated.
    #[serde(default = "yes")]
    pub stream_usage: bool,
}

impl ProviderConfig {
    /// The reply budget's request field (see [`ProviderConfig::max_tokens_field`]).
    pub fn token_limit_field(&self) -> TokenLimitField {
        self.max_tokens_field.unwrap_or(match self.kind {
            ProviderKind::Openai => TokenLimitField::MaxCompletionTokens,
            _ => TokenLimitField::MaxTokens,
        })
    }
}

/// One entry of the model table.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ModelConfig {
    /// Key into `llm.providers`.
    pub provider: String,
    /// The provider's model name; defaults to the alias.
    #[serde(default)]
    pub model: Option<String>,
    /// Tokens the model accepts (prompt + reply); 0 for a name outside the table (unknown:
    /// the prompt is sent as it is and the provider judges).
    #[serde(default = "default_context_window")]
    pub context_window: u32,
    /// Reply budget when the request names none (also the reserve when fitting context).
    #[serde(default = "default_max_output")]
    pub max_output_tokens: u32,
    /// USD per million prompt tokens.
    #[serde(default)]
    pub input_usd_per_mtok: f64,
    /// USD per million completion tokens.
    #[serde(default)]
    pub output_usd_per_mtok: f64,
    /// Aliases tried in order when this model times out, fails with 5xx or is overloaded.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Time to first token, per call (defaults to `llm.ttft_timeout_ms`); a model with
    /// `stream = false` has the call's whole limit for its reply instead.
    #[serde(default)]
    pub ttft_timeout_ms: Option<u64>,
    /// Whole call, per call (defaults to `llm.call_timeout_s`).
    #[serde(default)]
    pub call_timeout_s: Option<u64>,
    /// Stream from the provider (default); `false` for endpoints that cannot.
    #[serde(default = "yes")]
    pub stream: bool,
    /// Extra request headers for this model only.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Tokenizer used for counting (`o200k_base`, `cl100k_base`, or `estimate`); derived from
    /// the model name when absent.
    #[serde(default)]
    pub tokenizer: Option<String>,
}

fn default_context_window() -> u32 {
    8192
}
fn default_max_output() -> u32 {
    1024
}
fn yes() -> bool {
    true
}

impl ModelConfig {
    /// An entry with defaults for `provider`.
    pub fn on(provider: &str) -> ModelConfig {
        ModelConfig {
            provider: provider.to_string(),
            model: None,
            context_window: default_context_window(),
            max_output_tokens: default_max_output(),
            input_usd_per_mtok: 0.0,
            output_usd_per_mtok: 0.0,
            fallbacks: Vec::new(),
            ttft_timeout_ms: None,
            call_timeout_s: None,
            stream: true,
            headers: BTreeMap::new(),
            tokenizer: None,
        }
    }

    /// The entry of a name outside the table (`<provider>/<model>`, or a bare name for the
    /// default provider): unknown window, unpriced.
    pub fn unlisted(provider: &str) -> ModelConfig {
        ModelConfig {
            context_window: 0,
            ..ModelConfig::on(provider)
        }
    }

    /// Cost in USD of a call with these token counts.
    pub fn cost_usd(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (prompt_tokens as f64 * self.input_usd_per_mtok
            + completion_tokens as f64 * self.output_usd_per_mtok)
            / 1_000_000.0
    }
}

/// A model name resolved against the table: the entry and the provider it calls.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// The name the client used (or the fallback alias).
    pub alias: String,
    /// The provider's key in the table.
    pub provider: String,
    /// The model name sent to the provider.
    pub upstream: String,
    pub config: ModelConfig,
}

/// Providers and models, after built-in entries were added.
#[derive(Debug, Clone, Default)]
pub struct ModelTable {
    pub providers: BTreeMap<String, ProviderConfig>,
    pub models: BTreeMap<String, ModelConfig>,
    /// Provider for bare model names that are not in the table (`None`: such names are
    /// unknown).
    pub default_provider: Option<String>,
}

/// Why a model name cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("unknown model `{0}`")]
    Unknown(String),
    #[error("model `{alias}` names provider `{provider}`, which is not configured")]
    NoProvider { alias: String, provider: String },
}

/// Most fallbacks followed for one request (cycles are cut).
pub const MAX_CHAIN: usize = 8;

impl ModelTable {
    /// Resolves one name: a table alias, `<provider>/<model>` for a configured provider,
    /// `mock-*` when the mock provider is configured, or a bare name for the default provider.
    pub fn resolve(&self, name: &str) -> Result<ResolvedModel, ModelError> {
        let (provider, upstream, config) = if let Some(m) = self.models.get(name) {
            let up = m.model.clone().unwrap_or_else(|| name.to_string());
            (m.provider.clone(), up, m.clone())
        } else if let Some((p, m)) = name
            .split_once('/')
            .filter(|(p, m)| !m.is_empty() && self.providers.contains_key(*p))
        {
            (p.to_string(), m.to_string(), ModelConfig::unlisted(p))
        } else if name.starts_with("mock-") && self.providers.contains_key(MOCK_PROVIDER) {
            (
                MOCK_PROVIDER.into(),
                name.into(),
                ModelConfig::on(MOCK_PROVIDER),
            )
        } else if let Some(p) = &self.default_provider {
            (p.clone(), name.to_string(), ModelConfig::unlisted(p))
        } else {
            return Err(ModelError::Unknown(name.to_string()));
        };
        if !self.providers.contains_key(&provider) {
            return Err(ModelError::NoProvider {
                alias: name.to_string(),
                provider,
            });
        }
        Ok(ResolvedModel {
            alias: name.to_string(),
            provider,
            upstream,
            config,
        })
    }

    /// The model and its fallbacks, in order, each once (unusable fallbacks are skipped; the
    /// first name must resolve).
    pub fn chain(&self, name: &str) -> Result<Vec<ResolvedModel>, ModelError> {
        let first = self.resolve(name)?;
        let mut out = vec![first];
        let mut i = 0;
        while i < out.len() && out.len() < MAX_CHAIN {
            let next: Vec<String> = out[i].config.fallbacks.clone();
            for f in next {
                if out.len() >= MAX_CHAIN {
                    break;
                }
                if out.iter().any(|r| r.alias == f) {
                    continue;
                }
                match self.resolve(&f) {
                    Ok(r) => out.push(r),
                    Err(e) => {
                        tracing::warn!(model = name, fallback = %f, error = %e, "skipping unusable fallback")
                    }
                }
            }
            i += 1;
        }
        Ok(out)
    }

    /// Aliases listed by `GET /v1/models` (table entries whose provider is configured).
    pub fn listed(&self) -> Vec<(&str, &ModelConfig)> {
        self.models
            .iter()
            .filter(|(_, m)| self.providers.contains_key(&m.provider))
            .map(|(a, m)| (a.as_str(), m))
            .collect()
    }
}

/// The built-in provider serving `mock-*` names (OpenAI format), when `llm.mock_base_url` is set.
pub const MOCK_PROVIDER: &str = "mock";
/// The built-in provider reaching the mock in Anthropic's format.
pub const MOCK_ANTHROPIC_PROVIDER: &str = "mock-anthropic";

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(kind: ProviderKind) -> ProviderConfig {
        ProviderConfig {
            kind,
            base_url: "http://x/v1".into(),
            api_key: None,
            api_key_env: None,
            headers: BTreeMap::new(),
            max_tokens_field: None,
            stream_usage: true,
        }
    }

    #[test]
    fn the_reply_budget_field_follows_the_kind_unless_set() {
        use TokenLimitField::*;
        assert_eq!(
            provider(ProviderKind::Openai).token_limit_field(),
            MaxCompletionTokens
        );
        assert_eq!(
            provider(ProviderKind::OpenaiCompatible).token_limit_field(),
            MaxTokens
        );
        let azure: ProviderConfig = serde_json::from_value(serde_json::json!({
            "kind": "openai_compatible", "base_url": "https://x",
            "max_tokens_field": "max_completion_tokens"}))
        .unwrap();
        assert_eq!(azure.token_limit_field(), MaxCompletionTokens);
        assert!(serde_json::from_value::<ProviderConfig>(serde_json::json!({
            "kind": "openai", "base_url": "https://x", "max_tokens_field": "tokens"}))
        .is_err());
    }

    fn table() -> ModelTable {
        let mut t = ModelTable::default();
        t.providers
            .insert("mock".into(), provider(ProviderKind::OpenaiCompatible));
        t.providers
            .insert("claude".into(), provider(ProviderKind::Anthropic));
        let mut a = ModelConfig::on("mock");
        a.model = Some("mock-error-500".into());
        a.fallbacks = vec!["b".into(), "missing".into(), "a".into()];
        t.models.insert("a".into(), a);
        let mut b = ModelConfig::on("claude");
        b.fallbacks = vec!["a".into(), "c".into()];
        t.models.insert("b".into(), b);
        t.models.insert("c".into(), ModelConfig::on("nowhere"));
        t
    }

    #[test]
    fn resolution_rules() {
        let t = table();
        let a = t.resolve("a").unwrap();
        assert_eq!(
            (a.provider.as_str(), a.upstream.as_str()),
            ("mock", "mock-error-500")
        );
        let p = t.resolve("claude/some-model").unwrap();
        assert_eq!(
            (p.provider.as_str(), p.upstream.as_str()),
            ("claude", "some-model")
        );
        assert_eq!(t.resolve("mock-echo").unwrap().provider, "mock");
        assert!(matches!(t.resolve("gpt-x"), Err(ModelError::Unknown(n)) if n == "gpt-x"));
        assert!(matches!(t.resolve("c"), Err(ModelError::NoProvider { .. })));
        let mut d = t.clone();
        d.default_provider = Some("claude".into());
        assert_eq!(d.resolve("gpt-x").unwrap().provider, "claude");
    }

    #[test]
    fn chains_follow_fallbacks_once_and_skip_unusable() {
        let names: Vec<String> = table()
            .chain("a")
            .unwrap()
            .into_iter()
            .map(|r| r.alias)
            .collect();
        assert_eq!(names, ["a", "b"]);
        let names: Vec<String> = table()
            .chain("b")
            .unwrap()
            .into_iter()
            .map(|r| r.alias)
            .collect();
        assert_eq!(names, ["b", "a"]);
    }

    #[test]
    fn cost() {
        let mut m = ModelConfig::on("p");
        m.input_usd_per_mtok = 2.5;
        m.output_usd_per_mtok = 10.0;
        let c = m.cost_usd(1_000, 500);
        assert!((c - 0.0075).abs() < 1e-12, "{c}");
    }
}
