//! Answering a turn of a stored conversation: wait until earlier turns are answered (posts are
//! answered in order; only the next turn waits in its worker slot, later ones are deferred),
//! read the history, fit it into the model's window, and append the reply.

use std::time::{Duration, Instant};

use serde_json::json;
use switchyard_core::job::{ChatMessage, ConversationRef, LlmChatInput, ToolCall};
use switchyard_store::{Conversation, Reply, ReplyAppend, Store};

use super::context::{fit, Tokenizer};
use super::ChatOutput;
use crate::executor::{ExecError, JobContext};

/// How long a turn waits in its slot for earlier turns none of which is running (queued for a
/// retry, or held by a dead worker) before it gives the slot back (deferred, no attempt used).
const IDLE_PREDECESSOR_WAIT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);
/// Under `summarize`, how many times the `drop_oldest` read bound a turn reads.
const SUMMARIZE_READ_WINDOWS: u64 = 4;

/// How long a turn `ahead` turns back in line waits before it looks again: a second per turn
/// ahead, doubling with each deferral (every claim counts an attempt, given back on deferral),
/// at most 30 s. A turn behind long replies deferred every second, used up the run's 1,000
/// deferrals in a quarter of an hour and then failed; now they last hours.
fn busy_delay(ahead: u64, attempt: i32) -> Duration {
    let doubling = 1u64 << (attempt.clamp(1, 6) - 1);
    Duration::from_secs(ahead.saturating_sub(1).max(doubling))
        .clamp(Duration::from_secs(1), Duration::from_secs(30))
}

fn store_error(e: switchyard_store::StoreError) -> ExecError {
    ExecError::retryable("store_unavailable", e.to_string())
}

/// A conversation's prompt for one turn.
pub(crate) struct History {
    pub conversation: Conversation,
    /// The system prompt.
    pub head: Vec<ChatMessage>,
    /// Every message up to the turn being answered, with its turn.
    pub turns: Vec<(i32, ChatMessage)>,
}

impl History {
    pub fn messages(&self) -> Vec<ChatMessage> {
        self.turns.iter().map(|(_, m)| m.clone()).collect()
    }
}

/// Waits for earlier turns, then returns the conversation's prompt for `turn`. Under
/// `drop_oldest`, only the newest `max_bytes` of the history are read (what the model chain's
/// windows can hold; `None`: no bound): a long conversation was read whole on every turn.
/// Under `summarize`, the newest `SUMMARIZE_READ_WINDOWS × max_bytes` of what the summary
/// does not cover.
pub(crate) async fn history(
    store: &Store,
    ctx: &JobContext,
    conv: ConversationRef,
    max_bytes: Option<u64>,
) -> Result<History, ExecError> {
    let gone = || {
        ExecError::fatal(
            "conversation_not_found",
            format!("conversation {} no longer exists", conv.id),
        )
    };
    let started = Instant::now();
    loop {
        let pending = store
            .unfinished_turns_before(conv.id, conv.turn)
            .await
            .map_err(store_error)?;
        let Some(first) = pending.first() else { break };
        // only the turn right after the unfinished ones waits in its slot; turns further back
        // give theirs back at once (a burst of posts to one conversation held a worker slot
        // per turn, each polling, for as long as the turns before it ran)
        if pending.len() > 1 {
            let ahead = pending.len() as u64;
            return Err(ExecError::defer(
                "conversation_busy",
                format!(
                    "turn {} waits for {ahead} earlier turns (from turn {})",
                    conv.turn, first.turn
                ),
                busy_delay(ahead, ctx.attempt),
            ));
        }
        // waiting in the slot is cheap while an earlier turn runs; when none runs (queued for
        // a retry, or its worker died and the lease ran out) the slot goes back for a while,
        // without using up an attempt
        if !pending.iter().any(|p| p.active) && started.elapsed() > IDLE_PREDECESSOR_WAIT {
            let due = first
                .run_at
                .and_then(|t| (t - chrono::Utc::now()).to_std().ok())
                .unwrap_or_default();
            return Err(ExecError::defer(
                "conversation_busy",
                format!("turn {} waits for turn {}", conv.turn, first.turn),
                due.clamp(Duration::from_secs(1), Duration::from_secs(60)),
            ));
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = ctx.cancel.cancelled() => return Err(ExecError::fatal("cancelled", "cancelled")),
        }
    }
    // read once the turns before have ended: one that ended just now may have stored a newer
    // summary (read before, this turn summarized the same turns again, over the new summary)
    let c = store
        .get_conversation(ctx.tenant_id, conv.id)
        .await
        .map_err(store_error)?
        .ok_or_else(gone)?;
    // under `summarize`, turns the stored summary covers are not read again
    let from = match (&c.summary, c.context_strategy.as_str()) {
        (Some(_), "summarize") => c.summary_turn.min(conv.turn),
        _ => 0,
    };
    // under `summarize` the summarizer needs the turns the summary does not cover yet: a
    // turn folds at most a few summary calls' worth of them, so more than that many windows
    // is not read (a conversation whose summaries kept failing was read whole on every turn;
    // past this bound its oldest unsummarized turns are dropped, as under `drop_oldest`)
    let budget = match c.context_strategy.as_str() {
        "summarize" => max_bytes.map(|b| b.saturating_mul(SUMMARIZE_READ_WINDOWS)),
        _ => max_bytes,
    }
    .map(|b| b.min(i64::MAX as u64) as i64);
    let rows = store
        .messages_from(conv.id, from, conv.turn, budget)
        .await
        .map_err(store_error)?;
    if !rows.iter().any(|m| m.turn == conv.turn) {
        return Err(gone());
    }
    let mut head = Vec::new();
    if let Some(s) = c.system.as_ref().filter(|s| !s.is_empty()) {
        head.push(ChatMessage::new("system", s.clone()));
    }
    let turns = rows
        .into_iter()
        .map(|m| {
            let mut msg = ChatMessage::new(&m.role, m.content);
            msg.tool_calls = m
                .tool_calls
                .and_then(|v| serde_json::from_value::<Vec<ToolCall>>(v).ok())
                .filter(|c| !c.is_empty());
            (m.turn, msg)
        })
        .collect();
    Ok(History {
        conversation: c,
        head,
        turns,
    })
}

