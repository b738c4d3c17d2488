//! Token counting per model: tiktoken encodings for OpenAI models, a documented estimate
//! elsewhere. The worker fits prompts with it; the API refuses at once what can never fit.

use crate::job::ChatMessage;
use crate::models::ResolvedModel;
use tiktoken_rs::CoreBPE;

/// How tokens are counted for one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokenizer {
    O200k,
    Cl100k,
    /// [`estimate_tokens`]: 3 ASCII characters a token, rounded up, one per other
    /// character. Deliberately generous for English prose (Claude's tokenizer averages about
    /// 3.5 characters a token there, OpenAI's 4 to 4.5) and for CJK text (about one a
    /// character); and when a request carries tools, [`TOOL_PROMPT`] more.
    Estimate,
}

impl Tokenizer {
    /// From the table's `tokenizer`, else from the provider's model name.
    pub fn for_model(configured: Option<&str>, upstream: &str) -> Tokenizer {
        match configured {
            Some("o200k_base") => return Tokenizer::O200k,
            Some("cl100k_base") => return Tokenizer::Cl100k,
            Some(_) => return Tokenizer::Estimate,
            None => {}
        }
        let m = upstream.rsplit('/').next().unwrap_or(upstream);
        if [
            "gpt-4o",
            "gpt-4.1",
            "gpt-4.5",
            "gpt-5",
            "o1",
            "o3",
            "o4",
            "chatgpt-4o",
        ]
        .iter()
        .any(|p| m.starts_with(p))
        {
            Tokenizer::O200k
        } else if m.starts_with("gpt-4") || m.starts_with("gpt-3.5") {
            Tokenizer::Cl100k
        } else {
            Tokenizer::Estimate
        }
    }

    fn bpe(self) -> Option<&'static CoreBPE> {
        match self {
            Tokenizer::O200k => Some(tiktoken_rs::o200k_base_singleton()),
            Tokenizer::Cl100k => Some(tiktoken_rs::cl100k_base_singleton()),
            Tokenizer::Estimate => None,
        }
    }

    pub fn count(self, text: &str) -> u64 {
        match self.bpe() {
            // what looks like a special token (`<|endoftext|>`) is plain text to the API
            Some(b) => b.encode_ordinary(text).len() as u64,
            None => estimate_tokens(text),
        }
    }

    /// One message: its text, its tool calls, and OpenAI's 4 tokens of framing.
    pub fn message(self, m: &ChatMessage) -> u64 {
        let calls: u64 = m
            .tool_calls
            .iter()
            .flatten()
            .map(|c| self.count(&c.function.name) + self.count(&c.function.arguments) + 4)
            .sum();
        MESSAGE_OVERHEAD + self.count(&m.content) + calls
    }

    /// A whole prompt, with the 3 tokens that prime the reply.
    pub fn prompt(self, messages: &[ChatMessage]) -> u64 {
        3 + messages.iter().map(|m| self.message(m)).sum::<u64>()
    }
}

const MESSAGE_OVERHEAD: u64 = 4;

/// Tokens allowed for a provider's own tool-use system prompt (see [`Tokenizer::Estimate`]).
pub const TOOL_PROMPT: u64 = 500;

impl Tokenizer {
    /// Tokens the tool definitions of a request take (counted as their JSON text).
    pub fn tools(self, tools: Option<&[crate::job::ToolSpec]>) -> u64 {
        match tools {
            Some(t) if !t.is_empty() => self.count(&serde_json::to_string(t).unwrap_or_default()),
            _ => 0,
        }
    }

    /// What a request sends besides its messages: tool schemas and a `response_format` (its
    /// JSON schema is prompt too; on Anthropic it becomes a tool).
    pub fn request_extra(self, input: &crate::chat::LlmChatInput) -> u64 {
        let format = input
            .response_format
            .as_ref()
            .filter(|f| f["type"] != "text")
            .map_or(0, |f| self.count(&f.to_string()));
        let tools = self.tools(input.tools.as_deref());
        // providers without a tokenizer here may wrap tools in a system prompt of their own
        // (Anthropic's tool-use prompt is a few hundred tokens; a JSON reply is a tool there)
        let wrapper = if self == Tokenizer::Estimate && tools + format > 0 {
            TOOL_PROMPT
        } else {
            0
        };
        tools + format + wrapper
    }
}

/// A documented estimate for models without a tokenizer here: 3 ASCII characters per token,
/// rounded up, and a token for every other character (CJK, accents, emoji: tokenizers spend
/// at least about one on each, so the estimate does not undercount them), plus 4 tokens of
/// framing per message. Three, not four: it must not undercount the densest tokenizer it
/// stands for (Anthropic puts Claude's at about 3.5 characters a token; OpenAI's run 4 to 4.5),
/// since a fitted prompt may never exceed the window.
pub fn estimate_tokens(text: &str) -> u64 {
    let ascii = text.bytes().filter(u8::is_ascii).count() as u64;
    let other = text.chars().filter(|c| !c.is_ascii()).count() as u64;
    ascii.div_ceil(ASCII_PER_TOKEN) + other
}

/// ASCII characters per token of [`estimate_tokens`].
pub const ASCII_PER_TOKEN: u64 = 3;

