//! WebSocket side: subscribe to submitted jobs and time event delivery.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::stats::{new_histogram, record_us, Shared, Terminal};
use crate::submit::{poll_until_terminal, truncate, Api};

pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How many WS errors / disconnects to print before going quiet.
const MAX_LOGGED: u64 = 5;

/// Open one authenticated WebSocket connection to `url` (`ws://.../v1/ws`).
pub async fn connect(url: &str, api: &Api) -> anyhow::Result<WsStream> {
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(AUTHORIZATION, api.auth.clone());
    let (ws, _resp) = tokio::time::timeout(
        Duration::from_secs(10),
        // tungstenite zeroes `read_buffer_size` bytes on every read; its 128 KiB default made the
        // load tool spend its time in memset
        tokio_tungstenite::connect_async_with_config(
            req,
            Some(
                tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                    .read_buffer_size(16 * 1024),
            ),
            true,
        ),
    )
    .await
    .map_err(|_| anyhow::anyhow!("WebSocket connect to {url} timed out"))??;
    Ok(ws)
}

/// Event `type` values we care about; anything else is `Unknown` and ignored.
#[derive(Deserialize, Copy, Clone, Debug, PartialEq, Eq)]
enum EventType {
    #[serde(rename = "status")]
    Status,
    #[serde(rename = "output.delta")]
    OutputDelta,
    #[serde(rename = "succeeded")]
    Succeeded,
    #[serde(rename = "failed")]
    Failed,
    #[serde(rename = "cancelled")]
    Cancelled,
    #[serde(rename = "reset")]
    Reset,
    #[serde(rename = "error")]
    Error,
    #[serde(other)]
    Unknown,
}

impl EventType {
    fn terminal(self) -> Option<Terminal> {
        match self {
            EventType::Succeeded => Some(Terminal::Succeeded),
            EventType::Failed => Some(Terminal::Failed),
            EventType::Cancelled => Some(Terminal::Cancelled),
            _ => None,
        }
    }
}

#[derive(Deserialize, Debug)]
struct ErrorBody {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// A server frame, decoded without allocating (`data` is skipped, `ts` is
/// parsed straight from the input buffer into microseconds since the epoch).
#[derive(Deserialize, Debug)]
struct ServerFrame {
    #[serde(default)]
    job_id: Option<Uuid>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(rename = "type", default)]
    kind: Option<EventType>,
    #[serde(default, deserialize_with = "de_ts_us")]
    ts: Option<i64>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

/// Parse an RFC3339 timestamp into microseconds since the Unix epoch.
pub fn parse_ts_us(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_micros())
}

/// Microseconds since the Unix epoch, now.
#[inline]
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Delivery latency in µs: `now - ts`, clamped at 0 (clock granularity).
#[inline]
pub fn delivery_latency_us(now_us: i64, ts_us: i64) -> u64 {
    now_us.saturating_sub(ts_us).max(0) as u64
}

fn de_ts_us<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<i64>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an RFC3339 timestamp string")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            Ok(parse_ts_us(s))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

/// Whether an event was published after the tool subscribed to its job
/// (delivered live) or before (replayed from the job's history).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum EventOrigin {
    /// `ts >= subscribed_at`: published after the subscribe frame was sent.
    Live,
    /// `ts < subscribed_at` (or no subscribe time known): replayed from history.
    Replayed,
}

/// Classify an event by its publish time `ts_us` against the time the
/// subscribe frame for its job was sent (both µs since the Unix epoch).
#[inline]
pub fn classify_event(ts_us: i64, subscribed_at_us: Option<i64>) -> EventOrigin {
    match subscribed_at_us {
        Some(sub) if ts_us >= sub => EventOrigin::Live,
        _ => EventOrigin::Replayed,
    }
}

