//! The OpenAI-compatible front door: non-streaming and streaming shapes, ignored extra fields,
//! OpenAI-shaped errors (ours and failed jobs'), a client that goes away cancels its job, and the
//! official `openai` Python and Node packages driving it unchanged.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

const T: Duration = Duration::from_secs(20);

pub(crate) async fn chat(app: &TestApp, body: Value) -> reqwest::Response {
    app.auth(app.http.post(app.url("/v1/chat/completions")))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The `data:` payloads of an SSE body, in order.
pub(crate) async fn sse_data(resp: reqwest::Response) -> Vec<String> {
    let mut buf = String::new();
    let mut s = resp.bytes_stream();
    while let Some(b) = s.next().await {
        buf.push_str(std::str::from_utf8(&b.unwrap()).unwrap());
    }
    buf.split("\n\n")
        .filter_map(|ev| {
            ev.lines()
                .find_map(|l| l.strip_prefix("data: ").or(l.strip_prefix("data:")))
        })
        .map(|d| d.trim().to_string())
        .collect()
}

/// The chunks of a streamed completion (the `[DONE]` marker left out).
pub(crate) async fn sse_chunks(resp: reqwest::Response) -> Vec<Value> {
    let data = sse_data(resp).await;
    data.iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

/// A delta field (`content`, `refusal`) of the chunks, joined.
pub(crate) fn joined(chunks: &[Value], field: &str) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"][field].as_str())
        .collect()
}

pub(crate) fn user(text: &str) -> Value {
    json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": text}])
}

fn expected(text: &str) -> String {
    switchyard_mock_llm::expected_text(
        &[
            ("system".into(), "be brief".into()),
            ("user".into(), text.into()),
        ],
        None,
    )
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn non_streaming_completion(pool: PgPool) {
    let app = spawn_app(pool).await;
    let r = chat(&app, json!({"model": "mock-echo", "messages": user("one two three"), "user": "u-7", "seed": 1, "n": 1, "logit_bias": {}})).await;
    assert_eq!(r.status(), 200);
    let job_header = r.headers()["x-switchyard-job-id"]
        .to_str()
        .unwrap()
        .to_string();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "mock-echo");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        expected("one two three").as_str()
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );
    assert!(u["completion_tokens"].as_u64().unwrap() > 0);
    // it ran as an ordinary job: same queue, same accounting
    assert_eq!(v["switchyard"]["job_id"], job_header.as_str());
    let job = app.get_job(job_header.parse().unwrap()).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["kind"], "llm.chat");
    assert_eq!(job["metadata"]["source"], "chat.completions");
    app.stop().await;
}

/// A prompt as large as a job may carry (here ~1.5 MB of JSON) is read by the front door and
/// by a conversation (both refused anything over 1 MiB with 413, where `/v1/jobs` took it).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn prompts_larger_than_a_mebibyte_are_taken(pool: PgPool) {
    let app = spawn_app(pool).await;
    let big = "lorem ipsum ".repeat(60_000);
    let messages = json!([{"role": "user", "content": big}, {"role": "assistant", "content": "ok"},
                          {"role": "user", "content": big}]);
    let r = chat(
        &app,
        json!({"model": "mock-echo", "messages": messages, "max_tokens": 5}),
    )
    .await;
    // read and parsed: what refuses it now is the mock model's 8k window, not the body size
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "context_length_exceeded", "{e}");
    let conv = crate::conversations::create(&app, json!({"model": "mock-echo"})).await;
    // 600,000 characters, each escaped in JSON: 1.2 MB of body, read and parsed: what refuses
    // it is again the window (this message could never be answered), named as its field
    let (status, body) = crate::conversations::post(
        &app,
        conv["id"].as_str().unwrap(),
        json!({"content": "\"".repeat(600_000)}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (422, Some("content")),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("this message does not fit"), "{message}");
    app.stop().await;
}

