//! Deterministic completion text, tokenization and usage accounting for the mock.
//!
//! The reply is `"Mock reply:"` followed by each whitespace-separated word of the
//! last `user` message, each preceded by one space. Tokens are the words of that
//! text, every token after the first carrying its leading space, so concatenating
//! the emitted tokens yields the text exactly. A tool call's arguments are
//! `{"text":"<last user message>"}`, streamed in fragments.

use serde_json::{json, Value};

/// The planned completion for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Completion {
    /// Tokens to emit, already truncated to `max_tokens`.
    pub tokens: Vec<String>,
    /// `"stop"`, or `"length"` when the reply was truncated by `max_tokens`.
    pub finish_reason: &'static str,
    /// The stop sequence that ended the reply (Anthropic's `stop_sequence`).
    pub stop_sequence: Option<String>,
    /// Whitespace-separated words across all message contents.
    pub prompt_tokens: u32,
}

impl Completion {
    /// Plans the completion for `messages` (`(role, content)` pairs).
    pub fn plan(messages: &[(String, String)], max_tokens: Option<u32>) -> Self {
        let mut tokens = vec!["Mock".to_owned(), " reply:".to_owned()];
        tokens.extend(
            last_user(messages)
                .split_whitespace()
                .map(|w| format!(" {w}")),
        );

        let mut finish_reason = "stop";
        if let Some(max) = max_tokens {
            let max = usize::try_from(max).unwrap_or(usize::MAX);
            if tokens.len() > max {
                tokens.truncate(max);
                finish_reason = "length";
            }
        }

        Self {
            tokens,
            finish_reason,
            stop_sequence: None,
            prompt_tokens: prompt_tokens(messages),
        }
    }

    /// Ends the reply before the first of `stops` it contains, as providers do (the sequence
    /// itself is not part of the reply; the finish reason becomes `stop`).
    pub fn stop_at(mut self, stops: &[String]) -> Self {
        let text = self.text();
        let Some((at, seq)) = stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()).map(|i| (i, s)))
            .min_by_key(|(i, _)| *i)
        else {
            return self;
        };
        let mut kept = Vec::new();
        let mut len = 0;
        for t in self.tokens {
            if len + t.len() <= at {
                len += t.len();
                kept.push(t);
            } else {
                let part = &t[..at - len];
                if !part.is_empty() {
                    kept.push(part.to_owned());
                }
                break;
            }
        }
        self.tokens = kept;
        self.finish_reason = "stop";
        self.stop_sequence = Some(seq.clone());
        self
    }

    /// The full text of the (possibly truncated) reply.
    pub fn text(&self) -> String {
        self.tokens.concat()
    }

    /// Number of tokens emitted.
    pub fn completion_tokens(&self) -> u32 {
        saturating_u32(self.tokens.len())
    }
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Prompt tokens: whitespace-separated words across all message contents.
pub(crate) fn prompt_tokens(messages: &[(String, String)]) -> u32 {
    saturating_u32(
        messages
            .iter()
            .map(|(_, content)| content.split_whitespace().count())
            .sum(),
    )
}

/// The content of the last `user` message, as sent (empty when there is none).
fn last_user(messages: &[(String, String)]) -> &str {
    messages
        .iter()
        .rev()
        .find(|(role, _)| role == "user")
        .map(|(_, content)| content.as_str())
        .unwrap_or("")
}

/// A planned call to one tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ToolCall {
    /// `call_mock_N` or `toolu_mock_N`.
    pub id: String,
    pub name: String,
    /// `{"text": <last user message>}`.
    pub input: Value,
    /// `input` serialized (compact, as `serde_json` writes it).
    pub arguments: String,
    /// `arguments` split into at least two pieces, streamed one per event.
    pub fragments: Vec<String>,
    pub prompt_tokens: u32,
}

impl ToolCall {
    pub fn plan(id: String, name: &str, messages: &[(String, String)]) -> Self {
        let input = json!({ "text": last_user(messages) });
        let arguments = input.to_string();
        let fragments = split_fragments(&arguments);
        Self {
            id,
            name: name.to_owned(),
            input,
            arguments,
            fragments,
            prompt_tokens: prompt_tokens(messages),
        }
    }
}

/// Splits `s` into pieces of at most 8 characters, and into at least two pieces
/// whenever it has two characters or more.
fn split_fragments(s: &str) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    let size = if chars.len() >= 16 {
        8
    } else {
        chars.len().div_ceil(2).max(1)
    };
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

/// What one request gets: text, or a tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Text(Completion),
    Tool(ToolCall),
}

impl Reply {
    /// A call to `tool` (`(id, name)`) when given, otherwise the text reply.
    pub fn plan(
        messages: &[(String, String)],
        max_tokens: Option<u32>,
        tool: Option<(String, &str)>,
    ) -> Self {
        match tool {
            Some((id, name)) => Self::Tool(ToolCall::plan(id, name, messages)),
            None => Self::Text(Completion::plan(messages, max_tokens)),
        }
    }