/// `{"op":"subscribe","job_id":"…","after":N}`
pub fn subscribe_frame(id: &Uuid, after: u64) -> String {
    format!(r#"{{"op":"subscribe","job_id":"{id}","after":{after}}}"#)
}

/// What one connection task hands back at the end.
pub struct WsOutcome {
    /// Event delivery latencies (µs), all events.
    pub hist: Histogram<u64>,
    /// Latencies (µs) of events published after their job's subscribe frame was sent.
    pub live_hist: Histogram<u64>,
    /// Latencies (µs) of events published before that (replayed from history).
    pub replay_hist: Histogram<u64>,
    /// Jobs subscribed here whose terminal event never arrived.
    pub pending: Vec<Uuid>,
}

/// What a connection knows about one job it follows.
#[derive(Copy, Clone, Debug, Default)]
struct Follow {
    /// Highest `seq` seen so far.
    last_seq: Option<u64>,
    /// When (µs since the epoch, same clock as `ts`) the latest subscribe frame
    /// for this job was sent; `None` until it has been sent on a connection.
    subscribed_at: Option<i64>,
}

/// Per-connection state; survives reconnects.
struct ConnState {
    idx: usize,
    api: Api,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    /// Jobs we follow.
    pending: HashMap<Uuid, Follow>,
    /// All event latencies.
    hist: Histogram<u64>,
    /// Events published after the subscribe frame was sent.
    live_hist: Histogram<u64>,
    /// Events published before it (replayed from history).
    replay_hist: Histogram<u64>,
}

enum Exit {
    Stop,
    Disconnected(String),
}

impl ConnState {
    /// Stop following `id` over WS and poll it over HTTP instead.
    fn hand_to_poller(&mut self, id: Uuid) {
        if self.pending.remove(&id).is_some() {
            self.shared.polling.lock().unwrap().insert(id);
            tokio::spawn(poll_until_terminal(
                self.api.clone(),
                self.shared.clone(),
                id,
                self.stop.clone(),
            ));
        }
    }

    fn log_ws_error(&self, what: impl FnOnce() -> String) {
        let n = self.shared.ws_errors.fetch_add(1, Ordering::Relaxed);
        if n < MAX_LOGGED {
            eprintln!("ws[{}]: {}", self.idx, what());
        }
    }

    /// Handle one text frame from the server.
    fn handle(&mut self, text: &str, now: i64) {
        let ev: ServerFrame = match serde_json::from_str(text) {
            Ok(ev) => ev,
            Err(e) => {
                self.log_ws_error(|| format!("undecodable frame ({e}): {}", truncate(text, 300)));
                return;
            }
        };
        let kind = ev.kind.unwrap_or(EventType::Unknown);
        match kind {
            EventType::Reset => {
                self.shared.resets.fetch_add(1, Ordering::Relaxed);
                if let Some(id) = ev.job_id {
                    self.hand_to_poller(id);
                }
                return;
            }
            EventType::Error => {
                let (code, msg) = ev
                    .error
                    .as_ref()
                    .map(|e| {
                        (
                            e.code.as_deref().unwrap_or("?"),
                            e.message.as_deref().unwrap_or(""),
                        )
                    })
                    .unwrap_or(("?", ""));
                self.log_ws_error(|| {
                    format!("server error job={:?} code={code} message={msg}", ev.job_id)
                });
                if let Some(id) = ev.job_id {
                    self.hand_to_poller(id);
                }
                return;
            }
            _ => {}
        }
        let Some(id) = ev.job_id else { return };
        let Some(follow) = self.pending.get_mut(&id) else {
            return; // not ours, or already terminal
        };
        if let Some(seq) = ev.seq {
            if matches!(follow.last_seq, Some(l) if seq <= l) {
                return; // replay after a reconnect
            }
            follow.last_seq = Some(seq);
        }
        if let Some(ts) = ev.ts {
            let us = delivery_latency_us(now, ts);
            record_us(&mut self.hist, us);
            match classify_event(ts, follow.subscribed_at) {
                EventOrigin::Live => record_us(&mut self.live_hist, us),
                EventOrigin::Replayed => record_us(&mut self.replay_hist, us),
            }
        }
        if let Some(t) = kind.terminal() {
            self.pending.remove(&id);
            self.shared.record_terminal(t, true, true);
        }
    }

    /// Drive one live connection until it drops or we are told to stop.
    async fn run_conn(
        &mut self,
        ws: WsStream,
        rx: &mut mpsc::Receiver<Uuid>,
        rx_open: &mut bool,
    ) -> Exit {
        let (mut sink, mut stream) = ws.split();
        // Re-subscribe whatever we were following before a reconnect.
        if !self.pending.is_empty() {
            for (id, follow) in self.pending.iter_mut() {
                follow.subscribed_at = Some(now_us());
                if let Err(e) = sink
                    .feed(Message::text(subscribe_frame(
                        id,
                        follow.last_seq.unwrap_or(0),
                    )))
                    .await
                {
                    return Exit::Disconnected(e.to_string());
                }
            }
            if let Err(e) = sink.flush().await {
                return Exit::Disconnected(e.to_string());
            }
        }
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                biased;
                _ = crate::stopped(&mut stop) => {
                    let _ = sink.send(Message::Close(None)).await;
                    return Exit::Stop;
                }
                msg = stream.next() => match msg {
                    Some(Ok(Message::Text(t))) => self.handle(t.as_str(), now_us()),
                    Some(Ok(Message::Binary(b))) => match std::str::from_utf8(&b) {
                        Ok(s) => self.handle(s, now_us()),
                        Err(_) => self.log_ws_error(|| "non-UTF-8 binary frame".to_string()),
                    },
                    Some(Ok(Message::Close(frame))) => {
                        return Exit::Disconnected(format!("server closed: {frame:?}"));
                    }
                    Some(Ok(_)) => {} // ping/pong: tungstenite answers pings while we keep reading
                    Some(Err(e)) => return Exit::Disconnected(e.to_string()),
                    None => return Exit::Disconnected("stream ended".to_string()),
                },
                id = rx.recv(), if *rx_open => match id {
                    Some(id) => {
                        // Batch whatever else is queued into one flush.
                        let mut next = Some(id);
                        let mut n = 0;
                        while let Some(id) = next {
                            self.pending.insert(id, Follow {
                                last_seq: None,
                                subscribed_at: Some(now_us()),
                            });
                            if let Err(e) = sink.feed(Message::text(subscribe_frame(&id, 0))).await {
                                return Exit::Disconnected(e.to_string());
                            }
                            n += 1;
                            next = if n < 256 { rx.try_recv().ok() } else { None };
                        }
                        if let Err(e) = sink.flush().await {
                            return Exit::Disconnected(e.to_string());
                        }
                    }
                    None => *rx_open = false,
                },
            }
        }
    }

    /// While disconnected: keep accepting ids (subscribed after reconnect) for `delay`.
    /// Returns false if we were told to stop.
    async fn wait_disconnected(
        &mut self,
        rx: &mut mpsc::Receiver<Uuid>,
        rx_open: &mut bool,
        delay: Duration,
    ) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                _ = crate::stopped(&mut stop) => return false,
                _ = &mut sleep => return true,
                id = rx.recv(), if *rx_open => match id {
                    Some(id) => { self.pending.insert(id, Follow::default()); }
                    None => *rx_open = false,
                },
            }
        }
    }
}