/// Prompts up to this many characters are fitted in place; longer ones on a blocking thread
/// (tokenizing a long prompt is CPU work; a short one costs less than the thread hop).
const INLINE_FIT_CHARS: usize = 16 * 1024;

/// Fits head + history into `window − reply budget`.
pub(crate) async fn fit_prompt(
    tok: Tokenizer,
    head: Vec<ChatMessage>,
    history: Vec<ChatMessage>,
    budget: u64,
    extra: u64,
) -> Result<(Vec<ChatMessage>, u64), ExecError> {
    let chars: usize = head.iter().chain(&history).map(|m| m.content.len()).sum();
    let fitted = if chars <= INLINE_FIT_CHARS {
        fit(tok, head, history, budget, extra)
    } else {
        tokio::task::spawn_blocking(move || fit(tok, head, history, budget, extra))
            .await
            .map_err(ExecError::internal)?
    };
    match fitted {
        Some(f) => {
            if !f.dropped.is_empty() {
                tracing::debug!(
                    dropped = f.dropped.len(),
                    tokens = f.tokens,
                    budget,
                    "context fitted"
                );
            }
            Ok((f.messages, f.tokens))
        }
        None => Err(ExecError::fatal(
            "context_too_long",
            format!(
                "the system prompt and the newest message alone exceed the model's window \
                 minus the reply budget ({budget} tokens)"
            ),
        )),
    }
}

/// Appends the assistant reply of the turn (fenced by the attempt).
pub(crate) async fn append(
    store: &Store,
    ctx: &JobContext,
    conv: ConversationRef,
    input: &LlmChatInput,
    out: &ChatOutput,
    model: &str,
) -> Result<(), ExecError> {
    let tool_calls = (!out.tool_calls.is_empty())
        .then(|| serde_json::to_value(&out.tool_calls).unwrap_or_default());
    let reply = Reply {
        conversation_id: conv.id,
        turn: conv.turn,
        job_id: ctx.job_id,
        attempt: ctx.attempt,
        content: out.text.clone(),
        tool_calls,
        model: model.to_string(),
        usage: json!(out.usage),
    };
    match store
        .append_reply_outcome(&reply)
        .await
        .map_err(store_error)?
    {
        ReplyAppend::Written => Ok(()),
        // deleted while its turn ran: the turn is not answered (nor is the job a success)
        // (the reply was paid for all the same: the job's spent tokens count it)
        ReplyAppend::ConversationGone => Err(ExecError::fatal(
            "conversation_not_found",
            format!("conversation {} was deleted while its turn ran", conv.id),
        )),
        ReplyAppend::Fenced => {
            tracing::info!(conversation = %conv.id, turn = conv.turn, model = %input.model,
                "reply not appended (a newer attempt owns the turn)");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_waiting_in_line_backs_off_to_30_s() {
        let secs = |ahead, attempt| busy_delay(ahead, attempt).as_secs();
        assert_eq!(secs(2, 1), 1);
        assert_eq!(secs(2, 2), 2);
        assert_eq!(secs(2, 4), 8);
        assert_eq!(secs(2, 6), 30);
        assert_eq!(secs(2, 900), 30);
        assert_eq!(secs(10, 1), 9, "a second per turn ahead");
        assert_eq!(secs(100, 1), 30);
        assert_eq!(secs(2, 0), 1);
    }
}
