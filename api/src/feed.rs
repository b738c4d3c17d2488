//! The ordered event feed of one job for one client (shared by WebSocket and SSE): subscribe to
//! live events first, then replay history, drop live events already sent, re-read on a gap, and
//! always end with the terminal event (from Postgres if Redis lost it).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use switchyard_core::event::types;
use switchyard_core::job::JobStatus;
use switchyard_core::Event;
use switchyard_queue::{LiveMsg, LiveSubscription};
use switchyard_store::{JobRow, Scope};
use uuid::Uuid;

use crate::error::ApiError;
use crate::AppState;

const HISTORY_PAGE: usize = 500;
/// Re-read Redis after this much silence: a safety net only (dropped live messages raise the
/// subscription's lagged flag and a pub/sub reconnect sends a resync, both re-read at once).
const IDLE_REREAD: Duration = Duration::from_secs(10);
/// Every this many idle re-reads, also check Postgres (a terminal event whose publication
/// failed, or was lost with Redis).
const PG_CHECK_EVERY: u32 = 3;

/// Whether an unfinished job without an event stream had history that is gone. A job that was
/// only ever queued had nothing but its `queued` event, which a reconciler dispatch does not
/// write; a run writes its stream as it starts, so one running for a while without one, or any
/// later attempt or retry, means Redis lost it.
fn history_lost(row: &JobRow) -> bool {
    match row.status() {
        JobStatus::Queued => row.attempt > 0 || row.event_seq > 1,
        JobStatus::Running => {
            row.attempt > 1
                || row
                    .started_at
                    .is_none_or(|t| chrono::Utc::now() - t > chrono::Duration::seconds(1))
        }
        _ => false,
    }
}

/// What a feed yields.
#[derive(Debug, Clone)]
pub enum FeedItem {
    Event(Arc<Event>),
    /// The history is gone: re-read the job with `GET /v1/jobs/{id}`.
    Reset,
}

impl FeedItem {
    /// The frame sent to clients (the event object, or `{"job_id", "type": "reset"}`).
    pub fn to_text(&self, job_id: Uuid) -> String {
        match self {
            FeedItem::Event(e) => serde_json::to_string(e.as_ref()).unwrap_or_default(),
            FeedItem::Reset => json!({ "job_id": job_id, "type": types::RESET }).to_string(),
        }
    }
}

pub struct Feed {
    state: AppState,
    pub job_id: Uuid,
    last_sent: u64,
    sub: LiveSubscription,
    pending: VecDeque<FeedItem>,
    done: bool,
    /// The event sent last was a terminal one: the feed ends once nothing follows it.
    ended: bool,
    reset_sent: bool,
    /// The `base` of a stream written anew that a reset was sent for (see `refill`).
    reset_base: u64,
    /// The last history read returned a full page: read more before waiting.
    more: bool,
    idle_rounds: u32,
    /// The job row read at open, reconciled at the first read of history.
    deferred: Option<JobRow>,
    /// A live event received and not yet queued (see `next`).
    held: Option<Arc<Event>>,
    /// A resync received and not yet done.
    resync: bool,
}

impl Feed {
    /// Opens a feed of events with seq > `after`. `Err(not_found)` unless the job is the
    /// tenant's (and, for an end user, theirs). A feed from the start (`after` 0, what a
    /// client does right after submitting) is authorized by the owner its stream records
    /// (written when the API dispatched the job) without reading Postgres, the largest
    /// statement of a followed job's path; anything else (a resumption, no record, another
    /// owner) reads the job from Postgres, which also answers 404. Without the row, a finished
    /// job whose end never reached its stream is found by the feed's periodic Postgres check
    /// rather than at once.
    pub async fn open(
        state: &AppState,
        scope: impl Into<Scope>,
        job_id: Uuid,
        after: u64,
        buffer: usize,
    ) -> Result<Feed, ApiError> {
        let scope: Scope = scope.into();
        let owner = match after {
            0 => state.bus.owner(job_id).await.ok().flatten(),
            _ => None,
        };
        if let Some((tenant, creator)) = owner {
            let theirs = scope.creator.as_ref().is_none_or(|c| *c == creator);
            if tenant == scope.tenant_id && theirs {
                return Ok(Feed::start(state, job_id, after, buffer, None).await);
            }
        }
        let row = state
            .store
            .get_job(scope, job_id)
            .await?
            .ok_or_else(|| ApiError::not_found("job"))?;
        Ok(Feed::start(state, job_id, after, buffer, Some(row)).await)
    }

