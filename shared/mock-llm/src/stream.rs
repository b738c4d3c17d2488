//! Response bodies sent piece by piece: a precomputed list of frames, each sent
//! after its delay, then an ending (complete, clean cut, abort, stall), with the
//! call's outcome settled on the way (or counted as aborted if the body is dropped).

use std::io;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::scenario::Behaviour;
use crate::stats::CallGuard;
use crate::timing::pause;

pub(crate) const EVENT_STREAM: &str = "text/event-stream";
pub(crate) const JSON: &str = "application/json";

const DROP_MESSAGE: &str = "mock-drop: simulated dropped connection";
const RESET_MESSAGE: &str = "mock-reset: simulated connection reset";
const SHUTDOWN_MESSAGE: &str = "mock LLM server is shutting down";

/// One piece of a body, sent after `delay`.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    pub delay: Duration,
    pub data: Bytes,
}

impl Frame {
    pub fn now(data: impl Into<Bytes>) -> Self {
        Self::after(Duration::ZERO, data)
    }

    pub fn after(delay: Duration, data: impl Into<Bytes>) -> Self {
        Self {
            delay,
            data: data.into(),
        }
    }
}

/// How a body ends once its frames are out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Normal end; the call counts as completed.
    Complete,
    /// Clean end of an intentionally incomplete body.
    Cut,
    /// The body fails, which tears the connection down.
    Abort(&'static str),
    /// Nothing more is sent until shutdown (or the client leaves).
    Stall,
}

/// A whole body: frames, then an ending.
#[derive(Debug)]
pub(crate) struct BodyPlan {
    pub frames: Vec<Frame>,
    pub ending: Ending,
}

impl BodyPlan {
    /// The non-streaming body of a failure scenario: `body` cut in half (`Drop`,
    /// `Cut`) or nothing at all (`Reset`); `None` for other behaviours.
    pub fn broken_json(body: &Value, behaviour: Behaviour) -> Option<Self> {
        let half = || {
            let mut bytes = body.to_string().into_bytes();
            bytes.truncate(bytes.len() / 2);
            vec![Frame::now(bytes)]
        };
        let (frames, ending) = match behaviour {
            Behaviour::Reset => (Vec::new(), Ending::Abort(RESET_MESSAGE)),
            Behaviour::Drop => (half(), Ending::Abort(DROP_MESSAGE)),
            Behaviour::Cut => (half(), Ending::Cut),
            _ => return None,
        };
        Some(Self { frames, ending })
    }
}

/// The SSE events of one full answer, before a scenario cuts them short.
#[derive(Debug)]
pub(crate) struct SseParts {
    /// Events before the first token (OpenAI's role chunk, Anthropic's
    /// `message_start`, `content_block_start`, `ping`).
    pub head: Vec<Frame>,
    /// One event per token (or tool-call fragment), carrying its delay.
    pub tokens: Vec<Frame>,
    /// Events after the last token (finish, usage, `[DONE]` / `message_stop`).
    pub tail: Vec<Frame>,
    /// The event `mock-midstream-error` sends after two tokens.
    pub error_event: Frame,
}

impl SseParts {
    /// Applies the scenario's cut: stall after 1 token, drop / cut / error after
    /// 2, reset before anything; otherwise the full stream.
    pub fn assemble(self, behaviour: Behaviour) -> BodyPlan {
        let SseParts {
            mut head,
            mut tokens,
            tail,
            error_event,
        } = self;
        let (keep, ending) = match behaviour {
            Behaviour::Reset => {
                return BodyPlan {
                    frames: Vec::new(),
                    ending: Ending::Abort(RESET_MESSAGE),
                }
            }
            Behaviour::Stall => (1, Ending::Stall),
            Behaviour::Drop => (2, Ending::Abort(DROP_MESSAGE)),
            Behaviour::Cut | Behaviour::MidstreamError => (2, Ending::Cut),
            Behaviour::Normal
            | Behaviour::Slow
            | Behaviour::Variants
            | Behaviour::Tool
            | Behaviour::Refusal
            | Behaviour::Empty => {
                head.append(&mut tokens);
                head.extend(tail);
                return BodyPlan {
                    frames: head,
                    ending: Ending::Complete,
                };
            }
        };
        tokens.truncate(keep);
        head.append(&mut tokens);
        if behaviour == Behaviour::MidstreamError {
            head.push(error_event);
        }
        BodyPlan {
            frames: head,
            ending,
        }
    }
}

