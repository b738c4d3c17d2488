//! The `summarize` context strategy: when a conversation no longer fits the model's window, the
//! oldest turns are summarized by a (configurable) model and the summary is kept on the
//! conversation, so later turns reuse it and only summarize what newly falls out of the window.

use serde::Serialize;
use switchyard_core::job::{ChatMessage, LlmChatInput};
use switchyard_store::Store;

use super::context::{fit, Tokenizer};
use super::conversation::History;
use super::{Providers, Sink, Usage};
use crate::executor::{ExecError, JobContext};

/// Reply budget of a summary.
const SUMMARY_TOKENS: u32 = 512;
const INSTRUCTIONS: &str = "You maintain the memory of a conversation. Rewrite the previous \
summary (if any) and the new messages into one concise summary that keeps every fact, decision, \
name and number a later reply may need. Answer with the summary only.";
/// How the summary enters the prompt.
pub const SUMMARY_PREFIX: &str = "Summary of the earlier conversation:\n";

fn with_summary(head: &[ChatMessage], summary: Option<&str>) -> Vec<ChatMessage> {
    let mut h = head.to_vec();
    if let Some(s) = summary.filter(|s| !s.is_empty()) {
        h.push(ChatMessage::new("system", format!("{SUMMARY_PREFIX}{s}")));
    }
    h
}

