//! Events over WebSocket and SSE: order, resume (`after`, `Last-Event-ID`), many jobs per
//! connection, protocol errors.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{assert_contiguous, spawn_api_only, spawn_app, spawn_app_with, Opts, TestApp};

const T: Duration = Duration::from_secs(20);

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn websocket_streams_tokens_in_order(pool: PgPool) {
    websocket_streams_tokens_in_order_on(pool, Opts::default()).await
}

/// The test above on the Redis that `base` names (`cluster.rs` runs it on a Redis Cluster).
pub(crate) async fn websocket_streams_tokens_in_order_on(pool: PgPool, base: Opts) {
    let app = spawn_app_with(pool, base).await;
    let mut ws = app.ws().await;
    let job = app
        .submit(json!({"kind": "llm.chat", "input": {"model": "mock-echo", "messages": [{"role": "user", "content": "one two three four five six"}]}}))
        .await;
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    ws.subscribe(id, 0).await;
    let events = ws.until_terminal(id, T).await;
    assert_contiguous(&events, 0);
    assert_eq!(events[0]["type"], "status");
    assert_eq!(events[0]["data"]["status"], "queued");
    assert_eq!(events[1]["data"]["status"], "running");
    assert_eq!(events[1]["attempt"], 1);
    let last = events.last().unwrap();
    assert_eq!(last["type"], "succeeded");
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "output.delta")
        .map(|e| e["data"]["text"].as_str().unwrap().to_string())
        .collect();
    let expected = switchyard_mock_llm::expected_text(
        &[("user".into(), "one two three four five six".into())],
        None,
    );
    assert_eq!(text, expected);
    assert_eq!(last["data"]["output"]["text"], expected);
    for e in &events {
        assert!(e["ts"].is_string());
        assert_eq!(e["job_id"], json!(id));
    }
    app.stop().await;
}

