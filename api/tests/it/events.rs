//! Publishing the events of many jobs in one pipeline (what the worker's publisher does): an
//! answer per event, fencing per job, a repeated publish that changes nothing, and the
//! one-by-one fallback when the pipeline fails as a whole.

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use switchyard_core::event::Event;
use switchyard_queue::events::Published;
use switchyard_queue::testing::PrivateRedis;
use switchyard_queue::{EventBus, Keys, RedisClient};
use uuid::Uuid;

use crate::support::spawn_api_only;

fn delta(job: Uuid, seq: u64, attempt: i32, text: &str) -> Event {
    Event::new(job, seq, attempt, "output.delta", json!({ "text": text }))
}

/// The end of attempt 1 of `job`, succeeded, under `seq`.
fn succeeded(job: Uuid, seq: u64) -> Event {
    Event::terminal(
        job,
        seq,
        1,
        switchyard_core::JobStatus::Succeeded,
        Some(&json!({"ok": true})),
        None,
    )
}

fn answers(r: Vec<redis::RedisResult<Published>>) -> Vec<Published> {
    r.into_iter().map(|r| r.expect("published")).collect()
}

async fn texts(bus: &EventBus, job: Uuid) -> Vec<String> {
    let h = bus.read(job, 0, 100).await.unwrap();
    h.events
        .iter()
        .map(|e| e.data["text"].as_str().unwrap_or("").to_string())
        .collect()
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_batch_answers_per_event_and_a_repeat_changes_nothing(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let bus = app.bus().await;
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    // a newer attempt owns c
    assert!(bus.begin_attempt(c, 2).await.unwrap().is_some());
    let first = vec![
        delta(a, 1, 1, "a1"),
        delta(b, 1, 1, "b1"),
        delta(c, 5, 1, "c1"),
    ];
    assert_eq!(
        answers(bus.publish_many(&first).await),
        vec![Published::Ok, Published::Ok, Published::Fenced]
    );
    // the same batch again (a pipeline retried after it had gone through): accepted, and no
    // event is written twice
    assert_eq!(
        answers(bus.publish_many(&first[..2]).await),
        vec![Published::Ok, Published::Ok]
    );
    assert_eq!(texts(&bus, a).await, vec!["a1"]);
    assert_eq!(texts(&bus, b).await, vec!["b1"]);
    assert!(
        texts(&bus, c).await.is_empty(),
        "a fenced event is not written"
    );
    // an event older than the stream's last one is stale; the rest of the batch still goes out
    assert_eq!(
        answers(
            bus.publish_many(&[delta(a, 2, 1, "a2"), delta(b, 2, 1, "b2")])
                .await
        ),
        vec![Published::Ok, Published::Ok]
    );
    assert_eq!(
        answers(
            bus.publish_many(&[delta(a, 1, 1, "late"), delta(b, 3, 1, "b3")])
                .await
        ),
        vec![Published::Stale, Published::Ok]
    );
    assert_eq!(texts(&bus, a).await, vec!["a1", "a2"]);
    assert_eq!(texts(&bus, b).await, vec!["b1", "b2", "b3"]);
    app.stop().await;
}

#[tokio::test]
async fn a_batch_still_goes_out_when_redis_forgot_the_script() {
    // SCRIPT FLUSH affects every client of a server: this test has one of its own
    let redis = PrivateRedis::start();
    let client = RedisClient::open(&redis.url()).unwrap();
    let conn = client.connect(Duration::from_secs(5)).await.unwrap();
    let bus = EventBus::new(Keys::new("evbatch"), conn, Duration::from_secs(60));
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    // loads the script
    assert_eq!(
        bus.publish(&delta(a, 1, 1, "a1")).await.unwrap(),
        Published::Ok
    );
    let mut raw = client.connect(Duration::from_secs(5)).await.unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .unwrap();
    // the pipeline of EVALSHAs fails with NOSCRIPT; each event is then published on its own
    assert_eq!(
        answers(
            bus.publish_many(&[delta(a, 2, 1, "a2"), delta(b, 1, 1, "b1")])
                .await
        ),
        vec![Published::Ok, Published::Ok]
    );
    assert_eq!(texts(&bus, a).await, vec!["a1", "a2"]);
    assert_eq!(texts(&bus, b).await, vec!["b1"]);
}

/// A job's last subscriber leaving and a new one arriving before the hub caught up: the channel
/// is still subscribed, and the newcomer, which waits for a resync before it reads history,
/// gets one at once (it waited for the 10 s idle re-read before).
#[tokio::test(flavor = "current_thread")]
async fn a_subscriber_replacing_the_last_one_gets_a_resync() {
    use switchyard_queue::{LiveHub, LiveMsg};
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let client = RedisClient::open(&url).unwrap();
    let keys = Keys::new(&format!("t{}", Uuid::now_v7().simple()));
    let stop = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let hub = LiveHub::start(client, keys, stop.clone(), &tracker);
    let job = Uuid::now_v7();
    let wait = Duration::from_secs(5);
    let mut first = hub.subscribe(job, 8);
    assert!(first.activating);
    let got = tokio::time::timeout(wait, first.rx.recv())
        .await
        .expect("resync");
    assert!(matches!(got, Some(LiveMsg::Resync)));
    // no await in between: the hub runs only after both
    drop(first);
    let mut next = hub.subscribe(job, 8);
    assert!(next.activating);
    let got = tokio::time::timeout(Duration::from_secs(2), next.rx.recv())
        .await
        .expect("a resync for the newcomer");
    assert!(matches!(got, Some(LiveMsg::Resync)));
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

/// Another event under a seq the stream already holds (the attempt's announcement went through
/// but its reply was lost, so the run numbered its next event the same) is stale, not taken
/// for a repeat of the stored one: the run then publishes it after the head. (It was answered
/// `Ok` and lost: a job's end could vanish from its stream.)
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn another_event_under_a_taken_seq_is_stale_not_a_repeat(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let bus = app.bus().await;
    let id = Uuid::now_v7();
    let running =
        switchyard_core::Event::status(id, 0, 1, switchyard_core::JobStatus::Running, json!({}));
    assert_eq!(bus.begin_attempt_with(&running, 1).await.unwrap(), Some(2));
    let end = succeeded(id, 2);
    assert_eq!(bus.publish(&end).await.unwrap(), Published::Stale);
    assert_eq!(bus.publish_after(&end, 2).await.unwrap(), Some(3));
    let h = bus.read(id, 0, 10).await.unwrap();
    let kinds: Vec<&str> = h.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["status", "succeeded"]);
    // the stored event itself again is a repeat
    let again = h.events[1].clone();
    assert_eq!(bus.publish(&again).await.unwrap(), Published::Ok);
    app.stop().await;
}

/// The keys' time to live is set by an attempt's first event, by its end and by an event that
/// has to create the stream again; the events in between (deltas) leave it as it is.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn deltas_leave_the_streams_time_to_live_alone(pool: PgPool) {
    let app = spawn_api_only(pool).await;
    let bus = app.bus().await;
    let keys = app.keys();
    let mut redis = app.redis().await;
    let id = Uuid::now_v7();
    let ttls = |mut c: switchyard_queue::RedisConn| {
        let (ev, meta) = (keys.events(id), keys.event_meta(id));
        async move {
            let t: (i64, i64) = redis::pipe()
                .ttl(ev)
                .ttl(meta)
                .query_async(&mut c)
                .await
                .unwrap();
            t
        }
    };
    let running =
        switchyard_core::Event::status(id, 0, 1, switchyard_core::JobStatus::Running, json!({}));
    assert_eq!(bus.begin_attempt_with(&running, 0).await.unwrap(), Some(1));
    let (ev, meta) = ttls(redis.clone()).await;
    assert!(ev > 1000 && meta > 1000, "{ev} {meta}");
    let () = redis::pipe()
        .expire(keys.events(id), 1000)
        .ignore()
        .expire(keys.event_meta(id), 1000)
        .ignore()
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(
        bus.publish(&delta(id, 2, 1, "a")).await.unwrap(),
        Published::Ok
    );
    let (ev, meta) = ttls(redis.clone()).await;
    assert!(
        (1..=1000).contains(&ev) && (1..=1000).contains(&meta),
        "{ev} {meta}"
    );
    // the stream is gone mid-attempt: the delta that creates it again gives it a time to live
    let () = redis::cmd("DEL")
        .arg(keys.events(id))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(
        bus.publish(&delta(id, 3, 1, "b")).await.unwrap(),
        Published::Ok
    );
    let (ev, _) = ttls(redis.clone()).await;
    assert!(ev > 1000, "{ev}");
    // the end sets the finished job's time to live (60 s here) on both keys
    let end = succeeded(id, 4);
    assert_eq!(bus.publish(&end).await.unwrap(), Published::Ok);
    let (ev, meta) = ttls(redis.clone()).await;
    assert!(
        (1..=60).contains(&ev) && (1..=60).contains(&meta),
        "{ev} {meta}"
    );
    app.stop().await;
}
