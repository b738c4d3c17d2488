//! Fitting a conversation into the model's window minus the reply budget (tokens counted by
//! `switchyard_core::tokens`).

use switchyard_core::job::ChatMessage;
pub use switchyard_core::tokens::{Tokenizer, TOOL_PROMPT};

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

    fn m(role: &str, words: usize) -> ChatMessage {
        ChatMessage::new(role, "word ".repeat(words))
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
