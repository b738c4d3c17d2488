//! The WebSocket test client: connect with a key, subscribe, read frames until a job's end;
//! and the check that a job's events come without gaps.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Ws {
    pub inner: WsStream,
}

pub async fn ws_connect(base: &str, key: &str) -> Ws {
    let url = format!("{}/v1/ws", base.replace("http://", "ws://"));
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (inner, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    Ws { inner }
}

impl Ws {
    pub async fn send(&mut self, v: Value) {
        self.inner
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn subscribe(&mut self, job: Uuid, after: u64) {
        self.send(json!({"op": "subscribe", "job_id": job, "after": after}))
            .await;
    }

    /// The next JSON frame (panics after `timeout`); `None` when the server closed.
    pub async fn next(&mut self, timeout: Duration) -> Option<Value> {
        loop {
            let m = tokio::time::timeout(timeout, self.inner.next())
                .await
                .expect("timed out waiting for a websocket frame");
            match m {
                None => return None,
                Some(Err(_)) => return None,
                Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(_))) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Collects frames of `job` until its terminal event.
    pub async fn until_terminal(&mut self, job: Uuid, timeout: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let v = self
                .next(timeout)
                .await
                .expect("connection closed before the terminal event");
            if v["job_id"] != json!(job) {
                continue;
            }
            let t = v["type"].as_str().unwrap_or("").to_string();
            out.push(v);
            if matches!(
                t.as_str(),
                "succeeded" | "failed" | "cancelled" | "reset" | "error"
            ) {
                return out;
            }
        }
    }
}

/// Asserts events are strictly increasing by one in seq, starting after `after`.
pub fn assert_contiguous(events: &[Value], after: u64) {
    for (expect, e) in (after + 1..).zip(events.iter()) {
        let seq = e["seq"].as_u64();
        assert_eq!(
            seq,
            Some(expect),
            "events out of order or with a gap: {events:#?}"
        );
    }
}