/// One WebSocket connection task: subscribes every job id it receives on `rx`,
/// records delivery latency for each event and counts terminal events.
/// Reconnects (re-subscribing with `after` = last seen seq) if the socket drops.
pub async fn connection_task(
    idx: usize,
    url: String,
    api: Api,
    shared: Arc<Shared>,
    first: WsStream,
    mut rx: mpsc::Receiver<Uuid>,
    stop: watch::Receiver<bool>,
) -> WsOutcome {
    let mut st = ConnState {
        idx,
        api,
        shared,
        stop,
        pending: HashMap::new(),
        hist: new_histogram(),
        live_hist: new_histogram(),
        replay_hist: new_histogram(),
    };
    let mut rx_open = true;
    let mut conn = Some(first);
    let mut backoff = Duration::from_millis(100);
    loop {
        let ws = match conn.take() {
            Some(ws) => ws,
            None => match connect(&url, &st.api).await {
                Ok(ws) => {
                    st.shared.ws_reconnects.fetch_add(1, Ordering::Relaxed);
                    backoff = Duration::from_millis(100);
                    ws
                }
                Err(e) => {
                    st.log_ws_error(|| format!("reconnect failed: {e:#}"));
                    if !st.wait_disconnected(&mut rx, &mut rx_open, backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        match st.run_conn(ws, &mut rx, &mut rx_open).await {
            Exit::Stop => break,
            Exit::Disconnected(why) => {
                if *st.stop.borrow() {
                    break;
                }
                st.log_ws_error(|| format!("connection lost: {why}; reconnecting"));
                if !st.wait_disconnected(&mut rx, &mut rx_open, backoff).await {
                    break;
                }
            }
        }
    }
    // Anything still queued in the channel was never subscribed: also pending.
    while let Ok(id) = rx.try_recv() {
        st.pending.insert(id, Follow::default());
    }
    WsOutcome {
        hist: st.hist,
        live_hist: st.live_hist,
        replay_hist: st.replay_hist,
        pending: st.pending.into_keys().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc3339_micros() {
        let us = parse_ts_us("2024-05-01T12:00:00.123456Z").unwrap();
        assert_eq!(us % 1_000_000, 123_456);
        assert_eq!(us, 1_714_564_800_123_456);
        assert_eq!(parse_ts_us("2024-05-01T14:00:00.123456+02:00"), Some(us));
        assert_eq!(parse_ts_us("not a time"), None);
    }

    #[test]
    fn latency_is_clamped() {
        assert_eq!(delivery_latency_us(1_000, 400), 600);
        assert_eq!(delivery_latency_us(400, 1_000), 0);
    }

    #[test]
    fn decodes_frames() {
        let id = Uuid::nil();
        let f: ServerFrame = serde_json::from_str(&format!(
            r#"{{"job_id":"{id}","seq":3,"attempt":1,"type":"output.delta","data":{{"text":"he\"llo"}},"ts":"2024-05-01T12:00:00.000001Z"}}"#
        ))
        .unwrap();
        assert_eq!(f.job_id, Some(id));
        assert_eq!(f.seq, Some(3));
        assert_eq!(f.kind, Some(EventType::OutputDelta));
        assert_eq!(f.ts, Some(1_714_564_800_000_001));

        let f: ServerFrame =
            serde_json::from_str(r#"{"job_id":null,"type":"something.new","ts":null}"#).unwrap();
        assert_eq!(f.kind, Some(EventType::Unknown));
        assert_eq!(f.ts, None);
        assert_eq!(f.job_id, None);

        let f: ServerFrame = serde_json::from_str(
            r#"{"type":"error","error":{"code":"not_found","message":"no such job"}}"#,
        )
        .unwrap();
        assert_eq!(f.kind, Some(EventType::Error));
        assert_eq!(f.error.unwrap().code.as_deref(), Some("not_found"));

        let f: ServerFrame = serde_json::from_str(r#"{"type":"succeeded"}"#).unwrap();
        assert_eq!(f.kind.unwrap().terminal(), Some(Terminal::Succeeded));
    }

    #[test]
    fn classifies_live_and_replayed_events() {
        let sub = 1_714_564_800_000_000;
        // Published after (or exactly when) the subscribe frame was sent: live.
        assert_eq!(classify_event(sub, Some(sub)), EventOrigin::Live);
        assert_eq!(classify_event(sub + 1, Some(sub)), EventOrigin::Live);
        // Published before: replayed from history.
        assert_eq!(classify_event(sub - 1, Some(sub)), EventOrigin::Replayed);
        // No subscribe time known: cannot be live.
        assert_eq!(classify_event(sub, None), EventOrigin::Replayed);
    }

    #[test]
    fn handle_splits_live_and_replayed_latency() {
        let (_stop_tx, stop) = watch::channel(false);
        let mut st = ConnState {
            idx: 0,
            api: Api::new("http://127.0.0.1:1", "sy_test", 1).unwrap(),
            shared: Arc::new(Shared::new(std::time::Instant::now())),
            stop,
            pending: HashMap::new(),
            hist: new_histogram(),
            live_hist: new_histogram(),
            replay_hist: new_histogram(),
        };
        let id = Uuid::from_u128(1);
        let sub = parse_ts_us("2024-05-01T12:00:01Z").unwrap();
        st.pending.insert(
            id,
            Follow {
                last_seq: None,
                subscribed_at: Some(sub),
            },
        );
        let frame = |seq: u64, kind: &str, ts: &str| {
            format!(r#"{{"job_id":"{id}","seq":{seq},"type":"{kind}","ts":"{ts}"}}"#)
        };
        let now = sub + 5_000;
        // Published 0.5s before the subscribe: replayed.
        st.handle(&frame(1, "status", "2024-05-01T12:00:00.5Z"), now);
        // Published 1ms after the subscribe: live.
        st.handle(&frame(2, "status", "2024-05-01T12:00:01.001Z"), now);
        // Duplicate seq: ignored entirely.
        st.handle(&frame(2, "status", "2024-05-01T12:00:01.001Z"), now);
        st.handle(&frame(3, "succeeded", "2024-05-01T12:00:01.002Z"), now);
        assert_eq!(st.hist.len(), 3);
        assert_eq!(st.live_hist.len(), 2);
        assert_eq!(st.replay_hist.len(), 1);
        // 505ms for the replayed event, 4ms and 3ms for the live ones.
        assert!(st.replay_hist.min() >= 504_000, "{}", st.replay_hist.min());
        assert!(st.live_hist.max() <= 4_010, "{}", st.live_hist.max());
        assert!(st.pending.is_empty());
        assert_eq!(st.shared.succeeded.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn subscribe_frame_is_json() {
        let v: serde_json::Value = serde_json::from_str(&subscribe_frame(&Uuid::nil(), 7)).unwrap();
        assert_eq!(v["op"], "subscribe");
        assert_eq!(v["after"], 7);
        assert_eq!(v["job_id"], Uuid::nil().to_string());
    }
}
