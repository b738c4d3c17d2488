//! Conversations: CRUD and errors, answers appended in post order (concurrent posts), the
//! context fitted into the model's window on a very long conversation, persistence across a
//! restart of every process, and cancellation aborting the provider call.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use switchyard_core::job::ChatMessage;
use switchyard_worker::llm::context::Tokenizer;
use uuid::Uuid;

use crate::support::*;

const T: Duration = Duration::from_secs(20);

pub(crate) async fn create(app: &TestApp, body: Value) -> Value {
    let (status, c) = try_create(app, body).await;
    assert_eq!(status, 201, "{c}");
    c
}

/// `POST /v1/conversations`: status and body, whatever they are.
pub(crate) async fn try_create(app: &TestApp, body: Value) -> (u16, Value) {
    let r = app
        .auth(app.http.post(app.url("/v1/conversations")))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// `DELETE /v1/conversations/{id}`: its status.
pub(crate) async fn delete(app: &TestApp, id: &impl std::fmt::Display) -> u16 {
    app.auth(app.http.delete(app.url(&format!("/v1/conversations/{id}"))))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

pub(crate) async fn post(app: &TestApp, id: &str, body: Value) -> (u16, Value) {
    let r = app
        .auth(
            app.http
                .post(app.url(&format!("/v1/conversations/{id}/messages"))),
        )
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

pub(crate) async fn get(app: &TestApp, path: &str) -> (u16, Value) {
    let r = app.auth(app.http.get(app.url(path))).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

pub(crate) async fn say(app: &TestApp, id: &str, content: &str) -> Value {
    let (s, v) = post(app, id, json!({ "content": content })).await;
    assert_eq!(s, 202, "{v}");
    let job: Uuid = v["job"]["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(job, "succeeded", T).await
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn crud_and_errors(pool: PgPool) {
    let app = spawn_app(pool).await;
    let c = create(
        &app,
        json!({"model": "mock-echo", "system": "be brief", "metadata": {"k": 1}}),
    )
    .await;
    let id = c["id"].as_str().unwrap().to_string();
    assert_eq!(c["context_strategy"], "drop_oldest");
    let (s, got) = get(&app, &format!("/v1/conversations/{id}")).await;
    assert_eq!(s, 200);
    assert_eq!(got["system"], "be brief");
    assert_eq!(got["messages"], json!([]));

    for _ in 0..2 {
        create(&app, json!({})).await;
    }
    let (_, page) = get(&app, "/v1/conversations?limit=2").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let (_, rest) = get(&app, &format!("/v1/conversations?limit=2&cursor={cursor}")).await;
    assert_eq!(rest["data"].as_array().unwrap().len(), 1);
    assert_eq!(rest["data"][0]["id"], id.as_str());
    assert!(rest["next_cursor"].is_null());

    // bad input: clear codes with the offending field
    let bad = |body: Value, code: &'static str, field: &'static str| {
        let app = &app;
        let id = id.clone();
        async move {
            let (s, v) = post(app, &id, body).await;
            assert_eq!(s, 422, "{v}");
            assert_eq!(
                (v["error"]["code"].as_str(), v["error"]["field"].as_str()),
                (Some(code), Some(field)),
                "{v}"
            );
        }
    };
    bad(json!({"content": ""}), "invalid_input", "content").await;
    bad(
        json!({"content": "x", "colour": 1}),
        "unknown_field",
        "colour",
    )
    .await;
    bad(
        json!({"content": "x", "model": "no-such-model"}),
        "invalid_input",
        "model",
    )
    .await;
    bad(
        json!({"content": "x", "temperature": 9}),
        "invalid_input",
        "temperature",
    )
    .await;
    bad(
        json!({"content": "x", "top_p": 2}),
        "invalid_input",
        "top_p",
    )
    .await;
    bad(
        json!({"content": "x", "response_format": {"type": "xml"}}),
        "invalid_input",
        "response_format.type",
    )
    .await;
    // generation parameters go with the turn to the provider; absent ones stay out of the input
    let (s, v) = post(
        &app,
        &id,
        json!({"content": "one two three", "model": "mock-conv-params", "stop": " three", "seed": 3}),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let job: Uuid = v["job"]["id"].as_str().unwrap().parse().unwrap();
    let done = app.wait_status(job, "succeeded", T).await;
    assert_eq!(done["output"]["text"], "Mock reply: one two");
    assert_eq!(done["input"]["stop"], json!([" three"]));
    assert!(done["input"].get("top_p").is_none(), "{}", done["input"]);
    let sent = &app.mock_requests("mock-conv-params").await[0]["body"];
    assert_eq!(
        (sent["stop"].clone(), sent["seed"].clone()),
        (json!([" three"]), json!(3))
    );
    let r = app
        .auth(app.http.post(app.url("/v1/conversations")))
        .json(&json!({"context_strategy": "magic"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let nomodel = create(&app, json!({})).await;
    let (s, v) = post(
        &app,
        nomodel["id"].as_str().unwrap(),
        json!({"content": "hi"}),
    )
    .await;
    assert_eq!((s, v["error"]["field"].as_str()), (422, Some("model")));
    let (s, _) = post(&app, &Uuid::now_v7().to_string(), json!({"content": "hi"})).await;
    assert_eq!(s, 404);

    // jobs are checked against the model table too
    let r = app
        .auth(app.http.post(app.url("/v1/jobs")))
        .json(&json!({"kind": "llm.chat", "input": {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["field"], "input.model", "{v}");

    // another tenant sees nothing
    let other = app.store.create_tenant("other").await.unwrap();
    let (_, key) = app.store.create_api_key(other.id, "k", None).await.unwrap();
    let r = app
        .http
        .get(app.url(&format!("/v1/conversations/{id}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    assert_eq!(delete(&app, &id).await, 204);
    let (s, _) = get(&app, &format!("/v1/conversations/{id}")).await;
    assert_eq!(s, 404);
    assert_eq!(delete(&app, &id).await, 404);
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn concurrent_posts_are_answered_in_order_and_survive_a_restart(pool: PgPool) {
    let mut app = spawn_app(pool).await;
    let model = format!("mock-order-{}", Uuid::now_v7().simple());
    let c = create(&app, json!({"model": model, "system": "sys"})).await;
    let id = c["id"].as_str().unwrap().to_string();
    let posts = (1..=5).map(|i| {
        let (app, id) = (&app, id.clone());
        async move { post(app, &id, json!({"content": format!("message number {i}")})).await }
    });
    let posted = futures::future::join_all(posts).await;
    let mut jobs = Vec::new();
    for (s, v) in &posted {
        assert_eq!(*s, 202, "{v}");
        assert_eq!(v["message"]["role"], "user");
        jobs.push(v["job"]["id"].as_str().unwrap().parse::<Uuid>().unwrap());
    }
    for j in &jobs {
        let done = app.wait_status(*j, "succeeded", T).await;
        assert_eq!(done["output"]["model"], model.as_str());
    }
    let (_, conv) = get(&app, &format!("/v1/conversations/{id}")).await;
    let msgs = conv["messages"].as_array().unwrap().clone();
    assert_eq!(msgs.len(), 10);
    for (i, pair) in msgs.chunks(2).enumerate() {
        assert_eq!(pair[0]["turn"], i + 1);
        assert_eq!(
            (pair[0]["role"].as_str(), pair[1]["role"].as_str()),
            (Some("user"), Some("assistant"))
        );
        let user = pair[0]["content"].as_str().unwrap();
        let want = switchyard_mock_llm::expected_text(&[("user".into(), user.into())], None);
        assert_eq!(pair[1]["content"], want.as_str());
        assert!(pair[1]["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    }
    // each turn was asked with every earlier turn's question and answer
    let reqs = app.mock_requests(&model).await;
    assert_eq!(reqs.len(), 5);
    for (k, r) in reqs.iter().enumerate() {
        let m = r["body"]["messages"].as_array().unwrap();
        assert_eq!(
            m.len(),
            1 + 2 * k + 1,
            "system + {k} answered turns + the new one"
        );
        assert_eq!(m[0]["role"], "system");
        assert_eq!(m.last().unwrap()["content"], msgs[2 * k]["content"]);
    }

    // pages of turns
    let (_, page) = get(&app, &format!("/v1/conversations/{id}?turns=2")).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 4);
    assert_eq!(page["next_after_turn"], 2);
    let (_, page) = get(
        &app,
        &format!("/v1/conversations/{id}?after_turn=4&turns=2"),
    )
    .await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 2);
    assert_eq!(page["messages"][0]["turn"], 5);
    assert!(page["next_after_turn"].is_null());
    let (s, v) = get(&app, &format!("/v1/conversations/{id}?turns=0")).await;
    assert_eq!((s, v["error"]["field"].as_str()), (422, Some("turns")));

    // every process restarts and Redis is wiped: the conversation is intact and goes on
    app.restart().await;
    let (s, again) = get(&app, &format!("/v1/conversations/{id}")).await;
    assert_eq!(s, 200);
    assert_eq!(again["messages"], conv["messages"]);
    let done = say(&app, &id, "after the restart").await;
    assert!(done["output"]["text"]
        .as_str()
        .unwrap()
        .ends_with("after the restart"));
    let (_, conv) = get(&app, &format!("/v1/conversations/{id}")).await;
    assert_eq!(conv["messages"].as_array().unwrap().len(), 12);
    let last = app.mock_requests(&model).await;
    assert_eq!(
        last.last().unwrap()["body"]["messages"]
            .as_array()
            .unwrap()
            .len(),
        1 + 2 * 5 + 1
    );
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_very_long_conversation_never_exceeds_the_window(pool: PgPool) {
    let app = spawn_app(pool).await;
    // mock models: an 8192-token window, 1024 reserved for the reply, estimated tokens
    let model = format!("mock-long-{}", Uuid::now_v7().simple());
    let c = create(
        &app,
        json!({"model": model, "system": "you are a patient listener"}),
    )
    .await;
    let id = c["id"].as_str().unwrap().to_string();
    let budget = 8192 - 1024;
    let mut total_words = 0;
    for i in 0..24 {
        let content = format!("turn {i} ") + &"conversational ".repeat(100);
        total_words += 2 * 102;
        say(&app, &id, &content).await;
    }
    let reqs = app.mock_requests(&model).await;
    assert_eq!(reqs.len(), 24);
    for r in &reqs {
        let msgs: Vec<ChatMessage> = serde_json::from_value(r["body"]["messages"].clone()).unwrap();
        let tokens = Tokenizer::Estimate.prompt(&msgs);
        assert!(tokens <= budget, "prompt of {tokens} tokens > {budget}");
        assert_eq!(msgs[0].role, "system");
        assert_eq!(
            msgs[1].role, "user",
            "the kept history starts with a user turn"
        );
    }
    let last: Vec<ChatMessage> =
        serde_json::from_value(reqs[23]["body"]["messages"].clone()).unwrap();
    assert!(
        last.len() < 1 + 47,
        "old turns were dropped ({} messages)",
        last.len()
    );
    assert!(last.last().unwrap().content.starts_with("turn 23 "));
    assert!(
        total_words > 4_000,
        "the whole history is far beyond the window"
    );
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn cancelling_a_job_aborts_the_provider_call(pool: PgPool) {
    let app = spawn_app(pool).await;
    let job = app
        .submit(json!({"kind": "llm.chat", "input": {"model": "mock-stall", "messages": [{"role": "user", "content": "wait for it"}]}}))
        .await;
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(id, "running", T).await;
    let base = app.mock_url.trim_end_matches("/v1").to_string();
    let stats = || async {
        let v: Value = reqwest::get(format!("{base}/mock/stats"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let m = &v["models"]["mock-stall"];
        (
            m["calls"].as_u64().unwrap_or(0),
            m["aborted"].as_u64().unwrap_or(0),
        )
    };
    // the stream is open (one token sent, then silence)
    let t0 = std::time::Instant::now();
    while stats().await.0 == 0 && t0.elapsed() < T {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats().await, (1, 0));
    let r = app
        .auth(app.http.post(app.url(&format!("/v1/jobs/{id}/cancel"))))
        .send()
        .await
        .unwrap();
    assert!(r.status() == 200 || r.status() == 202);
    app.wait_status(id, "cancelled", T).await;
    let t0 = std::time::Instant::now();
    while stats().await.1 == 0 && t0.elapsed() < T {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        stats().await,
        (1, 1),
        "the provider saw the request aborted"
    );
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn the_summarize_strategy_keeps_and_reuses_a_summary(pool: PgPool) {
    let app = spawn_app(pool).await;
    let model = format!("mock-sum-{}", Uuid::now_v7().simple());
    let c = create(
        &app,
        json!({"model": model, "system": "you are a patient listener", "context_strategy": "summarize"}),
    )
    .await;
    let id = c["id"].as_str().unwrap().to_string();
    let budget = 8192 - 1024;
    let mut jobs = Vec::new();
    for i in 0..24 {
        let content = format!("turn {i} ") + &"conversational ".repeat(100);
        jobs.push(say(&app, &id, &content).await);
    }
    let (_, conv) = get(&app, &format!("/v1/conversations/{id}")).await;
    assert!(conv["summary"].is_string(), "a summary is kept: {conv}");
    assert!(conv["summary_turn"].as_i64().unwrap() > 1);
    assert_eq!(
        conv["messages"].as_array().unwrap().len(),
        48,
        "the history itself is intact"
    );

    let reqs = app.mock_requests(&model).await;
    let is_summary_call = |r: &Value| {
        r["body"]["messages"][0]["content"]
            .as_str()
            .unwrap_or("")
            .starts_with("You maintain the memory")
    };
    let summaries = reqs.iter().filter(|r| is_summary_call(r)).count();
    let turns: Vec<&Value> = reqs.iter().filter(|r| !is_summary_call(r)).collect();
    assert_eq!(turns.len(), 24);
    assert!(summaries >= 1, "the oldest turns were summarized");
    assert!(
        summaries <= 8,
        "the summary is reused, not remade every turn ({summaries} summaries)"
    );
    // each summary call is reported by the turn that made it (a turn folding more than the
    // summary model reads at once makes several, reported together), and counted in the usage
    let summarized: Vec<&Value> = jobs
        .iter()
        .map(|j| &j["output"])
        .filter(|o| o.get("summary").is_some())
        .collect();
    assert!(
        (1..=summaries).contains(&summarized.len()),
        "{} turns reported {summaries} summary calls",
        summarized.len()
    );
    let tokens =
        |u: &Value| u["prompt_tokens"].as_i64().unwrap() + u["completion_tokens"].as_i64().unwrap();
    for o in &summarized {
        assert_eq!(o["summary"]["model"], model.as_str(), "{o}");
        // a transcript of several whole turns (~100 words each)
        assert!(
            o["summary"]["usage"]["prompt_tokens"].as_i64().unwrap() > 500,
            "{o}"
        );
    }
    let spent: i64 = jobs
        .iter()
        .map(|j| tokens(&j["output"]["usage"]))
        .sum::<i64>()
        + summarized
            .iter()
            .map(|o| tokens(&o["summary"]["usage"]))
            .sum::<i64>();
    let (_, report) = get(&app, "/v1/usage").await;
    assert_eq!(report["total"]["requests"], 24, "{report}");
    assert_eq!(
        report["total"]["prompt_tokens"].as_i64().unwrap()
            + report["total"]["completion_tokens"].as_i64().unwrap(),
        spent,
        "{report}"
    );
    for r in &turns {
        let msgs: Vec<ChatMessage> = serde_json::from_value(r["body"]["messages"].clone()).unwrap();
        assert!(Tokenizer::Estimate.prompt(&msgs) <= budget);
    }
    let last: Vec<ChatMessage> =
        serde_json::from_value(turns[23]["body"]["messages"].clone()).unwrap();
    assert_eq!(last[0].content, "you are a patient listener");
    assert!(
        last[1]
            .content
            .starts_with("Summary of the earlier conversation:\n"),
        "{:?}",
        last[1]
    );
    assert!(last.last().unwrap().content.starts_with("turn 23 "));
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn replies_are_fenced_and_a_retried_turn_never_sees_its_own_old_reply(pool: PgPool) {
    let app = spawn_without_worker(pool).await;
    let c = create(&app, json!({"model": "mock-echo"})).await;
    let id: Uuid = c["id"].as_str().unwrap().parse().unwrap();
    let (s, posted) = post(&app, &id.to_string(), json!({"content": "question"})).await;
    assert_eq!(s, 202);
    let job: Uuid = posted["job"]["id"].as_str().unwrap().parse().unwrap();
    let lease = Duration::from_secs(30);
    let reply = |attempt: i32, text: &str| switchyard_store::Reply {
        conversation_id: id,
        turn: 1,
        job_id: job,
        attempt,
        content: text.into(),
        tool_calls: None,
        model: "mock-echo".into(),
        usage: json!({}),
    };
    let store = &app.store;
    assert!(matches!(
        store.claim(job, "w1", lease).await.unwrap(),
        switchyard_store::ClaimOutcome::Claimed(_)
    ));
    assert!(store.append_reply(&reply(1, "first try")).await.unwrap());
    // the attempt's outcome is lost; a second attempt answers the same turn
    store
        .end_run(
            job,
            1,
            &switchyard_store::RunEnd::Retry {
                error: switchyard_core::JobError::new("x", "x", true),
                run_at: chrono::Utc::now(),
            },
            2,
        )
        .await
        .unwrap();
    assert!(matches!(
        store.claim(job, "w2", lease).await.unwrap(),
        switchyard_store::ClaimOutcome::Claimed(_)
    ));
    let prompt = store.messages(id, 1).await.unwrap();
    assert_eq!(
        prompt.len(),
        1,
        "the turn's prompt has its question, not the old reply"
    );
    assert_eq!(prompt[0].role, "user");
    assert!(
        !store.append_reply(&reply(1, "stale")).await.unwrap(),
        "a stale attempt cannot write"
    );
    assert!(store.append_reply(&reply(2, "second try")).await.unwrap());
    let all = store.messages(id, i32::MAX).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].content, "second try");

    // conversation turns cannot be forged through /v1/jobs
    let r = app
        .auth(app.http.post(app.url("/v1/jobs")))
        .json(&json!({"kind": "llm.chat", "input": {"model": "mock-echo", "conversation": {"id": id, "turn": 1}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["field"],
        "input.conversation"
    );
    // why nothing was written: a stale attempt is fenced; once the conversation is deleted,
    // the reply says so (and the worker fails the turn with conversation_not_found)
    use switchyard_store::ReplyAppend;
    let stale = store
        .append_reply_outcome(&reply(1, "stale"))
        .await
        .unwrap();
    assert_eq!(stale, ReplyAppend::Fenced);
    let status = delete(&app, &id).await;
    assert!((200..300).contains(&status), "{status}");
    let late = store.append_reply_outcome(&reply(2, "late")).await.unwrap();
    assert_eq!(late, ReplyAppend::ConversationGone);
    app.stop().await;
}