/// A model's refusal reaches OpenAI's `refusal` field (content null), and streams as a
/// `refusal` delta, never as content.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_refusal_is_openai_s_refusal_field(pool: PgPool) {
    let app = spawn_app(pool).await;
    let r = chat(
        &app,
        json!({"model": "mock-refusal", "messages": user("one two")}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let m = &v["choices"][0]["message"];
    assert_eq!(m["refusal"], expected("one two").as_str(), "{v}");
    assert_eq!(m["content"], Value::Null, "{v}");
    let r = chat(
        &app,
        json!({"model": "mock-refusal", "messages": user("one two"), "stream": true}),
    )
    .await;
    let chunks = sse_chunks(r).await;
    assert_eq!(joined(&chunks, "refusal"), expected("one two"));
    assert_eq!(joined(&chunks, "content"), "");
    // an ordinary answer says `refusal: null`
    let r = chat(
        &app,
        json!({"model": "mock-echo", "messages": user("one two")}),
    )
    .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["refusal"], Value::Null, "{v}");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn streaming_completion_with_usage_and_tools(pool: PgPool) {
    let app = spawn_app(pool).await;
    let r = chat(&app, json!({"model": "mock-echo", "messages": user("red green blue"), "stream": true, "stream_options": {"include_usage": true}})).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let data = sse_data(r).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, expected("red green blue"));
    let fin = chunks
        .iter()
        .find(|c| c["choices"][0]["finish_reason"].is_string())
        .unwrap();
    assert_eq!(fin["choices"][0]["finish_reason"], "stop");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert!(last["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    // tool calls stream as tool_calls deltas
    let tools = json!([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]);
    let r = chat(&app, json!({"model": "mock-tool", "messages": [{"role": "user", "content": "weather?"}], "tools": tools, "stream": true})).await;
    let chunks = sse_chunks(r).await;
    let call = chunks
        .iter()
        .find_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0).cloned())
        .expect("a tool call chunk");
    assert_eq!(call["function"]["name"], "lookup");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"text": "weather?"}));
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "tool_calls"));
    // and non-streaming: message.tool_calls, content null
    let v: Value = chat(&app, json!({"model": "mock-tool", "messages": [{"role": "user", "content": "weather?"}], "tools": tools})).await.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "lookup"
    );
    assert!(v["choices"][0]["message"]["content"].is_null());
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn errors_use_openai_shape(pool: PgPool) {
    let app = spawn_app(pool).await;
    let shape = |v: &Value| {
        let e = &v["error"];
        assert!(e["message"].is_string() && e["type"].is_string(), "{v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    };
    // no key
    let r = app
        .http
        .post(app.url("/v1/chat/completions"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    shape(&v);
    assert_eq!(v["error"]["code"], "invalid_api_key");
    // malformed JSON
    let r = app
        .auth(app.http.post(app.url("/v1/chat/completions")))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    shape(&r.json().await.unwrap());
    // missing messages: the param is named
    let v: Value = chat(&app, json!({"model": "mock-echo"}))
        .await
        .json()
        .await
        .unwrap();
    shape(&v);
    assert_eq!(v["error"]["param"], "messages");
    // unknown model
    let r = chat(&app, json!({"model": "gpt-nope", "messages": user("x")})).await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    // failed jobs, by their error
    for (model, status, code) in [
        ("mock-error-400", 400, "provider_bad_request"),
        ("mock-context-length", 400, "context_length_exceeded"),
        ("mock-error-429-quota", 429, "insufficient_quota"),
    ] {
        let r = chat(&app, json!({"model": model, "messages": user("x")})).await;
        assert_eq!(r.status(), status, "{model}");
        let v: Value = r.json().await.unwrap();
        shape(&v);
        assert_eq!(v["error"]["code"], code, "{model}");
    }
    // a failure while streaming ends the stream with an error object
    let r = chat(
        &app,
        json!({"model": "mock-midstream-error", "messages": user("x y z"), "stream": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let data = sse_data(r).await;
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert!(last["error"]["code"].is_string(), "{data:?}");
    // a failure before any output is answered with its status, as OpenAI answers a bad
    // request (SDKs raise their typed errors)
    let r = chat(
        &app,
        json!({"model": "mock-error-400", "messages": user("x"), "stream": true}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    shape(&v);
    assert_eq!(v["error"]["code"], "provider_bad_request");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_client_that_goes_away_cancels_its_job(pool: PgPool) {
    let app = spawn_app(pool).await;
    let r = chat(
        &app,
        json!({"model": "mock-stall", "messages": user("wait"), "stream": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let id: Uuid = r.headers()["x-switchyard-job-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut body = r.bytes_stream();
    // the role chunk arrives at once; then the client hangs up
    assert!(body.next().await.is_some());
    drop(body);
    let j = app.wait_status(id, "cancelled", T).await;
    assert_eq!(j["status"], "cancelled");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn the_official_openai_python_package_works_unchanged(pool: PgPool) {
    let app = spawn_app(pool).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/openai_sdk.py");
    // scripts/test.sh installs the pinned `openai` package into a venv and names its python
    let python = std::env::var("SWITCHYARD_OPENAI_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = tokio::process::Command::new(&python)
        .arg(script)
        .env("SWITCHYARD_BASE_URL", app.url("/v1"))
        .env("SWITCHYARD_API_KEY", &app.key)
        .output()
        .await
        .expect(
            "python runs (scripts/test.sh installs the `openai` package; SWITCHYARD_OPENAI_PYTHON)",
        );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai SDK script failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("ALL OK"), "{stdout}");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn the_official_openai_node_package_works_unchanged(pool: PgPool) {
    let app = spawn_app(pool).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node/openai_sdk.mjs");
    let out = tokio::process::Command::new("node")
        .arg(script)
        .env("SWITCHYARD_BASE_URL", app.url("/v1"))
        .env("SWITCHYARD_API_KEY", &app.key)
        .output()
        .await
        .expect("node runs (scripts/test.sh installs the `openai` package into api/tests/node)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai Node SDK script failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("ALL OK"), "{stdout}");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn generation_parameters_reach_the_provider_and_bad_ones_are_named(pool: PgPool) {
    let app = spawn_app(pool).await;
    let r = chat(
        &app,
        json!({"model": "mock-sampling", "messages": user("one two three four"), "stop": " three",
               "top_p": 0.5, "seed": 7, "presence_penalty": 0.25, "frequency_penalty": -0.25,
               "response_format": {"type": "json_object"}, "max_completion_tokens": 50,
               "reasoning_effort": "high"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Mock reply: one two");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // what the provider received over HTTP (the mock records requests per model)
    let b = &app.mock_requests("mock-sampling").await[0]["body"];
    assert_eq!(b["stop"], json!([" three"]));
    assert_eq!(
        (b["top_p"].clone(), b["seed"].clone()),
        (json!(0.5), json!(7))
    );
    assert_eq!(b["presence_penalty"], 0.25);
    assert_eq!(b["frequency_penalty"], -0.25);
    assert_eq!(b["response_format"], json!({"type": "json_object"}));
    assert_eq!(
        b["max_tokens"], 50,
        "the mock is an openai_compatible provider"
    );
    assert_eq!(b["reasoning_effort"], "high");
    let r = chat(
        &app,
        json!({"model": "mock-parallel", "messages": user("x"), "parallel_tool_calls": false,
               "tools": [{"type": "function", "function": {"name": "f"}}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let sent = &app.mock_requests("mock-parallel").await[0]["body"];
    assert_eq!(sent["parallel_tool_calls"], false);

    // out of range or malformed: OpenAI's error shape, the parameter named
    for (extra, param) in [
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"stop": ["a", ""]}), "stop[1]"),
        (json!({"presence_penalty": 3}), "presence_penalty"),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format.type",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {}}}),
            "response_format.json_schema.name",
        ),
        (json!({"seed": "x"}), "seed"),
        (json!({"reasoning_effort": "MAX!"}), "reasoning_effort"),
    ] {
        let mut body = json!({"model": "mock-echo", "messages": user("x")});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = chat(&app, body).await;
        assert_eq!(r.status(), 400, "{extra}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    // the native route takes the same parameters, strictly, with the input's field path
    let r = app
        .auth(app.http.post(app.url("/v1/jobs")))
        .json(&json!({"kind": "llm.chat", "input": {"model": "mock-echo", "messages": user("x"), "top_p": -0.1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["field"], "input.top_p", "{v}");
    let r = app
        .auth(app.http.post(app.url("/v1/jobs")))
        .json(&json!({"kind": "llm.chat", "input": {"model": "mock-echo", "messages": user("a b c"), "stop": "b"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id: Uuid = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let job = app.wait_status(id, "succeeded", T).await;
    assert_eq!(job["output"]["text"], "Mock reply: a ", "{job}");
    assert_eq!(job["output"]["finish_reason"], "stop");
    app.stop().await;
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn json_mode_on_an_anthropic_model_answers_json(pool: PgPool) {
    let app = spawn_app(pool).await;
    for stream in [false, true] {
        let r = chat(
            &app,
            json!({"model": "mock-claude", "messages": user("red green"), "stream": stream,
                   "response_format": {"type": "json_object"}}),
        )
        .await;
        assert_eq!(r.status(), 200);
        let content = if stream {
            sse_data(r)
                .await
                .iter()
                .filter(|d| d.as_str() != "[DONE]")
                .map(|d| serde_json::from_str::<Value>(d).unwrap())
                .filter_map(|c| {
                    c["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(String::from)
                })
                .collect::<String>()
        } else {
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
            assert!(
                v["choices"][0]["message"]
                    .get("tool_calls")
                    .is_none_or(Value::is_null),
                "{v}"
            );
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let reply: Value = serde_json::from_str(&content).unwrap();
        assert_eq!(reply, json!({"text": "red green"}), "stream={stream}");
    }
    app.stop().await;
}

/// Routes of OpenAI's API that are not served answer in OpenAI's error shape (an SDK pointed
/// here reads them), other unknown routes in ours; a body that is not JSON is a 415 on the
/// front door as on `/v1/jobs` (it became a 400).
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn unserved_openai_routes_and_bad_media_types_answer_openai_s_way(pool: PgPool) {
    let app = spawn_app(pool).await;
    for path in ["/v1/embeddings", "/v1/responses", "/v1/audio/speech"] {
        let r = app
            .auth(app.http.post(app.url(path)))
            .json(&json!({"model": "x", "input": "y"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(v["error"].get("param").is_some(), "{v}");
    }
    let r = app
        .auth(app.http.get(app.url("/v1/nothing-here")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_found", "{v}");
    let r = app
        .auth(app.http.post(app.url("/v1/chat/completions")))
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unsupported_media_type", "{v}");
    app.stop().await;
}
