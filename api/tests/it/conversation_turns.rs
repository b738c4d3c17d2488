//! Conversation turns that do not simply succeed: a turn behind one that keeps retrying, a
//! conversation deleted mid-turn (its turns cancelled, the reply's tokens still charged), a
//! reply cut by a cancel (charged), and the retry of a failed turn, allowed only while it is
//! the last, a summary model that answers with nothing or does not resolve, and a stored
//! summary kept for a turn on a model outside the table.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::conversations::{create, delete, post, say};
use crate::support::*;

const T: Duration = Duration::from_secs(20);

/// A turn queued behind one that keeps retrying and then fails is answered, not failed, and
/// its prompt leaves the failed turn's unanswered question out.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_turn_behind_a_failing_turn_is_answered_without_its_question(pool: PgPool) {
    let app = spawn_app(pool).await;
    let c = create(&app, json!({"model": "mock-echo"})).await;
    let id = c["id"].as_str().unwrap().to_string();
    // turn 1 keeps failing (429 + retry-after: 1 s) through all its attempts
    let (_, first) = post(
        &app,
        &id,
        json!({"content": "one", "model": "mock-error-429"}),
    )
    .await;
    let (_, second) = post(&app, &id, json!({"content": "two"})).await;
    let j1: Uuid = first["job"]["id"].as_str().unwrap().parse().unwrap();
    let j2: Uuid = second["job"]["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(j1, "failed", Duration::from_secs(60)).await;
    let done = app
        .wait_status(j2, "succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(done["output"]["text"], "Mock reply: two");
    // the failed turn's question is not part of the answered turn's prompt: the mock counts
    // a token per word of the prompt, and "one" would make it two
    assert_eq!(done["output"]["usage"]["prompt_tokens"], 1, "{done}");
    let conv: Uuid = id.parse().unwrap();
    let prompt = app.store.messages_from(conv, 0, 2, None).await.unwrap();
    let texts: Vec<&str> = prompt.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(texts, ["two"]);
    app.stop().await;
}

/// A conversation deleted while its turn streams: the turn is cancelled (its provider call
/// aborted, nobody is left to read the reply) and so is the turn queued behind it. The tokens
/// the cut reply used were paid for all the same: they count against the tenant's day (else
/// post, delete, repeat used a daily token quota without limit).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn deleting_a_conversation_mid_turn_cancels_its_turns(pool: PgPool) {
    let app = spawn_app(pool).await;
    let c = create(&app, json!({"model": "mock-slow"})).await;
    let id = c["id"].as_str().unwrap().to_string();
    let words = vec!["word"; 30].join(" ");
    let (s, posted) = post(&app, &id, json!({ "content": words })).await;
    assert_eq!(s, 202);
    let job: Uuid = posted["job"]["id"].as_str().unwrap().parse().unwrap();
    let (_, next) = post(&app, &id, json!({ "content": "and then?" })).await;
    let next: Uuid = next["job"]["id"].as_str().unwrap().parse().unwrap();
    let mut ws = app.ws().await;
    ws.subscribe(job, 0).await;
    while ws.next(T).await.expect("events")["type"] != "output.delta" {}
    assert_eq!(delete(&app, &id).await, 204);
    let j = app.wait_status(job, "cancelled", T).await;
    assert!(j["output"].is_null(), "{j}");
    let n = app.wait_status(next, "cancelled", T).await;
    assert!(n["error"].is_null(), "the queued turn never failed: {n}");
    // 30 words of prompt and what streamed of the reply
    app.wait_usage_above("llm_tokens_today", 30.0).await;
    app.stop().await;
}

