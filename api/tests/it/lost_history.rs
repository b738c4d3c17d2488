//! A job's event stream written anew after Redis lost it: a later attempt numbers past every
//! seq the lost stream can have held, and a client that had followed the lost stream is told to
//! start over (`reset`) instead of receiving the new attempt's events spliced onto the old
//! one's (they used to carry the seqs it had already seen, so its feed skipped the new
//! attempt's start and resumed in the middle of another call's output).

use std::time::Duration;

use redis::AsyncCommands;
use serde_json::json;
use sqlx::PgPool;
use switchyard_core::event::Event;
use switchyard_core::JobStatus;
use switchyard_queue::events::{Published, LOST_GAP};
use switchyard_queue::EventBus;
use uuid::Uuid;

use crate::support::{spawn_api_only, TestApp};

const T: Duration = Duration::from_secs(10);

fn delta(job: Uuid, seq: u64, attempt: i32) -> Event {
    Event::new(
        job,
        seq,
        attempt,
        "output.delta",
        json!({ "text": format!("a{attempt}s{seq}") }),
    )
}

fn running(job: Uuid, attempt: i32) -> Event {
    Event::status(job, 0, attempt, JobStatus::Running, json!({}))
}

/// Attempt 1 announced after `queued` (seq 1) and three deltas: seqs 2..=5.
async fn first_attempt(bus: &EventBus, id: Uuid) {
    assert_eq!(
        bus.begin_attempt_with(&running(id, 1), 1).await.unwrap(),
        Some(2)
    );
    for seq in 3..=5 {
        assert_eq!(
            bus.publish(&delta(id, seq, 1)).await.unwrap(),
            Published::Ok
        );
    }
}

/// Attempt 2 announced after the loss (Postgres counted seq 2): its first seq.
async fn second_attempt(bus: &EventBus, id: Uuid) -> u64 {
    bus.begin_attempt_with(&running(id, 2), 2)
        .await
        .unwrap()
        .expect("attempt 2 owns the job")
}

/// What Redis losing its data does to one job: its stream and its fence are gone.
async fn lose(app: &TestApp, id: Uuid) {
    let keys = app.keys();
    let mut r = app.redis().await;
    let n: i64 = r
        .del(&[keys.events(id), keys.event_meta(id)])
        .await
        .unwrap();
    assert!(n >= 1, "the job had a stream to lose");
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_later_attempt_that_finds_its_stream_lost_numbers_past_it(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let bus = app.bus().await;

    // a first attempt finding no stream (a reconciler's dispatch wrote no `queued` event, or
    // Redis lost only that) numbers on from Postgres' seq: nothing a client saw is contradicted
    let fresh = Uuid::now_v7();
    assert_eq!(
        bus.begin_attempt_with(&running(fresh, 1), 1).await.unwrap(),
        Some(2)
    );

    let id = app.submit_noop(json!({})).await;
    first_attempt(&bus, id).await;
    assert_eq!(bus.read(id, 0, 10).await.unwrap().base, 0, "a whole stream");
    lose(&app, id).await;
    // Postgres counted the `running` event (seq 2), not the deltas a client saw after it
    let seq = bus.begin_attempt_with(&running(id, 2), 2).await.unwrap();
    assert_eq!(seq, Some(2 + LOST_GAP + 1));
    let h = bus.read(id, 5, 10).await.unwrap();
    assert_eq!(h.base, 2 + LOST_GAP + 1);
    let seqs: Vec<u64> = h.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [2 + LOST_GAP + 1]);
    assert_eq!(h.events[0].attempt, 2);
    // the new attempt goes on from there, fenced as before
    let next = delta(id, 2 + LOST_GAP + 2, 2);
    assert_eq!(bus.publish(&next).await.unwrap(), Published::Ok);
    assert_eq!(
        bus.publish(&delta(id, 2 + LOST_GAP + 3, 1)).await.unwrap(),
        Published::Fenced
    );

    // the same run publishing on after the loss keeps its numbering: the stream starts at its
    // next seq, and the loss is recorded there
    let same = app.submit_noop(json!({})).await;
    first_attempt(&bus, same).await;
    lose(&app, same).await;
    assert_eq!(
        bus.publish(&delta(same, 6, 1)).await.unwrap(),
        Published::Ok
    );
    let h = bus.read(same, 0, 10).await.unwrap();
    assert_eq!(h.base, 6);
    assert_eq!(h.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [6]);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_client_of_a_lost_stream_is_reset_not_spliced_onto_the_next_attempt(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let bus = app.bus().await;
    let id = app.submit_noop(json!({})).await;
    first_attempt(&bus, id).await;

    let mut ws = app.ws().await;
    ws.subscribe(id, 0).await;
    for expect in 1..=5u64 {
        let v = ws.next(T).await.unwrap();
        assert_eq!(v["seq"], expect, "{v}");
    }

    lose(&app, id).await;
    let start = second_attempt(&bus, id).await;
    // the live client: told to start over, then the new attempt from its announcement
    let v = ws.next(T).await.unwrap();
    assert_eq!(v["type"], "reset", "{v}");
    assert_eq!(v["job_id"], json!(id));
    let v = ws.next(T).await.unwrap();
    assert_eq!(
        (v["seq"].as_u64(), v["attempt"].as_i64()),
        (Some(start), Some(2)),
        "{v}"
    );
    assert_eq!(v["data"]["status"], "running");

    // a client resuming from the lost stream (its last seq 4) is reset too
    let mut late = app.ws().await;
    late.subscribe(id, 4).await;
    let v = late.next(T).await.unwrap();
    assert_eq!(v["type"], "reset", "{v}");
    let v = late.next(T).await.unwrap();
    assert_eq!(v["seq"].as_u64(), Some(start), "{v}");

    // one resuming inside the new stream is not, and both go on with the new attempt's events
    let mut current = app.ws().await;
    current.subscribe(id, start).await;
    bus.publish(&delta(id, start + 1, 2)).await.unwrap();
    for c in [&mut ws, &mut late, &mut current] {
        let v = c.next(T).await.unwrap();
        assert_eq!(v["seq"].as_u64(), Some(start + 1), "{v}");
        assert_eq!(v["data"]["text"], format!("a2s{}", start + 1));
    }
    app.stop().await;
}

/// An SSE client reconnecting with the `Last-Event-ID` of the lost stream gets `reset` first.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn an_sse_reconnect_into_a_lost_stream_is_reset(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let bus = app.bus().await;
    let id = app.submit_noop(json!({})).await;
    first_attempt(&bus, id).await;
    lose(&app, id).await;
    let start = second_attempt(&bus, id).await;
    let end = Event::terminal(
        id,
        start + 1,
        2,
        JobStatus::Succeeded,
        Some(&json!({"ok": true})),
        None,
    );
    assert_eq!(bus.publish(&end).await.unwrap(), Published::Ok);
    let resp = app
        .http
        .get(app.url(&format!("/v1/jobs/{id}/events")))
        .bearer_auth(&app.key)
        .header("last-event-id", "5")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = crate::streaming::sse_events(resp).await;
    let kinds: Vec<&str> = events.iter().map(|(_, kind, _)| kind.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"reset"), "{events:#?}");
    let seqs: Vec<u64> = events
        .iter()
        .filter_map(|(_, _, v)| v["seq"].as_u64())
        .collect();
    assert_eq!(seqs, [start, start + 1], "{events:#?}");
    app.stop().await;
}
