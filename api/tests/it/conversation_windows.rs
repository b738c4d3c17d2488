//! Conversations and model windows: a turn that no model of its chain could ever take (its
//! system prompt and message alone exceed every window, with the reply budget) is refused
//! when posted, naming the field to change; a conversation on a model outside the table keeps
//! working past its window once the provider has stated it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use switchyard_core::models::ModelConfig;
use uuid::Uuid;

use crate::conversations::{get, post, say, try_create as create};
use crate::support::*;

const T: Duration = Duration::from_secs(30);

/// `n` tokens by the estimate the mock's models are counted with (3 characters a token).
fn tokens(n: usize) -> String {
    "abc".repeat(n)
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_turn_that_can_never_fit_is_refused_when_posted(pool: PgPool) {
    let configure = |cfg: &mut switchyard_core::config::Config| {
        let mut tiny = ModelConfig::on("mock");
        tiny.model = Some("mock-echo".into());
        tiny.context_window = 1000;
        tiny.max_output_tokens = 200;
        let mut wide = tiny.clone();
        wide.fallbacks = vec!["mock-echo".into()];
        cfg.llm.models.insert("tiny".into(), tiny);
        cfg.llm.models.insert("tiny-then-wide".into(), wide);
    };
    let app = spawn_app_with(
        pool,
        Opts {
            configure: Some(Arc::new(configure)),
            ..Default::default()
        },
    )
    .await;
    // 1,000 tokens of system prompt: more than 1,000 − 200 for the reply
    let (s, e) = create(&app, json!({"model": "tiny", "system": tokens(1000)})).await;
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (422, Some("system")),
        "{e}"
    );
    // a fallback with a larger window takes it
    let (s, big) = create(
        &app,
        json!({"model": "tiny-then-wide", "system": tokens(1000)}),
    )
    .await;
    assert_eq!(s, 201, "{big}");

    let (s, c) = create(&app, json!({"model": "tiny", "system": "be brief"})).await;
    assert_eq!(s, 201, "{c}");
    let id = c["id"].as_str().unwrap();
    // 3 + (4 + 3) + (4 + 800) > 800
    let (s, e) = post(&app, id, json!({"content": tokens(800)})).await;
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (422, Some("content")),
        "{e}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1000 tokens"),
        "{e}"
    );
    // a smaller reply budget makes room for it
    let (s, v) = post(&app, id, json!({"content": tokens(800), "max_tokens": 100})).await;
    assert_eq!(s, 202, "{v}");
    let job: Uuid = v["job"]["id"].as_str().unwrap().parse().unwrap();
    app.wait_status(job, "succeeded", T).await;
    say(&app, id, "and a short one").await;
    // a turn on a model too small for the conversation's system prompt: the model is wrong
    let big = big["id"].as_str().unwrap();
    let (s, e) = post(&app, big, json!({"content": "hi", "model": "tiny"})).await;
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (422, Some("model")),
        "{e}"
    );
    // refused turns left nothing behind
    let (_, conv) = get(&app, &format!("/v1/conversations/{id}")).await;
    assert_eq!(conv["messages"].as_array().unwrap().len(), 4, "{conv}");
    let (_, conv) = get(&app, &format!("/v1/conversations/{big}")).await;
    assert_eq!(conv["messages"].as_array().unwrap().len(), 0, "{conv}");
    app.stop().await;
}

/// A model outside the table (`<provider>/<model>`) has no window here: its history went out
/// whole until the provider refused it, and every turn after that failed with
/// `provider_context_length`. Now the refusal's stated window is fitted to.
#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn a_conversation_on_an_unlisted_model_keeps_working_past_its_window(pool: PgPool) {
    let app = spawn_app(pool).await;
    let upstream = format!("mock-window-150-{}", Uuid::now_v7().simple());
    let (s, c) = create(&app, json!({"model": format!("mock/{upstream}")})).await;
    assert_eq!(s, 201, "{c}");
    let id = c["id"].as_str().unwrap();
    let words = |i: usize| {
        (0..40)
            .map(|w| format!("q{i}w{w}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for i in 0..5 {
        say(&app, id, &words(i)).await;
    }
    let sent = app.mock_requests(&upstream).await;
    assert!(
        sent.len() > 5,
        "some turn was refused and fitted: {} calls",
        sent.len()
    );
    let count = |r: &Value| -> usize {
        r["body"]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                m["content"]
                    .as_str()
                    .unwrap_or("")
                    .split_whitespace()
                    .count()
            })
            .sum()
    };
    let last = sent.last().unwrap();
    assert!(count(last) <= 150, "{} words", count(last));
    let newest = &last["body"]["messages"].as_array().unwrap().last().unwrap()["content"];
    assert_eq!(newest, &json!(words(4)));
    app.stop().await;
}
