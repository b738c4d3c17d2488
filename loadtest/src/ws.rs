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

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How many WS errors / disconnects to print before going quiet.
const MAX_LOGGED: u64 = 5;

/// Open one authenticated WebSocket connection to `url` (`ws://.../v1/ws`).
pub async fn connect(url: &str, api: &Api) -> anyhow::Result<WsStream> {
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(AUTHORIZATION, api.auth.clone());
    let (ws, _resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_with_config(req, None, true),
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

/// `{"op":"subscribe","job_id":"…","after":N}`
pub fn subscribe_frame(id: &Uuid, after: u64) -> String {
    format!(r#"{{"op":"subscribe","job_id":"{id}","after":{after}}}"#)
}

/// What one connection task hands back at the end.
pub struct WsOutcome {
    /// Event delivery latencies (µs).
    pub hist: Histogram<u64>,
    /// Jobs subscribed here whose terminal event never arrived.
    pub pending: Vec<Uuid>,
}

/// Per-connection state; survives reconnects.
struct ConnState {
    idx: usize,
    api: Api,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    /// Jobs we follow → highest `seq` seen so far.
    pending: HashMap<Uuid, Option<u64>>,
    hist: Histogram<u64>,
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
        let Some(last) = self.pending.get_mut(&id) else {
            return; // not ours, or already terminal
        };
        if let Some(seq) = ev.seq {
            if matches!(*last, Some(l) if seq <= l) {
                return; // replay after a reconnect
            }
            *last = Some(seq);
        }
        if let Some(ts) = ev.ts {
            record_us(&mut self.hist, delivery_latency_us(now, ts));
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
            for (id, last) in &self.pending {
                if let Err(e) = sink
                    .feed(Message::text(subscribe_frame(id, last.unwrap_or(0))))
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
                            self.pending.insert(id, None);
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
                    Some(id) => { self.pending.insert(id, None); }
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
        st.pending.insert(id, None);
    }
    WsOutcome {
        hist: st.hist,
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
    fn subscribe_frame_is_json() {
        let v: serde_json::Value = serde_json::from_str(&subscribe_frame(&Uuid::nil(), 7)).unwrap();
        assert_eq!(v["op"], "subscribe");
        assert_eq!(v["after"], 7);
        assert_eq!(v["job_id"], Uuid::nil().to_string());
    }
}
