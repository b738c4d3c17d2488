//! Token counting per model (tiktoken encodings for OpenAI models, a documented estimate
//! elsewhere) and fitting a conversation into the model's window minus the reply budget.

use switchyard_core::job::ChatMessage;
use tiktoken_rs::CoreBPE;

/// How tokens are counted for one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokenizer {
    O200k,
    Cl100k,
    /// [`super::estimate_tokens`]: 3 ASCII characters a token, rounded up, one per other
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
            None => super::estimate_tokens(text),
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
    pub fn tools(self, tools: Option<&[switchyard_core::job::ToolSpec]>) -> u64 {
        match tools {
            Some(t) if !t.is_empty() => self.count(&serde_json::to_string(t).unwrap_or_default()),
            _ => 0,
        }
    }

    /// What a request sends besides its messages: tool schemas and a `response_format` (its
    /// JSON schema is prompt too; on Anthropic it becomes a tool).
    pub fn request_extra(self, input: &switchyard_core::chat::LlmChatInput) -> u64 {
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

/// A prompt that fits.
#[derive(Debug, Clone, PartialEq)]
pub struct Fitted {
    pub messages: Vec<ChatMessage>,
    /// History messages left out (oldest first).
    pub dropped: Vec<ChatMessage>,
    pub tokens: u64,
}

/// Fits `history` (oldest first; the last message is the turn being answered) after the fixed
/// `head` (system prompt, summary) and `extra` tokens (tool schemas) into `budget` tokens by
/// dropping the oldest history messages. The head and the last message are always kept; once
/// something is dropped, the kept history starts at a user message. `None` when even that does
/// not fit (or only an orphaned tool result would be left).
pub fn fit(
    tok: Tokenizer,
    head: Vec<ChatMessage>,
    history: Vec<ChatMessage>,
    budget: u64,
    extra: u64,
) -> Option<Fitted> {
    let head_tokens = 3 + extra + head.iter().map(|m| tok.message(m)).sum::<u64>();
    let sizes: Vec<u64> = history.iter().map(|m| tok.message(m)).collect();
    let mut total = head_tokens + sizes.iter().sum::<u64>();
    let last = history.len().saturating_sub(1);
    let mut start = 0;
    while start < last && total > budget {
        total -= sizes[start];
        start += 1;
    }
    if start > 0 {
        // never start with the reply or tool result of a turn whose question was dropped
        while start < last && history[start].role != "user" {
            total -= sizes[start];
            start += 1;
        }
        if history[start].role == "tool" {
            return None;
        }
    }
    if total > budget {
        return None;
    }
    let mut history = history;
    let kept = history.split_off(start);
    let mut messages = head;
    messages.extend(kept);
    Some(Fitted {
        messages,
        dropped: history,
        tokens: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_format_s_schema_is_part_of_the_request() {
        let tok = Tokenizer::Estimate;
        let mut input = switchyard_core::chat::LlmChatInput::default();
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

    fn m(role: &str, words: usize) -> ChatMessage {
        ChatMessage::new(role, "word ".repeat(words))
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

    #[test]
    fn drops_oldest_keeps_head_and_last_and_starts_with_user() {
        let tok = Tokenizer::Estimate;
        let head = vec![ChatMessage::new("system", "be brief")];
        let history: Vec<ChatMessage> = (0..40)
            .map(|i| m(if i % 2 == 0 { "user" } else { "assistant" }, 20))
            .collect();
        let all = tok.prompt(&[head.clone(), history.clone()].concat());
        let f = fit(tok, head.clone(), history.clone(), all, 0).unwrap();
        assert!(f.dropped.is_empty() && f.tokens == all);
        // a reply at the start stays while everything fits
        let greeting = vec![m("assistant", 3), m("user", 3)];
        let f = fit(tok, head.clone(), greeting.clone(), 10_000, 0).unwrap();
        assert_eq!(f.messages.len(), 3);
        // tool schemas count: one token more and the oldest turn goes
        let f = fit(tok, head.clone(), history.clone(), all, 1).unwrap();
        assert!(!f.dropped.is_empty());

        let budget = all / 3;
        let f = fit(tok, head.clone(), history.clone(), budget, 0).unwrap();
        assert!(f.tokens <= budget);
        assert_eq!(f.tokens, tok.prompt(&f.messages));
        assert_eq!(f.messages[0].role, "system");
        assert_eq!(f.messages[1].role, "user");
        assert_eq!(f.messages.last(), history.last());
        assert_eq!(f.dropped.len() + f.messages.len() - 1, history.len());

        // only the head and the last turn fit
        let minimal = tok.prompt(&[head.clone(), vec![history[39].clone()]].concat());
        let f = fit(tok, head.clone(), history.clone(), minimal, 0).unwrap();
        assert_eq!(f.messages.len(), 2);
        assert!(fit(tok, head.clone(), history, minimal - 1, 0).is_none());
        // an orphaned tool result is not a prompt
        let mut call = m("assistant", 1);
        call.tool_calls = Some(vec![]);
        let mut result = m("tool", 1);
        result.tool_call_id = Some("c1".into());
        let with_tool = vec![m("user", 50), call, result];
        let tight = tok.prompt(&[head.clone(), vec![with_tool[2].clone()]].concat());
        assert!(fit(tok, head, with_tool, tight, 0).is_none());
    }
}