    /// Opens a feed of all events of a job this request has just submitted: it is the
    /// principal's and queued, so it is not read back from Postgres (a terminal event that
    /// Redis lost is still found by the idle checks).
    pub async fn open_submitted(state: &AppState, job_id: Uuid, buffer: usize) -> Feed {
        Feed::start(state, job_id, 0, buffer, None).await
    }

    async fn start(
        state: &AppState,
        job_id: Uuid,
        after: u64,
        buffer: usize,
        row: Option<JobRow>,
    ) -> Feed {
        let sub = state.live.subscribe(job_id, buffer);
        let mut feed = Feed {
            state: state.clone(),
            job_id,
            last_sent: after,
            sub,
            pending: VecDeque::new(),
            done: false,
            ended: false,
            reset_sent: false,
            reset_base: 0,
            more: false,
            idle_rounds: 0,
            deferred: None,
            held: None,
            resync: false,
        };
        if feed.sub.activating {
            // the hub sends a resync once the channel is live: read history then (saves a read)
            feed.deferred = row;
        } else {
            feed.refill(row).await;
        }
        feed
    }

    /// The next item, in order; `None` once the terminal event (or a final reset) was yielded.
    pub async fn next(&mut self) -> Option<FeedItem> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                match &item {
                    FeedItem::Event(e) => {
                        self.last_sent = e.seq;
                        // the end, unless events follow it: a dead job retried (`POST
                        // /retry`) goes on numbering after its old terminal event
                        self.ended = e.is_terminal();
                        if self.ended && self.pending.is_empty() && !self.more {
                            self.done = true;
                        }
                    }
                    // after a reset the client starts over: any later event is new to it
                    FeedItem::Reset => self.last_sent = 0,
                }
                return Some(item);
            }
            if self.done {
                return None;
            }
            if self.more {
                // a row held back until the last page (see `refill`)
                let row = self.deferred.clone();
                self.refill(row).await;
                continue;
            }
            if self.ended {
                // a terminal event last sent, and history holds nothing after it
                self.done = true;
                return None;
            }
            // what a dropped `next()` (a caller's timeout) left half done: a live event taken,
            // a resync asked for
            if let Some(ev) = self.held.clone() {
                let hw = self.high_water();
                if ev.seq > hw + 1 {
                    // gap: something was missed (slow subscriber, reconnect); re-read
                    self.refill(None).await;
                }
                self.held = None;
                if ev.seq > self.high_water() {
                    // in order, or history cannot fill the gap (lost): go on from here
                    self.pending.push_back(FeedItem::Event(ev));
                }
                continue;
            }
            if self.resync {
                let row = self.deferred.clone();
                self.refill(row).await;
                self.resync = false;
                continue;
            }
            let msg = tokio::time::timeout(IDLE_REREAD, self.sub.rx.recv()).await;
            // kept before any await, so that a `next()` dropped from here on loses nothing
            match &msg {
                Ok(Some(LiveMsg::Event(ev))) => {
                    self.idle_rounds = 0;
                    if ev.seq > self.high_water() {
                        self.held = Some(ev.clone());
                    }
                }
                Ok(Some(LiveMsg::Resync)) => self.resync = true,
                _ => {}
            }
            if self.sub.take_lagged() {
                self.refill(None).await;
            }
            match msg {
                // taken up at the top of the loop
                Ok(Some(LiveMsg::Event(_) | LiveMsg::Resync)) => {}
                Ok(None) => {
                    // the hub is gone (shutdown)
                    self.done = true;
                }
                Err(_) => {
                    self.idle_rounds += 1;
                    let pg = self.idle_rounds.is_multiple_of(PG_CHECK_EVERY);
                    if let Some(row) = self.deferred.clone() {
                        self.refill(Some(row)).await;
                    } else if pg {
                        let row = self
                            .state
                            .store
                            .get_job_unscoped(self.job_id)
                            .await
                            .ok()
                            .flatten();
                        self.refill(row).await;
                    } else {
                        self.refill(None).await;
                    }
                }
            }
        }
    }

    /// Reads history after what was sent; with `row`, also reconciles with Postgres.
    async fn refill(&mut self, row: Option<JobRow>) {
        let after = self.pending_last().unwrap_or(self.last_sent);
        let hist = self.state.bus.read(self.job_id, after, HISTORY_PAGE).await;
        let mut exists = true;
        match hist {
            Ok(h) => {
                exists = h.exists;
                if after > 0 && after.saturating_add(1) < h.base && self.reset_base != h.base {
                    // the stream was written anew after Redis lost it (a later attempt numbers
                    // past every seq of the lost one): what this client saw is gone, and what
                    // follows may be another attempt's. It starts over rather than splicing
                    self.pending.push_back(FeedItem::Reset);
                    self.reset_base = h.base;
                }
                self.more = h.events.len() == HISTORY_PAGE;
                let mut next = after;
                for e in h.events {
                    if e.seq > next {
                        next = e.seq;
                        self.pending.push_back(FeedItem::Event(Arc::new(e)));
                    }
                }
            }
            Err(e) => {
                self.more = false;
                tracing::debug!(error = %e, "history read failed");
            }
        }
        let Some(row) = row else {
            return;
        };
        if self.more {
            // more history to read: the end is reconciled after its last page (else a
            // terminal event made up from the row would jump over the pages between)
            self.deferred = Some(row);
            return;
        }
        let status = row.status();
        let have_terminal = self
            .pending
            .iter()
            .any(|i| matches!(i, FeedItem::Event(e) if e.is_terminal()));
        if status.is_terminal() && !have_terminal {
            let seq = row.event_seq.max(0) as u64;
            let after = self.pending_last().unwrap_or(self.last_sent);
            if seq > after {
                let ev = Event::terminal(
                    row.id,
                    seq,
                    row.attempt,
                    status,
                    row.output.as_ref(),
                    row.job_error().as_ref(),
                );
                self.pending.push_back(FeedItem::Event(Arc::new(ev)));
            } else if self.has_the_end(after, seq).await {
                // the client already has the end (a reconnect after it, e.g. an EventSource's
                // automatic one with the terminal event's id; its history may have expired
                // since): nothing more to send
                self.done_after_pending();
            } else {
                // the client saw seqs beyond the durable terminal one: history was lost
                self.pending.push_back(FeedItem::Reset);
                self.reset_sent = true;
                self.done_after_pending();
            }
        } else if !exists && !self.reset_sent && history_lost(&row) {
            self.pending.push_back(FeedItem::Reset);
            self.reset_sent = true;
        }
        // a held-back row is let go only here, after every await: a `next()` dropped before
        // (a caller's timeout) keeps it
        self.deferred = None;
    }

    /// Whether a client at `after`, at or past `end` (the durable terminal seq), has the job's
    /// end: the event it saw last is the terminal one (which can be numbered past Postgres'
    /// seq: an end published after a dead run's deltas), or, no longer in the stream (expired,
    /// or an end made up from Postgres), carried the durable end's seq.
    async fn has_the_end(&self, after: u64, end: u64) -> bool {
        let seen = self
            .state
            .bus
            .read(self.job_id, after.saturating_sub(1), 1)
            .await
            .ok()
            .and_then(|h| h.events.into_iter().next())
            .filter(|e| e.seq == after);
        match seen {
            Some(e) => e.is_terminal(),
            None => after == end,
        }
    }

    fn done_after_pending(&mut self) {
        self.more = false;
        self.done = true;
    }

    /// The highest seq sent or about to be sent.
    fn high_water(&self) -> u64 {
        self.pending_last().unwrap_or(self.last_sent)
    }

    fn pending_last(&self) -> Option<u64> {
        self.pending.iter().rev().find_map(|i| match i {
            FeedItem::Event(e) => Some(e.seq),
            FeedItem::Reset => None,
        })
    }
}