/// A job cancelled while its reply streams: the prompt and what streamed are charged (a
/// cancel just before the end cannot be used to get replies past the daily token quota).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_reply_cut_by_a_cancel_is_charged(pool: PgPool) {
    let app = spawn_app(pool).await;
    let words = vec!["word"; 40].join(" ");
    let job = app
        .submit(json!({"kind": "llm.chat", "input": {"model": "mock-slow", "messages": [{"role": "user", "content": words}]}}))
        .await;
    let job: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let mut ws = app.ws().await;
    ws.subscribe(job, 0).await;
    while ws.next(T).await.expect("events")["type"] != "output.delta" {}
    let r = app
        .auth(app.http.post(app.url(&format!("/v1/jobs/{job}/cancel"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    app.wait_status(job, "cancelled", T).await;
    let q = app.wait_usage_above("llm_tokens_today", 40.0).await;
    // and the usage report shows the cancelled job and what it was charged
    let report = app.get_json("/v1/usage").await;
    let total = &report["total"];
    assert_eq!(total["requests"], 0, "{report}");
    assert_eq!(total["failed_requests"], 1, "{report}");
    assert_eq!(
        total["charged_tokens"].as_f64(),
        q["usage"]["llm_tokens_today"].as_f64(),
        "{report} {q}"
    );
    app.stop().await;
}

/// A failed turn may be retried while it is the conversation's last; once later turns were
/// answered (without it), its reply would follow theirs: the retry is refused (409).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_failed_turn_is_retried_only_while_it_is_the_last(pool: PgPool) {
    let app = spawn_app(pool).await;
    let c = create(&app, json!({"model": "mock-echo"})).await;
    let id = c["id"].as_str().unwrap().to_string();
    let (_, first) = post(
        &app,
        &id,
        json!({"content": "one", "model": "mock-error-400"}),
    )
    .await;
    let j1: Uuid = first["job"]["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(j1, "failed", T).await;
    let retry = || async {
        app.auth(app.http.post(app.url(&format!("/v1/jobs/{j1}/retry"))))
            .send()
            .await
            .unwrap()
    };
    assert_eq!(retry().await.status(), 202, "the last turn may be retried");
    app.wait_status(j1, "failed", T).await;
    say(&app, &id, "two").await;
    let r = retry().await;
    assert_eq!(r.status(), 409);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "conflict", "{e}");
    app.stop().await;
}

/// While a turn runs, only the next turn waits in a worker slot: turns further back give
/// theirs back (deferred, queued again with a due time; no attempt used), and all are answered
/// in order once the running turn ends. (A burst of posts held a slot per turn, each polling,
/// for as long as the turns before ran.)
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn only_the_next_turn_waits_in_a_slot(pool: PgPool) {
    let app = spawn_app(pool).await;
    let c = create(&app, json!({"model": "mock-echo"})).await;
    let id = c["id"].as_str().unwrap().to_string();
    // turn 1 stalls until it is cancelled
    let (_, first) = post(&app, &id, json!({"content": "one", "model": "mock-stall"})).await;
    let j1: Uuid = first["job"]["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(j1, "running", T).await;
    let mut later = Vec::new();
    for text in ["two", "three", "four"] {
        let (s, v) = post(&app, &id, json!({ "content": text })).await;
        assert_eq!(s, 202, "{v}");
        later.push(v["job"]["id"].as_str().unwrap().parse::<Uuid>().unwrap());
    }
    // turn 4 (two unfinished turns ahead of it) is deferred rather than held
    let t = std::time::Instant::now();
    loop {
        let j = app.get_job(later[2]).await;
        if j["status"] == "queued" && j["attempt"].as_i64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(t.elapsed() < T, "turn 4 never gave its slot back: {j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = app
        .auth(app.http.post(app.url(&format!("/v1/jobs/{j1}/cancel"))))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    for (job, text) in later.iter().zip(["two", "three", "four"]) {
        let done = app
            .wait_status(*job, "succeeded", Duration::from_secs(60))
            .await;
        assert_eq!(done["output"]["text"], format!("Mock reply: {text}"));
    }
    app.stop().await;
}

/// A page of messages is bounded by bytes as well as turns: whole turns only (the page's
/// first turn whatever its size), and `next_after_turn` resumes after the last one sent.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn message_pages_are_bounded_by_bytes_in_whole_turns(pool: PgPool) {
    let app = spawn_app(pool).await;
    let c = create(&app, json!({"model": "mock-echo"})).await;
    let id = c["id"].as_str().unwrap().to_string();
    let conv: Uuid = id.parse().unwrap();
    for word in ["alpha", "beta", "gamma"] {
        say(&app, &id, &word.repeat(20)).await;
    }
    let page = |after: i32, max: i64| {
        let store = app.store.clone();
        let tenant = app.tenant;
        async move {
            let (rows, next) = store
                .messages_page(tenant, conv, after, 200, max)
                .await
                .unwrap();
            let turns: Vec<(i32, String)> = rows.iter().map(|m| (m.turn, m.role.clone())).collect();
            (turns, next)
        }
    };
    let user_and_reply = |t: i32| vec![(t, "user".to_string()), (t, "assistant".to_string())];
    // everything fits: no next page
    assert_eq!(
        page(0, 1 << 20).await,
        (
            [user_and_reply(1), user_and_reply(2), user_and_reply(3)].concat(),
            None
        )
    );
    // ~100 bytes of user text and ~113 of reply per turn: 250 bytes end inside turn 2
    assert_eq!(page(0, 250).await, (user_and_reply(1), Some(1)));
    assert_eq!(page(1, 250).await, (user_and_reply(2), Some(2)));
    assert_eq!(page(2, 250).await, (user_and_reply(3), None));
    // a turn larger than the budget comes alone, whole
    assert_eq!(page(0, 10).await, (user_and_reply(1), Some(1)));
    app.stop().await;
}

/// The history a turn reads under `drop_oldest` is bounded by bytes (newest first, from a
/// question on), so a long conversation is not read whole on every turn.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn the_history_read_for_a_turn_is_bounded_by_bytes(pool: PgPool) {
    let app = crate::support::spawn_api_only(pool).await;
    let c = create(&app, json!({"model": "mock-echo"})).await;
    let conv: Uuid = c["id"].as_str().unwrap().parse().unwrap();
    // ten answered turns and the question of the eleventh, 1,000 bytes each
    for turn in 1..=11 {
        for (part, role) in [(0, "user"), (1, "assistant")] {
            if turn == 11 && part == 1 {
                continue;
            }
            sqlx::query(
                "INSERT INTO conversation_messages (conversation_id, turn, part, role, content, job_id)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(conv)
            .bind(turn)
            .bind(part as i16)
            .bind(role)
            .bind("x".repeat(1000))
            .bind(Uuid::now_v7())
            .execute(app.store.pool())
            .await
            .unwrap();
        }
    }
    let read = |max: Option<i64>| {
        let store = app.store.clone();
        async move {
            store
                .messages_from(conv, 0, 11, max)
                .await
                .unwrap()
                .into_iter()
                .map(|m| (m.turn, m.role))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(read(None).await.len(), 21);
    // 3,500 bytes: the newest three messages and the reply of turn 9, which opens nothing
    assert_eq!(
        read(Some(3500)).await,
        [
            (10, "user".to_string()),
            (10, "assistant".to_string()),
            (11, "user".to_string())
        ]
    );
    // the question being answered is read whatever its size
    assert_eq!(read(Some(1)).await, [(11, "user".to_string())]);
    app.stop().await;
}

/// A summary model that answers with nothing (a reasoning model that spent its whole budget
/// thinking): nothing is stored, and the turns that needed a summary drop their oldest turns
/// instead. (An empty summary was stored and stood for every turn it covered: they vanished
/// from every later prompt.)
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn an_empty_summary_is_not_kept(pool: PgPool) {
    let opts = Opts {
        configure: Some(std::sync::Arc::new(|cfg| {
            cfg.llm.summary_model = Some("mock-empty".into());
        })),
        ..Default::default()
    };
    let app = spawn_app_with(pool, opts).await;
    let (id, model) = summarizing(&app).await;
    let mut summarized = 0;
    for i in 0..24 {
        let j = say(&app, &id, &question(i)).await;
        if j["output"].get("summary").is_some() {
            summarized += 1;
        }
    }
    assert!(summarized >= 1, "summaries were asked for");
    assert_eq!(app.mock_requests("mock-empty").await.len(), summarized);
    let (_, conv) = crate::conversations::get(&app, &format!("/v1/conversations/{id}")).await;
    assert!(conv["summary"].is_null(), "{}", conv["summary"]);
    // the last turn's prompt: as many of the turns before as fit, no summary
    let reqs = app.mock_requests(&model).await;
    let last = &reqs.last().unwrap()["body"]["messages"];
    let msgs = last.as_array().unwrap();
    assert!(msgs.len() > 4, "older turns kept: {}", msgs.len());
    assert!(msgs.iter().all(|m| m["role"] != "system"), "{last}");
    app.stop().await;
}

/// A new `summarize` conversation on a `mock-sum-*` model of its own: its id and model.
async fn summarizing(app: &TestApp) -> (String, String) {
    let model = format!("mock-sum-{}", Uuid::now_v7().simple());
    let c = create(
        app,
        json!({"model": model, "context_strategy": "summarize"}),
    )
    .await;
    (c["id"].as_str().unwrap().to_string(), model)
}

/// Turn `i`'s question: about 100 words, so that a few dozen overflow a mock model's window.
fn question(i: usize) -> String {
    format!("turn {i} ") + &"conversational ".repeat(100)
}

/// Turns of a `summarize` conversation until one stores a summary; returns its id and model.
async fn summarized(app: &TestApp) -> (String, String) {
    let (id, model) = summarizing(app).await;
    for i in 0..24 {
        say(app, &id, &question(i)).await;
        let (_, conv) = crate::conversations::get(app, &format!("/v1/conversations/{id}")).await;
        if !conv["summary"].is_null() {
            return (id, model);
        }
    }
    panic!("no summary was stored");
}

/// A turn on a model outside the table (`<provider>/<model>`: its window is unknown, so nothing
/// is fitted) still gets the stored summary: the turns it covers are not read any more, and
/// they vanished from that turn's prompt.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_turn_on_an_unlisted_model_keeps_the_summary(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (id, model) = summarized(&app).await;
    let (s, v) = post(
        &app,
        &id,
        json!({"content": "and now?", "model": format!("mock/{model}")}),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let job: Uuid = v["job"]["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(job, "succeeded", T).await;
    let reqs = app.mock_requests(&model).await;
    let last = &reqs.last().unwrap()["body"]["messages"];
    let first = &last.as_array().unwrap()[0];
    assert_eq!(first["role"], "system", "{last}");
    assert!(
        first["content"]
            .as_str()
            .unwrap()
            .starts_with("Summary of the earlier conversation"),
        "{last}"
    );
    assert_eq!(
        last.as_array().unwrap().last().unwrap()["content"],
        "and now?"
    );
    app.stop().await;
}

/// A summary model that does not resolve (`llm.summary_model` misconfigured) fails no turn:
/// the turns that need a summary drop their oldest turns instead, as when the model refuses.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_summary_model_that_does_not_resolve_fails_no_turn(pool: PgPool) {
    let opts = Opts {
        configure: Some(std::sync::Arc::new(|cfg| {
            cfg.llm.summary_model = Some("no-such-model".into());
        })),
        ..Default::default()
    };
    let app = spawn_app_with(pool, opts).await;
    let (id, model) = summarizing(&app).await;
    for i in 0..24 {
        // `say` waits for each turn to succeed
        say(&app, &id, &question(i)).await;
    }
    let (_, conv) = crate::conversations::get(&app, &format!("/v1/conversations/{id}")).await;
    assert!(conv["summary"].is_null(), "{}", conv["summary"]);
    let reqs = app.mock_requests(&model).await;
    assert_eq!(reqs.len(), 24);
    let last = reqs.last().unwrap()["body"]["messages"]
        .as_array()
        .unwrap()
        .len();
    assert!(last < 48, "the oldest turns were dropped: {last} messages");
    app.stop().await;
}

/// When more falls out of the window than the summary model reads at once (its window is
/// smaller), the dropped turns are folded chunk by chunk, oldest first: every turn the summary
/// stands for went into some summary call. (Only the newest part was read, yet every dropped
/// turn was marked covered: the rest vanished from every later prompt.)
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn turns_past_the_summarizers_window_are_folded_in_chunks_none_left_out(pool: PgPool) {
    let upstream = format!("mock-tiny-{}", Uuid::now_v7().simple());
    let up = upstream.clone();
    let opts = Opts {
        configure: Some(std::sync::Arc::new(move |cfg| {
            let mut m = switchyard_core::models::ModelConfig::on("mock");
            m.model = Some(up.clone());
            m.context_window = 6000;
            cfg.llm.models.insert("tiny-sum".into(), m);
            cfg.llm.summary_model = Some("tiny-sum".into());
        })),
        ..Default::default()
    };
    let app = spawn_app_with(pool, opts).await;
    let (id, _) = summarizing(&app).await;
    for i in 0..24 {
        say(&app, &id, &question(i)).await;
    }
    let (_, conv) = crate::conversations::get(&app, &format!("/v1/conversations/{id}")).await;
    let upto = conv["summary_turn"].as_i64().expect("a summary is kept");
    assert!(upto > 2, "{conv}");
    let calls = app.mock_requests(&upstream).await;
    assert!(calls.len() >= 2, "{} summary calls", calls.len());
    let read: String = calls
        .iter()
        .map(|r| r["body"]["messages"][1]["content"].as_str().unwrap_or(""))
        .collect();
    // turn t (from 1) asked "turn {t-1} ..."
    for t in 1..upto {
        assert!(
            read.contains(&format!("turn {} conversational", t - 1)),
            "turn {t} is covered by the summary (before turn {upto}) but was never summarized"
        );
    }
    // each call read at most what the summary model's window holds
    for r in &calls {
        let chars = r["body"]["messages"][1]["content"].as_str().unwrap().len();
        assert!(
            chars / 3 < 6000,
            "{chars} characters for a 6,000-token window"
        );
    }
    app.stop().await;
}

/// A reply written by an attempt that then died (its end never committed), in a turn a later
/// attempt ends failed: the reply goes with the failure, so the turn reads as unanswered and
/// later prompts do not build on an answer nobody was charged for.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_reply_left_by_a_dead_attempt_goes_when_the_turn_fails(pool: PgPool) {
    use switchyard_store::{ClaimOutcome, Reply, RunEnd};
    let app = spawn_app_with(
        pool,
        Opts {
            worker: false,
            ..Default::default()
        },
    )
    .await;
    let c = create(&app, json!({"model": "mock-echo"})).await;
    let id = c["id"].as_str().unwrap().to_string();
    let (_, posted) = post(&app, &id, json!({"content": "hello?"})).await;
    let job: Uuid = posted["job"]["id"].as_str().unwrap().parse().unwrap();
    // attempt 1 writes its reply, then its worker dies: its lease runs out
    let short = Duration::from_millis(1);
    let ClaimOutcome::Claimed(first) = app.store.claim(job, "w1", short).await.unwrap() else {
        panic!("claim")
    };
    let reply = Reply {
        conversation_id: id.parse().unwrap(),
        turn: 1,
        job_id: job,
        attempt: first.attempt,
        content: "an answer from a dead run".into(),
        tool_calls: None,
        model: "mock-echo".into(),
        usage: json!({}),
    };
    assert!(app.store.append_reply(&reply).await.unwrap());
    tokio::time::sleep(Duration::from_millis(50)).await;
    // attempt 2 fails for good
    let ClaimOutcome::Claimed(second) = app
        .store
        .claim(job, "w2", Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("second claim")
    };
    assert_eq!(second.attempt, 2);
    let err = switchyard_core::job::JobError::new("invalid_request", "a 400", false);
    assert!(app
        .store
        .end_run(job, 2, &RunEnd::Failed(err), 3)
        .await
        .unwrap());
    let (_, conv) = crate::conversations::get(&app, &format!("/v1/conversations/{id}")).await;
    let msgs = conv["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1, "{conv}");
    assert_eq!(msgs[0]["role"], "user");
    app.stop().await;
}