/// Formats one SSE `data:` event.
pub(crate) fn sse_data(payload: impl std::fmt::Display) -> Bytes {
    Bytes::from(format!("data: {payload}\n\n"))
}

/// Formats one SSE event with an `event:` line.
pub(crate) fn sse_named(event: &str, payload: impl std::fmt::Display) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {payload}\n\n"))
}

struct Emitter {
    frames: std::vec::IntoIter<Frame>,
    ending: Option<Ending>,
    guard: CallGuard,
    shutdown: CancellationToken,
}

type Chunk = Result<Bytes, io::Error>;

fn aborted(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, msg.to_owned())
}

impl Emitter {
    /// Produces the next body chunk, or `None` when the body is complete.
    async fn step(mut self) -> Option<(Chunk, Self)> {
        if let Some(frame) = self.frames.next() {
            if !pause(frame.delay, &self.shutdown).await {
                return self.fail(SHUTDOWN_MESSAGE);
            }
            return Some((Ok(frame.data), self));
        }
        match self.ending.take()? {
            Ending::Complete => {
                self.guard.complete();
                None
            }
            Ending::Cut => {
                self.guard.settle();
                None
            }
            Ending::Abort(msg) => {
                // Give the server a chance to flush what was already produced (at
                // least the response head) before the body error closes the connection.
                tokio::task::yield_now().await;
                self.fail(msg)
            }
            Ending::Stall => {
                // Dropping the body (client gone) cancels this and counts as aborted.
                self.shutdown.cancelled().await;
                self.fail(SHUTDOWN_MESSAGE)
            }
        }
    }

    /// Ends the body with an error so the connection is closed mid-body.
    fn fail(mut self, msg: &str) -> Option<(Chunk, Self)> {
        self.guard.settle();
        self.ending = None;
        self.frames = Vec::new().into_iter();
        Some((Err(aborted(msg)), self))
    }
}

/// A `200` response whose body follows `plan`; `guard` settles the call.
pub(crate) fn respond(
    plan: BodyPlan,
    content_type: &'static str,
    guard: CallGuard,
    shutdown: CancellationToken,
) -> Response {
    let emitter = Emitter {
        frames: plan.frames.into_iter(),
        ending: Some(plan.ending),
        guard,
        shutdown,
    };
    let stream = futures::stream::unfold(emitter, Emitter::step);
    let mut resp = Body::from_stream(stream).into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if content_type == EVENT_STREAM {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts() -> SseParts {
        let f = |s: &'static str| Frame::now(s);
        SseParts {
            head: vec![f("h")],
            tokens: vec![f("1"), f("2"), f("3")],
            tail: vec![f("t")],
            error_event: f("e"),
        }
    }

    fn data(plan: &BodyPlan) -> String {
        plan.frames
            .iter()
            .map(|f| std::str::from_utf8(&f.data).expect("utf8"))
            .collect()
    }

    #[test]
    fn cuts() {
        let p = parts().assemble(Behaviour::Normal);
        assert_eq!((data(&p).as_str(), p.ending), ("h123t", Ending::Complete));
        let p = parts().assemble(Behaviour::Stall);
        assert_eq!((data(&p).as_str(), p.ending), ("h1", Ending::Stall));
        let p = parts().assemble(Behaviour::Drop);
        assert_eq!(
            (data(&p).as_str(), p.ending),
            ("h12", Ending::Abort(DROP_MESSAGE))
        );
        let p = parts().assemble(Behaviour::Cut);
        assert_eq!((data(&p).as_str(), p.ending), ("h12", Ending::Cut));
        let p = parts().assemble(Behaviour::MidstreamError);
        assert_eq!((data(&p).as_str(), p.ending), ("h12e", Ending::Cut));
        let p = parts().assemble(Behaviour::Reset);
        assert_eq!(
            (data(&p).as_str(), p.ending),
            ("", Ending::Abort(RESET_MESSAGE))
        );
    }

    #[test]
    fn broken_json_bodies() {
        let body = serde_json::json!({ "a": "bcdefgh" });
        let p = BodyPlan::broken_json(&body, Behaviour::Cut).expect("cut");
        assert_eq!(data(&p), r#"{"a":"b"#);
        assert!(BodyPlan::broken_json(&body, Behaviour::Normal).is_none());
    }
}