/// `stream: false`: the reply arrives whole in the terminal event, with no token events
/// before it (a non-streamed chat completion asks for this), also when the response cache
/// answers; a reply cached by such a job still streams its tokens to a job that streams.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_chat_job_that_does_not_stream_emits_no_token_events(pool: PgPool) {
    let app = spawn_app(pool).await;
    let mut ws = app.ws().await;
    let content = "one two three four five six";
    let expected = switchyard_mock_llm::expected_text(&[("user".into(), content.into())], None);
    // (input.stream, input.cache, answered from the cache)
    for (stream, cache, hit) in [
        (Some(false), false, false),
        (Some(false), true, false),
        (Some(false), true, true),
        (None, true, true),
    ] {
        let mut input = json!({"model": "mock-echo", "cache": cache,
            "messages": [{"role": "user", "content": content}]});
        if let Some(s) = stream {
            input["stream"] = json!(s);
        }
        let job = app
            .submit(json!({"kind": "llm.chat", "input": input}))
            .await;
        let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
        ws.subscribe(id, 0).await;
        let events = ws.until_terminal(id, T).await;
        assert_contiguous(&events, 0);
        let last = events.last().unwrap();
        assert_eq!(last["type"], "succeeded");
        assert_eq!(last["data"]["output"]["text"], expected.as_str());
        assert_eq!(last["data"]["output"]["cached"], hit, "{last:#?}");
        let deltas: String = events
            .iter()
            .filter(|e| e["type"] == "output.delta")
            .map(|e| e["data"]["text"].as_str().unwrap().to_string())
            .collect();
        if stream == Some(false) {
            let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
            assert_eq!(kinds, ["status", "status", "succeeded"], "{events:#?}");
        } else {
            assert_eq!(deltas, expected);
        }
    }
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn websocket_resumes_after_and_replays_finished_jobs(pool: PgPool) {
    let app = spawn_app(pool).await;
    let id = app.submit_noop(json!({"deltas": 5})).await;
    app.wait_status(id, "succeeded", T).await;
    let mut ws = app.ws().await;
    ws.subscribe(id, 0).await;
    let all = ws.until_terminal(id, T).await;
    assert_contiguous(&all, 0);
    assert!(all.len() >= 4, "{all:#?}");
    // resume from the middle: only later events, no duplicates, still ends with the terminal one
    let mid = all[1]["seq"].as_u64().unwrap();
    ws.subscribe(id, mid).await;
    let rest = ws.until_terminal(id, T).await;
    assert_contiguous(&rest, mid);
    assert_eq!(rest, all[mid as usize..].to_vec());
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn many_jobs_share_one_connection(pool: PgPool) {
    let app = spawn_app(pool).await;
    let mut ws = app.ws().await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let id = app.submit_noop(json!({"deltas": i, "sleep_ms": 50})).await;
        ws.subscribe(id, 0).await;
        ids.push(id);
    }
    let mut per_job: std::collections::HashMap<Uuid, Vec<Value>> = Default::default();
    let mut finished = 0;
    while finished < ids.len() {
        let v = ws.next(T).await.expect("open");
        let id: Uuid = v["job_id"].as_str().unwrap().parse().unwrap();
        let t = v["type"].as_str().unwrap().to_string();
        per_job.entry(id).or_default().push(v);
        if t == "succeeded" {
            finished += 1;
        }
    }
    for id in ids {
        assert_contiguous(&per_job[&id], 0);
    }
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn websocket_protocol_errors(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let mut ws = app.ws().await;
    ws.inner
        .send(tokio_tungstenite::tungstenite::Message::Text("nope".into()))
        .await
        .unwrap();
    let e = ws.next(T).await.unwrap();
    assert_eq!(
        (e["type"].as_str(), e["error"]["code"].as_str()),
        (Some("error"), Some("malformed_json"))
    );
    ws.send(json!({"op": "subscribe"})).await;
    let e = ws.next(T).await.unwrap();
    assert_eq!(e["error"]["field"], "job_id");
    ws.send(json!({"op": "dance", "job_id": Uuid::now_v7()}))
        .await;
    let e = ws.next(T).await.unwrap();
    assert_eq!(e["error"]["field"], "op");
    ws.subscribe(Uuid::now_v7(), 0).await;
    let e = ws.next(T).await.unwrap();
    assert_eq!(e["error"]["code"], "not_found");
    assert!(e["job_id"].is_string());
    // the connection survives all of that: a real subscription still works
    let id = app.submit_noop(json!({})).await;
    ws.subscribe(id, 0).await;
    let first = ws.next(T).await.unwrap();
    assert_eq!(first["seq"], 1);
    // unsubscribe stops the flow; cancelling the job would otherwise send more
    ws.send(json!({"op": "unsubscribe", "job_id": id})).await;
    app.stop().await;
}

use futures::SinkExt;

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn websocket_needs_a_key(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let url = format!("{}/v1/ws", app.base.replace("http://", "ws://"));
    let err = tokio_tungstenite::connect_async(url.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    // ?token= for browsers
    let (_ws, _) = tokio_tungstenite::connect_async(format!("{url}?token={}", app.key))
        .await
        .unwrap();
    app.stop().await;
}

pub(crate) async fn sse_events(resp: reqwest::Response) -> Vec<(Option<String>, String, Value)> {
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = tokio::time::timeout(T, body.next())
        .await
        .expect("sse timed out")
    {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf[..end].to_string();
            buf.drain(..end + 2);
            let (mut id, mut ev, mut data) = (None, String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("event:") {
                    ev = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if !data.is_empty() {
                out.push((id, ev, serde_json::from_str(&data).unwrap()));
            }
        }
    }
    out
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn sse_streams_and_resumes_with_last_event_id(pool: PgPool) {
    sse_streams_and_resumes_with_last_event_id_on(pool, Opts::default()).await
}

/// The test above on the Redis that `base` names (`cluster.rs` runs it on a Redis Cluster).
pub(crate) async fn sse_streams_and_resumes_with_last_event_id_on(pool: PgPool, base: Opts) {
    let app = spawn_app_with(pool, base).await;
    let id = app.submit_noop(json!({"deltas": 3})).await;
    let r = app
        .auth(app.http.get(app.url(&format!("/v1/jobs/{id}/events"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let all = sse_events(r).await;
    let values: Vec<Value> = all.iter().map(|(_, _, v)| v.clone()).collect();
    assert_contiguous(&values, 0);
    for (sid, ev, v) in &all {
        assert_eq!(sid.as_deref(), Some(v["seq"].to_string().as_str()));
        assert_eq!(ev, v["type"].as_str().unwrap());
    }
    assert_eq!(all.last().unwrap().1, "succeeded");
    // resume: the stream closes after the terminal event, so a reconnect with Last-Event-ID
    let r = app
        .auth(app.http.get(app.url(&format!("/v1/jobs/{id}/events"))))
        .header("last-event-id", "2")
        .send()
        .await
        .unwrap();
    let rest = sse_events(r).await;
    let rest: Vec<Value> = rest.into_iter().map(|(_, _, v)| v).collect();
    assert_contiguous(&rest, 2);
    assert_eq!(rest, values[2..].to_vec());
    // ?token= and ?after= for EventSource clients
    let r = app
        .http
        .get(app.url(&format!("/v1/jobs/{id}/events?token={}&after=3", app.key)))
        .send()
        .await
        .unwrap();
    let tail: Vec<Value> = sse_events(r).await.into_iter().map(|(_, _, v)| v).collect();
    assert_eq!(tail, values[3..].to_vec());
    // the largest `after` there is reads nothing rather than overflowing (a panic would cut
    // the stream with an error)
    let r = app
        .auth(
            app.http
                .get(app.url(&format!("/v1/jobs/{id}/events?after={}", u64::MAX))),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    if let Ok(body) = tokio::time::timeout(Duration::from_millis(1500), r.text()).await {
        let body = body.expect("the stream ends cleanly");
        assert!(!body.contains("\"seq\""), "{body}");
    }
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn websocket_closes_with_1012_when_the_api_drains(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let mut ws = app.ws().await;
    let id = app.submit_noop(json!({})).await;
    ws.subscribe(id, 0).await;
    assert_eq!(ws.next(T).await.unwrap()["seq"], 1);
    app.stop_api();
    loop {
        let m = tokio::time::timeout(T, ws.inner.next())
            .await
            .expect("close frame");
        match m {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => {
                assert_eq!(
                    u16::from(f.code),
                    1012,
                    "service restart: reconnect elsewhere"
                );
                break;
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
    app.stop().await;
}

/// A job with a history of 3,000 events of 8 KiB (24 MiB, far beyond socket buffers and the
/// connection's 1,024 frames), and a WebSocket subscribed to it from the start over a TCP
/// socket with a tiny receive window.
async fn long_history_over_a_narrow_socket(
    app: &TestApp,
) -> (
    Uuid,
    tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
) {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let id = app.submit_noop(json!({})).await;
    let bus = app.bus().await;
    bus.begin_attempt(id, 1).await.unwrap();
    let text = "x".repeat(8 * 1024);
    for seq in 2..3002u64 {
        let ev =
            switchyard_core::event::Event::new(id, seq, 1, "output.delta", json!({"text": text}));
        bus.publish(&ev).await.unwrap();
    }
    let addr = app.base.trim_start_matches("http://").to_string();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(addr.parse().unwrap()).await.unwrap();
    let mut req = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", app.key).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    ws.send(Message::Text(
        json!({"op": "subscribe", "job_id": id, "after": 0})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    (id, ws)
}

/// A client that keeps reading gets the whole of a long history, however narrow its socket:
/// the replay waits for room in the connection's buffer (it used to fill the buffer in a burst
/// and close the connection with 1008, so such a history could never be read).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_websocket_client_that_reads_gets_a_long_history_whole(pool: PgPool) {
    use tokio_tungstenite::tungstenite::Message;

    let app = spawn_api_only(pool).await;
    let (_, mut ws) = long_history_over_a_narrow_socket(&app).await;
    let mut seqs = Vec::new();
    while seqs.len() < 3001 {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .expect("the history stopped")
            .expect("the connection closed")
            .unwrap();
        match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                seqs.push(v["seq"].as_u64().unwrap());
            }
            Message::Close(frame) => panic!("closed after {} events: {frame:?}", seqs.len()),
            _ => {}
        }
    }
    assert_eq!(seqs, (1..=3001).collect::<Vec<u64>>());
    assert_eq!(
        app.metric("switchyard_ws_slow_disconnects_total")
            .await
            .unwrap_or(0.0),
        0.0
    );
    app.stop().await;
}

/// A client that stops reading (a tiny TCP receive window, nothing read) fills its buffer: the
/// server closes it with 1008 instead of buffering without bound, and what it did receive is a
/// gap-free prefix of the job's events.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_websocket_client_that_stops_reading_is_closed_with_1008(pool: PgPool) {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::Message;

    let app = spawn_api_only(pool).await;
    let (id, mut ws) = long_history_over_a_narrow_socket(&app).await;

    // read nothing until the server gives up on this client
    let series = "switchyard_ws_slow_disconnects_total";
    let mut slow = 0.0;
    for _ in 0..400 {
        slow = app.metric(series).await.unwrap_or(0.0);
        if slow >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        slow, 1.0,
        "the server never noticed the client stopped reading"
    );

    // now read: a gap-free prefix of the events, then the 1008 close
    let mut seqs = Vec::new();
    let mut close = None;
    while let Some(m) = tokio::time::timeout(T, ws.next())
        .await
        .expect("no close frame")
    {
        match m.unwrap() {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                seqs.push(v["seq"].as_u64().unwrap());
            }
            Message::Close(frame) => {
                close = frame;
                break;
            }
            _ => {}
        }
    }
    let close = close.expect("closed without a close frame");
    assert_eq!(close.code, CloseCode::Policy, "{close:?}");
    assert!(
        !seqs.is_empty() && seqs.len() < 3001,
        "{} events",
        seqs.len()
    );
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    // the server let go of the connection and keeps serving
    for _ in 0..100 {
        if app.metric("switchyard_ws_connections").await == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.metric("switchyard_ws_connections").await, Some(0.0));
    assert_eq!(app.get_job(id).await["status"], "queued");
    app.stop().await;
}

/// A finished job with more events than one history page: a late reader gets every one of
/// them, then the end (the end was made up from Postgres right after the first page); and a
/// reader that resumes at the end (an EventSource reconnecting with the terminal event's id)
/// gets a clean end, not `reset`.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_long_finished_stream_is_read_whole_and_resuming_at_its_end_is_quiet(pool: PgPool) {
    let app = crate::support::spawn_api_only(pool).await;
    let id = app.submit_noop(json!({})).await;
    let bus = app.bus().await;
    let t = std::time::Instant::now();
    while bus.read(id, 0, 1).await.unwrap().events.is_empty() {
        assert!(t.elapsed() < T, "no queued event");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // a run of 600 deltas whose end reached Postgres only (its publish was lost)
    for seq in 2..=601 {
        let ev = switchyard_core::Event::new(id, seq, 1, "output.delta", json!({"text": "x"}));
        bus.publish(&ev).await.unwrap();
    }
    sqlx::query(
        "UPDATE jobs SET status = 'succeeded', attempt = 1, output = '{}', event_seq = 602,
             started_at = now(), finished_at = now() WHERE id = $1",
    )
    .bind(id)
    .execute(app.store.pool())
    .await
    .unwrap();
    let read = |last: Option<u64>| {
        let mut req = app.auth(app.http.get(app.url(&format!("/v1/jobs/{id}/events"))));
        if let Some(l) = last {
            req = req.header("last-event-id", l.to_string());
        }
        req.send()
    };
    let all: Vec<Value> = sse_events(read(None).await.unwrap())
        .await
        .into_iter()
        .map(|(_, _, v)| v)
        .collect();
    assert_contiguous(&all, 0);
    assert_eq!(all.len(), 602, "every event, then the end");
    assert_eq!(all.last().unwrap()["type"], "succeeded");
    // resuming at the end: nothing more, and no reset
    let r = read(Some(602)).await.unwrap();
    assert_eq!(r.status(), 200);
    let body = tokio::time::timeout(T, r.text()).await.unwrap().unwrap();
    assert!(
        !body.contains("reset") && !body.contains("\"seq\""),
        "{body}"
    );
    // resuming at a delta the end does not follow in Postgres' count: history was lost
    sqlx::query("UPDATE jobs SET event_seq = 600 WHERE id = $1")
        .bind(id)
        .execute(app.store.pool())
        .await
        .unwrap();
    let body = tokio::time::timeout(T, read(Some(601)).await.unwrap().text())
        .await
        .unwrap()
        .unwrap();
    assert!(body.contains("reset"), "{body}");
    app.stop().await;
}

/// A WebSocket opened with a key that is revoked meanwhile does not outlive it: its next
/// operation (or ping) closes the connection with 1008.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_websocket_ends_when_its_key_is_revoked(pool: PgPool) {
    use tokio_tungstenite::tungstenite::Message;
    let app = crate::support::spawn_api_only(pool).await;
    let (key_id, key) = app.developer_key("ws").await;
    let mut ws = crate::support::ws_connect(&app.base, &key).await;
    let first = app.submit_noop(json!({})).await;
    ws.subscribe(first, 0).await;
    let frame = ws.next(T).await.expect("events while the key is valid");
    assert_eq!(frame["job_id"], json!(first), "{frame}");
    // revoked through the API: this replica forgets its cached principal at once
    app.revoke_key(key_id).await;
    let second = app.submit_noop(json!({})).await;
    ws.subscribe(second, 0).await;
    let closed = loop {
        match tokio::time::timeout(T, ws.inner.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(c))) => break c.map(|c| u16::from(c.code)),
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_ne!(
                    v["job_id"],
                    json!(second),
                    "no events after revocation: {v}"
                );
            }
            Some(Ok(_)) => {}
            None | Some(Err(_)) => break None,
        }
    };
    assert_eq!(closed, Some(1008));
    app.stop().await;
}

/// An SSE stream ends once its key is revoked, as a WebSocket does (it went on until the job
/// ended, however long): the end of the job is not sent to a revoked key.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn an_sse_stream_ends_when_its_key_is_revoked(pool: PgPool) {
    let app = crate::support::spawn_app(pool).await;
    let (key_id, key) = app.developer_key("sse").await;
    let id = app.submit_noop(json!({"sleep_ms": 2500})).await;
    let r = app
        .http
        .get(app.url(&format!("/v1/jobs/{id}/events")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.revoke_key(key_id).await;
    let events = tokio::time::timeout(T, sse_events(r))
        .await
        .expect("the stream ends");
    assert!(
        !events.iter().any(|(_, kind, _)| kind == "succeeded"),
        "{events:?}"
    );
    app.wait_status(id, "succeeded", T).await;
    app.stop().await;
}