/// Whether a prompt that must keep `texts` whole (one message each: a conversation's system
/// prompt, the message being answered) fits the window of some model of `chain` with that
/// model's reply budget, counted as the worker counts when it fits the prompt (which never drops
/// them). `Err` with the largest window of the chain when none can take them; `Ok` too when a
/// model's window is unknown (its provider judges). Cheap unless the texts are near a window:
/// a token is at least a byte, so only texts that could overflow are tokenized (CPU work, for a
/// blocking thread when large).
pub fn fits_some(
    chain: &[ResolvedModel],
    texts: &[&str],
    max_tokens: Option<u32>,
) -> Result<(), u32> {
    let mut widest = 0;
    for m in chain {
        let window = m.config.context_window;
        if window == 0 {
            return Ok(());
        }
        widest = widest.max(window);
        let reply = max_tokens
            .unwrap_or(m.config.max_output_tokens)
            .min(window.saturating_sub(16).max(1));
        let budget = u64::from(window - reply);
        let at_most: u64 = 3 + texts
            .iter()
            .map(|t| MESSAGE_OVERHEAD + t.len() as u64)
            .sum::<u64>();
        if at_most <= budget {
            return Ok(());
        }
        let tok = Tokenizer::for_model(m.config.tokenizer.as_deref(), &m.upstream);
        let tokens: u64 = 3 + texts
            .iter()
            .map(|t| MESSAGE_OVERHEAD + tok.count(t))
            .sum::<u64>();
        if tokens <= budget {
            return Ok(());
        }
    }
    Err(widest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_format_s_schema_is_part_of_the_request() {
        let tok = Tokenizer::Estimate;
        let mut input = crate::chat::LlmChatInput::default();
        assert_eq!(tok.request_extra(&input), 0);
        input.response_format = Some(serde_json::json!({"type": "text"}));
        assert_eq!(tok.request_extra(&input), 0, "plain text adds nothing");
        let schema = serde_json::json!({"type": "json_schema", "json_schema": {"name": "r",
            "schema": {"type": "object", "properties": {"answer": {"type": "string"}}}}});
        input.response_format = Some(schema.clone());
        // on a model counted by estimate, the provider's own tool prompt too
        assert_eq!(
            tok.request_extra(&input),
            tok.count(&schema.to_string()) + TOOL_PROMPT
        );
        assert_eq!(
            Tokenizer::O200k.request_extra(&input),
            Tokenizer::O200k.count(&schema.to_string())
        );
    }

    #[test]
    fn special_token_text_is_counted_as_text() {
        // what the API does with it: ordinary text, several tokens
        let t = "<|endoftext|>";
        assert_eq!(
            Tokenizer::Cl100k.count(t),
            tiktoken_rs::cl100k_base_singleton()
                .encode_ordinary(t)
                .len() as u64
        );
        assert!(Tokenizer::Cl100k.count(t) > 1);
        assert!(Tokenizer::O200k.count(&t.repeat(100)) > 100);
    }

    #[test]
    fn the_estimate_is_not_below_a_dense_tokenizer() {
        // English prose at Claude's ~3.5 characters a token must not be undercounted
        let prose = "The quick brown fox jumps over the lazy dog while the committee \
            reviews its quarterly budget and the engineers refactor the scheduler. ";
        let n = prose.repeat(50);
        assert!(Tokenizer::Estimate.count(&n) as f64 >= n.len() as f64 / 3.5);
    }

    #[test]
    fn tokenizers_by_model() {
        assert_eq!(Tokenizer::for_model(None, "gpt-4o-mini"), Tokenizer::O200k);
        assert_eq!(
            Tokenizer::for_model(None, "openai/gpt-4-turbo"),
            Tokenizer::Cl100k
        );
        assert_eq!(
            Tokenizer::for_model(None, "claude-3-5-haiku"),
            Tokenizer::Estimate
        );
        assert_eq!(
            Tokenizer::for_model(Some("cl100k_base"), "x"),
            Tokenizer::Cl100k
        );
        assert_eq!(Tokenizer::O200k.count("hello world"), 2);
        assert_eq!(Tokenizer::Estimate.count("hello world"), 4);
        // one per non-ASCII character: CJK text is never undercounted 4×
        assert_eq!(Tokenizer::Estimate.count("日本語のテキスト"), 8);
        assert_eq!(Tokenizer::Estimate.count("naïve café"), 3 + 2);
    }

    fn model(window: u32, reply: u32, upstream: &str) -> ResolvedModel {
        let mut config = crate::models::ModelConfig::on("p");
        config.context_window = window;
        config.max_output_tokens = reply;
        ResolvedModel {
            alias: upstream.into(),
            provider: "p".into(),
            upstream: upstream.into(),
            config,
        }
    }

    #[test]
    fn a_prompt_fits_when_some_model_of_the_chain_takes_it() {
        // 3 + (4 + 300 estimated) tokens
        let long = "abc".repeat(300);
        let small = model(400, 100, "claude-x");
        assert_eq!(
            fits_some(std::slice::from_ref(&small), &[&long], None),
            Err(400)
        );
        assert_eq!(
            fits_some(std::slice::from_ref(&small), &[&long], Some(50)),
            Ok(()),
            "a smaller reply"
        );
        let wide = model(1000, 100, "claude-y");
        assert_eq!(
            fits_some(&[small.clone(), wide], &[&long], None),
            Ok(()),
            "a fallback"
        );
        // two texts: both count (3 + 5 + 294 fits 300, 3 + 5 + 300 does not)
        let part = "abc".repeat(290);
        assert_eq!(
            fits_some(std::slice::from_ref(&small), &[&part], None),
            Ok(())
        );
        assert_eq!(
            fits_some(
                std::slice::from_ref(&small),
                &["hi", &"abc".repeat(296)],
                None
            ),
            Err(400)
        );
        // a window the table does not know: the provider judges
        assert_eq!(
            fits_some(&[small, model(0, 100, "z")], &[&long.repeat(100)], None),
            Ok(())
        );
        // counted with the model's tokenizer: 900 bytes of one repeated word are few tokens
        let gpt = model(400, 100, "gpt-4o");
        assert_eq!(fits_some(&[gpt], &[&"hello ".repeat(150)], None), Ok(()));
    }
}
