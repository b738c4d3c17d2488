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
    // what falls out may be more than the summarizer reads at once (a 200k window folding
    // into a 16k one): it is folded chunk by chunk, oldest first, each into the summary so
    // far. (Only the newest part used to be read, yet every dropped turn was marked covered:
    // the rest vanished for good.)
    // no temperature: reasoning models (o3, gpt-5...) refuse any but their default
    let summary_input = LlmChatInput {
        model,
        messages: Vec::new(),
        max_tokens: Some(SUMMARY_TOKENS),
        stream: Some(false),
        ..LlmChatInput::default()
    };
    let mut summary = c.summary.clone();
    let mut call: Option<SummaryCall> = None;
    // the messages folded so far (those before this index)
    let mut folded = 0;
    for _ in 0..MAX_FOLDS {
        if folded >= dropped {
            break;
        }
        // the next chunk: what fits beside the summary so far
        let (end, text) = {
            let (previous, rest) = (summary.clone(), msgs[folded..dropped].to_vec());
            tokio::task::spawn_blocking(move || {
                let n = chunk_len(previous.as_deref(), &rest, summary_tok, room);
                (
                    n,
                    transcript(previous.as_deref(), &rest[..n], summary_tok, room),
                )
            })
            .await
            .map_err(ExecError::internal)?
        };
        let end = folded + end;
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
            Err(e) if e.retryable && call.is_none() => return Err(e),
            // a summary this model will not write (a bad request, no such model): this turn
            // drops the oldest turns instead, rather than every later turn failing the same way
            Err(e) if call.is_none() => {
                tracing::warn!(conversation = %c.id, error = %e, "no summary; the oldest turns are dropped for this turn");
                return Ok(Prompt::unchanged(head, msgs));
            }
            // a later chunk: what was folded is kept, the rest is folded by a later turn
            Err(e) => {
                tracing::warn!(conversation = %c.id, error = %e, "summary left partial; later turns fold the rest");
                break;
            }
        };
        let u = &done.output.usage;
        let cost = done
            .model
            .config
            .cost_usd(u.prompt_tokens, u.completion_tokens);
        let call = call.get_or_insert_with(|| SummaryCall {
            model: done.model.alias.clone(),
            usage: Usage::new(0, 0),
            cost_usd: 0.0,
        });
        call.usage.prompt_tokens += u.prompt_tokens;
        call.usage.completion_tokens += u.completion_tokens;
        call.usage.total_tokens += u.total_tokens;
        call.usage.estimated |= u.estimated;
        call.cost_usd += cost;
        let text = done.output.text;
        if text.trim().is_empty() {
            // (a reasoning model can spend its whole budget thinking) stored, an empty summary
            // would stand for every turn it covers: they would vanish from every later prompt
            tracing::warn!(conversation = %c.id, model = %call.model, "the summary came back empty");
            break;
        }
        summary = Some(text);
        folded = end;
    }
    let Some(call) = call else {
        return Ok(Prompt::unchanged(head, msgs));
    };
    if folded == 0 {
        // nothing folded: the oldest turns are dropped for this turn
        return Ok(Prompt {
            head,
            history: msgs,
            summary: Some(call),
        });
    }
    let summary = summary.unwrap_or_default();
    // the first turn not folded in (the turns between it and the kept ones are left out of
    // this prompt when folding stopped early: the next turn that overflows folds them)
    let new_from = rest[folded].0;
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

/// Folds into the summary at most this many chunks per turn (a summary call each); what is
/// left is folded by the next turns that overflow.
const MAX_FOLDS: usize = 4;

/// How many of `msgs`, from the first, the summarizer reads in one call beside `previous`
/// (the summary so far) within `room` tokens: at least one (a message past the room alone is
/// cut by [`transcript`]).
fn chunk_len(previous: Option<&str>, msgs: &[ChatMessage], tok: Tokenizer, room: u64) -> usize {
    let head = transcript(previous, &[], tok, u64::MAX);
    let mut left = room.saturating_sub(tok.count(&head));
    for (i, m) in msgs.iter().enumerate() {
        let n = tok.count(&m.role) + tok.count(&m.content) + 2;
        if n > left {
            return i.max(1).min(msgs.len());
        }
        left -= n;
    }
    msgs.len()
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

    #[test]
    fn what_overflows_the_summarizer_is_read_in_chunks_that_fit() {
        let tok = Tokenizer::Estimate;
        // what overflows the summarizer is folded in chunks, oldest first, each within its
        // room beside the summary so far
        let msgs: Vec<ChatMessage> = (0..10)
            .map(|i| ChatMessage::new("user", format!("message {i} ") + &"word ".repeat(30)))
            .collect();
        let n = chunk_len(None, &msgs, tok, 200);
        assert!((1..10).contains(&n), "{n}");
        let t = transcript(None, &msgs[..n], tok, u64::MAX);
        assert!(tok.count(&t) <= 200, "{}", tok.count(&t));
        let more = transcript(None, &msgs[..n + 1], tok, u64::MAX);
        assert!(tok.count(&more) > 150, "about as many as fit");
        let previous = "fact ".repeat(60);
        assert!(
            chunk_len(Some(&previous), &msgs, tok, 200) < n,
            "the summary takes room"
        );
        // one message past the room is a chunk of its own; all fit in a large room
        assert_eq!(chunk_len(None, &msgs, tok, 5), 1);
        assert_eq!(chunk_len(Some(&previous), &msgs, tok, 5), 1);
        assert_eq!(chunk_len(None, &msgs, tok, 100_000), 10);
    }
}