    /// [`Completion::stop_at`] for a text reply.
    pub fn stop_at(self, stops: &[String]) -> Self {
        match self {
            Self::Text(c) => Self::Text(c.stop_at(stops)),
            tool => tool,
        }
    }

    pub fn prompt_tokens(&self) -> u32 {
        match self {
            Self::Text(c) => c.prompt_tokens,
            Self::Tool(t) => t.prompt_tokens,
        }
    }

    /// Emitted tokens; a tool call counts one per argument fragment.
    pub fn completion_tokens(&self) -> u32 {
        match self {
            Self::Text(c) => c.completion_tokens(),
            Self::Tool(t) => saturating_u32(t.fragments.len()),
        }
    }
}

/// The exact completion text the mock produces for these messages and `max_tokens`.
///
/// `messages` are `(role, content)` pairs. Only the last message whose role is
/// `"user"` contributes words; with no user message (or an empty one) the text
/// is just `"Mock reply:"`. `max_tokens` limits the number of tokens, where
/// `"Mock"` and `" reply:"` are the first two tokens and every further word is
/// one token.
pub fn expected_text(messages: &[(String, String)], max_tokens: Option<u32>) -> String {
    Completion::plan(messages, max_tokens).text()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(r, c)| ((*r).to_owned(), (*c).to_owned()))
            .collect()
    }

    #[test]
    fn uses_last_user_message_words() {
        let m = msgs(&[
            ("system", "be brief"),
            ("user", "first question"),
            ("assistant", "answer"),
            ("user", "  hello\n  big\tworld "),
        ]);
        let c = Completion::plan(&m, None);
        assert_eq!(c.text(), "Mock reply: hello big world");
        assert_eq!(
            c.tokens,
            vec!["Mock", " reply:", " hello", " big", " world"]
        );
        assert_eq!(c.finish_reason, "stop");
        assert_eq!(c.prompt_tokens, 2 + 2 + 1 + 3);
        assert_eq!(c.completion_tokens(), 5);
    }

    #[test]
    fn truncates_to_max_tokens() {
        let m = msgs(&[("user", "one two three")]);
        assert_eq!(expected_text(&m, Some(3)), "Mock reply: one");
        assert_eq!(Completion::plan(&m, Some(3)).finish_reason, "length");
        assert_eq!(Completion::plan(&m, Some(5)).finish_reason, "stop");
        assert_eq!(Completion::plan(&m, Some(50)).finish_reason, "stop");
        let zero = Completion::plan(&m, Some(0));
        assert_eq!(zero.text(), "");
        assert_eq!(zero.finish_reason, "length");
    }

    #[test]
    fn tool_call_arguments_and_fragments() {
        let m = msgs(&[("user", "first"), ("user", "say \"hi\"\n  now")]);
        let t = ToolCall::plan("call_mock_1".to_owned(), "echo", &m);
        assert_eq!(t.arguments, r#"{"text":"say \"hi\"\n  now"}"#);
        assert_eq!(t.input, json!({ "text": "say \"hi\"\n  now" }));
        assert!(t.fragments.len() >= 2);
        assert_eq!(t.fragments.concat(), t.arguments);
        assert_eq!(split_fragments("ab"), ["a", "b"]);
        assert_eq!(split_fragments("abcde"), ["abc", "de"]);
        assert_eq!(split_fragments("é"), ["é"]);
        let r = Reply::plan(&m, None, Some(("x".to_owned(), "echo")));
        assert!(r.completion_tokens() >= 2);
        assert_eq!(r.prompt_tokens(), 4);
    }

    #[test]
    fn a_stop_sequence_ends_the_reply_before_it() {
        let m = msgs(&[("user", "one two three four")]);
        let c = Completion::plan(&m, None).stop_at(&["ee f".to_owned(), " tw".to_owned()]);
        assert_eq!(c.text(), "Mock reply: one");
        assert_eq!(
            (c.finish_reason, c.stop_sequence.as_deref()),
            ("stop", Some(" tw"))
        );
        // inside a token: the token is cut
        let c = Completion::plan(&m, None).stop_at(&["hree".to_owned()]);
        assert_eq!(c.tokens.concat(), "Mock reply: one two t");
        // not in the reply (or beyond max_tokens): unchanged
        let c = Completion::plan(&m, Some(3)).stop_at(&["four".to_owned()]);
        assert_eq!(
            (c.text().as_str(), c.finish_reason),
            ("Mock reply: one", "length")
        );
    }

    #[test]
    fn no_user_message() {
        assert_eq!(expected_text(&[], None), "Mock reply:");
        let m = msgs(&[("system", "hi there")]);
        assert_eq!(expected_text(&m, None), "Mock reply:");
    }
}
