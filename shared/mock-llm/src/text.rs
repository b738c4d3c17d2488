//! Deterministic completion text, tokenization and usage accounting for the mock.
//!
//! The reply is `"Mock reply:"` followed by each whitespace-separated word of the
//! last `user` message, each preceded by one space. Tokens are the words of that
//! text, every token after the first carrying its leading space, so concatenating
//! the emitted tokens yields the text exactly.

/// The planned completion for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Completion {
    /// Tokens to emit, already truncated to `max_tokens`.
    pub tokens: Vec<String>,
    /// `"stop"`, or `"length"` when the reply was truncated by `max_tokens`.
    pub finish_reason: &'static str,
    /// Whitespace-separated words across all message contents.
    pub prompt_tokens: u32,
}

impl Completion {
    /// Plans the completion for `messages` (`(role, content)` pairs).
    pub fn plan(messages: &[(String, String)], max_tokens: Option<u32>) -> Self {
        let last_user = messages
            .iter()
            .rev()
            .find(|(role, _)| role == "user")
            .map(|(_, content)| content.as_str())
            .unwrap_or("");

        let mut tokens = vec!["Mock".to_owned(), " reply:".to_owned()];
        tokens.extend(last_user.split_whitespace().map(|w| format!(" {w}")));

        let mut finish_reason = "stop";
        if let Some(max) = max_tokens {
            let max = usize::try_from(max).unwrap_or(usize::MAX);
            if tokens.len() > max {
                tokens.truncate(max);
                finish_reason = "length";
            }
        }

        let prompt_words: usize = messages
            .iter()
            .map(|(_, content)| content.split_whitespace().count())
            .sum();

        Self {
            tokens,
            finish_reason,
            prompt_tokens: saturating_u32(prompt_words),
        }
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
    fn no_user_message() {
        assert_eq!(expected_text(&[], None), "Mock reply:");
        let m = msgs(&[("system", "hi there")]);
        assert_eq!(expected_text(&m, None), "Mock reply:");
    }
}