/// The summarizer's input: the previous summary, whole (it already holds the oldest facts),
/// then the new messages, of which the newest part is kept when all would pass `max_tokens`
/// (counted as the summary model counts: by characters, a text in Japanese or Russian would
/// have overflowed the summarizer's window for good).
fn transcript(
    previous: Option<&str>,
    dropped: &[ChatMessage],
    tok: Tokenizer,
    max_tokens: u64,
) -> String {
    let mut t = String::new();
    if let Some(p) = previous.filter(|p| !p.is_empty()) {
        t.push_str("Previous summary:\n");
        t.push_str(p);
        t.push_str("\n\n");
    }
    let mut new = String::from("New messages:\n");
    for m in dropped {
        new.push_str(&m.role);
        new.push_str(": ");
        new.push_str(&m.content);
        new.push('\n');
    }
    let room = max_tokens.saturating_sub(tok.count(&t));
    if tok.count(&new) > room {
        // the fewest leading characters to drop (a binary search: counting is monotone in
        // how much is kept, to within a token at the cut)
        let starts: Vec<usize> = new.char_indices().map(|(i, _)| i).collect();
        let (mut lo, mut hi) = (0, starts.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if tok.count(&new[starts[mid]..]) <= room {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        new = starts
            .get(lo)
            .map_or(String::new(), |&i| new[i..].to_string());
    }
    t.push_str(&new);
    t
}

/// The call that wrote a new summary during a turn: its tokens and cost are the turn's too
/// (the job's output reports them as `summary`; `/v1/usage` counts them under `model`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SummaryCall {
    /// The alias that wrote the summary.
    pub model: String,
    pub usage: Usage,
    pub cost_usd: f64,
}

/// A turn's prompt under the `summarize` strategy.
pub(crate) struct Prompt {
    pub head: Vec<ChatMessage>,
    pub history: Vec<ChatMessage>,
    /// Set when this turn wrote a new summary.
    pub summary: Option<SummaryCall>,
}

impl Prompt {
    fn unchanged(head: Vec<ChatMessage>, history: Vec<ChatMessage>) -> Prompt {
        Prompt {
            head,
            history,
            summary: None,
        }
    }
}

/// Head and history for this turn under the `summarize` strategy: the stored summary replaces
/// the turns it covers; when the rest still overflows the window of `input.model`, the
/// overflowing turns are folded into a new summary (stored for reuse).
pub(crate) async fn prompt(
    providers: &Providers,
    summary_model: Option<&str>,
    store: &Store,
    ctx: &JobContext,
    input: &LlmChatInput,
    h: History,
) -> Result<Prompt, ExecError> {
    let primary = match providers.table().resolve(&input.model) {
        // a known window; otherwise the call reports the unknown model, or the provider judges
        // (the stored summary still stands for the turns it covers: they were not read)
        Ok(p) if p.config.context_window > 0 => p,
        _ => {
            let head = with_summary(&h.head, h.conversation.summary.as_deref());
            return Ok(Prompt::unchanged(head, h.messages()));
        }
    };
    let c = &h.conversation;
    let from = if c.summary.is_some() {
        c.summary_turn
    } else {
        0
    };
    let rest: Vec<(i32, ChatMessage)> = h
        .turns
        .iter()
        .filter(|(t, _)| *t >= from)
        .cloned()
        .collect();
    // the reply budget as the call will clamp it (a budget past the window would leave no
    // room at all, and every turn would pay for a summary before failing)
    let window = primary.config.context_window;
    let reply = input
        .max_tokens
        .unwrap_or(primary.config.max_output_tokens)
        .min(window.saturating_sub(16).max(1));
    let budget = u64::from(window.saturating_sub(reply));
    let tok = Tokenizer::for_model(primary.config.tokenizer.as_deref(), &primary.upstream);
    let extra = tok.request_extra(input);
    let head = with_summary(&h.head, c.summary.as_deref());
    let msgs: Vec<ChatMessage> = rest.iter().map(|(_, m)| m.clone()).collect();
    let fits = {
        let (head, msgs) = (head.clone(), msgs.clone());
        tokio::task::spawn_blocking(move || fit(tok, head, msgs, budget, extra))
            .await
            .map_err(ExecError::internal)?
    };
    if fits.is_some_and(|f| f.dropped.is_empty()) {
        return Ok(Prompt::unchanged(head, msgs));
    }
    // fold enough that the kept turns fill at most half the budget: the next turns then fit
    // without a new summary for a while
    let dropped = {
        let (head, msgs) = (head.clone(), msgs.clone());
        tokio::task::spawn_blocking(move || fit(tok, head, msgs, budget / 2, extra))
            .await
            .map_err(ExecError::internal)?
    }
    // even the newest turn alone overflows that: summarize all but it
    .map_or(msgs.len().saturating_sub(1), |f| f.dropped.len());
    if dropped == 0 {
        return Ok(Prompt::unchanged(head, msgs));
    }
    let new_from = rest[dropped].0;
    let model = summary_model.unwrap_or(&input.model).to_string();
    let summarizer = match providers.table().resolve(&model) {
        Ok(m) => m,
        // a summary model that does not resolve (`llm.summary_model` misconfigured): this
        // turn drops the oldest turns instead, as when the model refuses to summarize
        Err(e) => {
            tracing::warn!(conversation = %c.id, model, error = %e, "no summary model; the oldest turns are dropped for this turn");
            return Ok(Prompt::unchanged(head, msgs));
        }
    };
    // a summary model of unknown window (not in the table) gets the conversation model's:
    // a window of 0 would cut the whole transcript and store an empty summary
    let window = match summarizer.config.context_window {
        0 => primary.config.context_window,
        w => w,
    };
    let room = u64::from(window.saturating_sub(SUMMARY_TOKENS + 200));
    let summary_tok =
        Tokenizer::for_model(summarizer.config.tokenizer.as_deref(), &summarizer.upstream);
    let text = {
        let (previous, dropped) = (c.summary.clone(), msgs[..dropped].to_vec());
        tokio::task::spawn_blocking(move || {
            transcript(previous.as_deref(), &dropped, summary_tok, room)
        })
        .await
        .map_err(ExecError::internal)?
    };
    // no temperature: reasoning models (o3, gpt-5...) refuse any but their default
    let summary_input = LlmChatInput {
        model,
        messages: Vec::new(),
        max_tokens: Some(SUMMARY_TOKENS),
        stream: Some(false),
        ..LlmChatInput::default()
    };
    let done = match providers
        .complete(
            &summary_input,
            &[ChatMessage::new("system", INSTRUCTIONS)],
            &[ChatMessage::new("user", text)],
            &Sink::silent(ctx),
        )
        .await
    {
        Ok(done) => done,
        // worth another attempt (the job retries, and summarizes then)
        Err(e) if e.retryable => return Err(e),
        // a summary this model will not write (a bad request, no such model): this turn drops
        // the oldest turns instead, rather than every later turn failing the same way
        Err(e) => {
            tracing::warn!(conversation = %c.id, error = %e, "no summary; the oldest turns are dropped for this turn");
            return Ok(Prompt::unchanged(head, msgs));
        }
    };
    let u = &done.output.usage;
    let call = SummaryCall {
        cost_usd: done
            .model
            .config
            .cost_usd(u.prompt_tokens, u.completion_tokens),
        usage: done.output.usage.clone(),
        model: done.model.alias,
    };
    let summary = done.output.text;
    if summary.trim().is_empty() {
        // (a reasoning model can spend its whole budget thinking) stored, an empty summary
        // would stand for every turn it covers: they would vanish from every later prompt
        tracing::warn!(conversation = %c.id, model = %call.model, "the summary came back empty; the oldest turns are dropped for this turn");
        return Ok(Prompt {
            head,
            history: msgs,
            summary: Some(call),
        });
    }
    tracing::info!(conversation = %c.id, summarized_before_turn = new_from, "conversation summarized");
    if let Err(e) = store.save_summary(c.id, &summary, new_from).await {
        tracing::warn!(error = %e, "could not keep the summary (it is made again next time)");
    }
    let kept = rest[dropped..].iter().map(|(_, m)| m.clone()).collect();
    Ok(Prompt {
        head: with_summary(&h.head, Some(&summary)),
        history: kept,
        summary: Some(call),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcripts_keep_the_newest_part_within_the_summarizer_s_tokens() {
        let tok = Tokenizer::Estimate;
        let dropped = [
            ChatMessage::new("user", "a b"),
            ChatMessage::new("assistant", "c"),
        ];
        let t = transcript(Some("old"), &dropped, tok, 1000);
        assert!(t.starts_with("Previous summary:\nold") && t.ends_with("assistant: c\n"));
        // "\nassistant: c\n" is 14 ASCII characters: 5 tokens
        let t = transcript(None, &dropped, tok, 5);
        assert!(t.ends_with("assistant: c\n") && tok.count(&t) <= 5, "{t:?}");
        assert!(!t.contains("a b"), "the oldest part is cut: {t:?}");
        // the previous summary is never what gets cut
        let t = transcript(Some("old facts"), &dropped, tok, 16);
        assert!(t.starts_with("Previous summary:\nold facts\n\n"), "{t:?}");
        assert!(
            t.ends_with("assistant: c\n") && tok.count(&t) <= 16,
            "{t:?}"
        );
        // one token a character in Japanese: cut by tokens, not by characters
        let long = [ChatMessage::new("user", "会話".repeat(500))];
        let t = transcript(None, &long, tok, 100);
        assert!(
            tok.count(&t) <= 100 && tok.count(&t) >= 95,
            "{}",
            tok.count(&t)
        );
    }
}
