//! `/v1/conversations`: create, read (with messages), list, delete, and post a user message
//! (stored together with the `llm.chat` job that answers it).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use switchyard_core::job::{parse_at, string_or_list, Job, JobKind};
use switchyard_core::{ErrorCode, FieldError};
use switchyard_store::{Conversation, Message, NewConversation, Principal};

use super::jobs::{
    json_body, llm_chat_job, next_page, page_params, parse_id, request_trace, tenant_llm_defaults,
};
use crate::auth::Auth;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::AppState;

/// Largest message accepted (characters).
pub const MAX_CONTENT_CHARS: usize = switchyard_core::chat::MAX_MESSAGE_CHARS;
const STRATEGIES: [&str; 2] = ["drop_oldest", "summarize"];

/// Body of `POST /v1/conversations`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateConversation {
    /// Default model of the conversation's messages.
    pub model: Option<String>,
    /// System prompt, always kept when the context is fitted.
    pub system: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// How the history is fitted into the model's window: `drop_oldest` (default) or
    /// `summarize` (the oldest turns are summarized by `llm.summary_model`, and the summary is
    /// kept for reuse).
    pub context_strategy: Option<String>,
}

/// Body of `POST /v1/conversations/{id}/messages`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostMessage {
    pub content: String,
    /// Overrides the conversation's model for this turn.
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    /// Generation parameters, as in an `llm.chat` input.
    pub top_p: Option<f64>,
    #[serde(default, deserialize_with = "string_or_list")]
    #[schema(value_type = Option<Vec<String>>)]
    pub stop: Option<Vec<String>>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    pub reasoning_effort: Option<String>,
    /// Use the response cache (default: the tenant's setting).
    pub cache: Option<bool>,
}

/// Content one page of messages carries at most (whole turns; a single larger turn alone).
const PAGE_BYTES: i64 = 8 << 20;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConversationWithMessages {
    #[serde(flatten)]
    pub conversation: Conversation,
    /// The messages of up to `turns` turns after `after_turn`, and at most 8 MiB of content
    /// (whole turns; a single larger turn comes alone).
    pub messages: Vec<Message>,
    /// Pass as `after_turn` for the next page; null on the last page.
    pub next_after_turn: Option<i32>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MessagePage {
    /// Only turns after this one (default 0: from the start).
    pub after_turn: Option<String>,
    /// Turns per page, 1..=1000 (default 200).
    pub turns: Option<String>,
}

fn int_param(
    v: Option<&str>,
    name: &str,
    default: i32,
    range: std::ops::RangeInclusive<i32>,
) -> ApiResult<i32> {
    match v {
        None | Some("") => Ok(default),
        Some(s) => s
            .parse::<i32>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                ApiError::field(
                    ErrorCode::InvalidParameter,
                    name,
                    format!(
                        "must be an integer from {} to {}",
                        range.start(),
                        range.end()
                    ),
                )
            }),
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConversationList {
    pub data: Vec<Conversation>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PostedMessage {
    pub message: Message,
    /// The `llm.chat` job answering the message; its events stream the reply.
    pub job: Job,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size, 1..=200 (default 50).
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

fn object_body(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> ApiResult<Value> {
    let value = json_body(headers, body)?;
    if !value.is_object() {
        return Err(FieldError::invalid("body", "must be a JSON object").into());
    }
    Ok(value)
}

fn check_model(state: &AppState, principal: &Principal, field: &str, model: &str) -> ApiResult<()> {
    super::models::usable(&state.models, principal, model)
        .map_err(|e| ApiError::field(ErrorCode::InvalidInput, field, e.message(model)))
}

/// Texts above this many bytes are tokenized on a blocking thread.
const INLINE_COUNT_BYTES: usize = 16 * 1024;

/// Whether a prompt keeping `texts` whole fits some model of `model`'s chain (see
/// `switchyard_core::tokens::fits_some`): a turn that could never be answered is refused now,
/// not failed later with `context_too_long`. `Err` holds the largest window tried.
async fn fits(
    state: &AppState,
    model: &str,
    texts: Vec<String>,
    max_tokens: Option<u32>,
) -> Result<(), u32> {
    let Ok(chain) = state.models.chain(model) else {
        return Ok(());
    };
    let bytes: usize = texts.iter().map(String::len).sum();
    let check = move || {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        switchyard_core::tokens::fits_some(&chain, &refs, max_tokens)
    };
    if bytes <= INLINE_COUNT_BYTES {
        return check();
    }
    tokio::task::spawn_blocking(check).await.unwrap_or(Ok(()))
}

/// Create a conversation.
#[utoipa::path(
    post, path = "/v1/conversations", tag = "conversations",
    request_body = CreateConversation,
    responses(
        (status = 201, body = Conversation),
        (status = 400, description = "malformed_json", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 422, description = "unknown_field, invalid_input (with `field`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    Auth(principal): Auth,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let value = object_body(&headers, body)?;
    let req: CreateConversation = parse_at("", &value)?;
    if let Some(m) = &req.model {
        check_model(&state, &principal, "model", m)?;
    }
    let metadata = switchyard_core::job::check_metadata(req.metadata)?;
    if req
        .system
        .as_ref()
        .is_some_and(|s| s.chars().count() > MAX_CONTENT_CHARS)
    {
        return Err(FieldError::invalid(
            "system",
            format!("at most {MAX_CONTENT_CHARS} characters"),
        )
        .into());
    }
    if let (Some(model), Some(system)) = (&req.model, &req.system) {
        if let Err(window) = fits(&state, model, vec![system.clone()], None).await {
            return Err(FieldError::invalid(
                "system",
                format!(
                    "the system prompt alone does not fit `{model}`'s window of {window} tokens \
                     with its reply budget"
                ),
            )
            .into());
        }
    }
    let strategy = req.context_strategy.unwrap_or_else(|| "drop_oldest".into());
    if !STRATEGIES.contains(&strategy.as_str()) {
        return Err(FieldError::invalid(
            "context_strategy",
            format!("must be one of {}", STRATEGIES.join(", ")),
        )
        .into());
    }
    let c = state
        .store
        .create_conversation(
            principal.tenant_id,
            &principal.subject(),
            &NewConversation {
                model: req.model,
                system: req.system,
                metadata,
                context_strategy: strategy,
            },
        )
        .await?;
    let location = format!("/v1/conversations/{}", c.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(c)).into_response())
}

/// Read a conversation with its messages (turn order; an assistant reply follows its user
/// message).
#[utoipa::path(
    get, path = "/v1/conversations/{id}", tag = "conversations",
    params(("id" = Uuid, Path, description = "conversation id"), MessagePage),
    responses(
        (status = 200, body = ConversationWithMessages),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 404, description = "not_found", body = ErrorBody),
        (status = 422, description = "invalid_parameter", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    page: Result<Query<MessagePage>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<ConversationWithMessages>> {
    let id = parse_id(&id)?;
    let Query(page) =
        page.map_err(|e| ApiError::field(ErrorCode::InvalidParameter, "query", e.body_text()))?;
    let after = int_param(
        page.after_turn.as_deref(),
        "after_turn",
        0,
        0..=i32::MAX - 1001,
    )?;
    let turns = int_param(page.turns.as_deref(), "turns", 200, 1..=1000)?;
    let conversation = state
        .store
        .get_conversation(principal.scope(), id)
        .await?
        .ok_or_else(|| ApiError::not_found("conversation"))?;
    let (messages, next_after_turn) = state
        .store
        .messages_page(principal.tenant_id, id, after, turns, PAGE_BYTES)
        .await?;
    Ok(Json(ConversationWithMessages {
        conversation,
        messages,
        next_after_turn,
    }))
}

/// List conversations, newest first.
#[utoipa::path(
    get, path = "/v1/conversations", tag = "conversations",
    params(ListParams),
    responses(
        (status = 200, body = ConversationList),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 422, description = "invalid_parameter (limit or cursor)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Auth(principal): Auth,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<ConversationList>> {
    let Query(p) =
        params.map_err(|e| ApiError::field(ErrorCode::InvalidParameter, "query", e.body_text()))?;
    let (limit, before) = page_params(p.limit.as_deref(), p.cursor.as_deref())?;
    let mut rows = state
        .store
        .list_conversations(principal.scope(), before, limit + 1)
        .await?;
    let next_cursor = next_page(&mut rows, limit, |c| c.id);
    Ok(Json(ConversationList {
        data: rows,
        next_cursor,
    }))
}

/// Delete a conversation and its messages. Its turns that are still queued or running are
/// cancelled (nobody is left to read their replies); the jobs themselves stay.
#[utoipa::path(
    delete, path = "/v1/conversations/{id}", tag = "conversations",
    params(("id" = Uuid, Path, description = "conversation id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 404, description = "not_found", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = parse_id(&id)?;
    let Some(unfinished) = state
        .store
        .delete_conversation(principal.scope(), id)
        .await?
    else {
        return Err(ApiError::not_found("conversation"));
    };
    // the newest first: an older turn's end must not let a newer one start
    for job in unfinished.into_iter().rev() {
        if let Err(e) = super::jobs::cancel(&state, principal.scope(), job).await {
            // the turn then fails with conversation_not_found when it runs
            tracing::warn!(%job, error = ?e, "could not cancel a deleted conversation's turn");
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Post a user message: 202 with the stored message and the `llm.chat` job that answers it.
/// Turns are answered in the order they were posted; the reply is appended when the job
/// succeeds, and its tokens stream through the job's events.
#[utoipa::path(
    post, path = "/v1/conversations/{id}/messages", tag = "conversations",
    params(("id" = Uuid, Path, description = "conversation id")),
    request_body = PostMessage,
    responses(
        (status = 202, description = "stored; `Location` points at the job", body = PostedMessage),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 404, description = "not_found", body = ErrorBody),
        (status = 422, description = "unknown_field, invalid_input (with `field`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn post_message(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let value = object_body(&headers, body)?;
    let req: PostMessage = parse_at("", &value)?;
    if req.content.trim().is_empty() || req.content.chars().count() > MAX_CONTENT_CHARS {
        return Err(FieldError::invalid(
            "content",
            format!("must be 1 to {MAX_CONTENT_CHARS} characters"),
        )
        .into());
    }
    let conv = state
        .store
        .get_conversation(principal.scope(), id)
        .await?
        .ok_or_else(|| ApiError::not_found("conversation"))?;
    let model = req.model.or(conv.model).ok_or_else(|| {
        ApiError::field(
            ErrorCode::InvalidInput,
            "model",
            "name a model here or on the conversation",
        )
    })?;
    check_model(&state, &principal, "model", &model)?;
    crate::quota::check_daily(&state, &principal, "llm.chat").await?;
    crate::quota::check_backlog(&state, &principal, 1).await?;
    let mut input = json!({
        "model": model,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stop": req.stop,
        "seed": req.seed,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "response_format": req.response_format,
        "reasoning_effort": req.reasoning_effort,
        "cache": req.cache,
    });
    // absent parameters stay out of the stored input
    if let Some(o) = input.as_object_mut() {
        o.retain(|k, v| k == "model" || !v.is_null());
    }
    tenant_llm_defaults(&principal, &mut input);
    // validates the parameters like a job's input would be
    JobKind::LlmChat
        .validate_input(&{
            let mut probe = input.clone();
            probe["messages"] = json!([{"role": "user", "content": "."}]);
            probe
        })
        .map_err(|mut e| {
            e.field = e.field.trim_start_matches("input.").to_string();
            e
        })?;
    let max_tokens = input["max_tokens"].as_u64().map(|n| n as u32);
    let mut texts: Vec<String> = conv.system.iter().cloned().collect();
    texts.push(req.content.clone());
    if let Err(window) = fits(&state, &model, texts, max_tokens).await {
        let (field, what) = match conv.system.clone() {
            None => ("content", "this message does not"),
            Some(system) => match fits(&state, &model, vec![system], max_tokens).await {
                Ok(()) => (
                    "content",
                    "this message and the conversation's system prompt do not",
                ),
                Err(_) => ("model", "the conversation's system prompt alone does not"),
            },
        };
        return Err(FieldError::invalid(
            field,
            format!("{what} fit `{model}`'s window of {window} tokens with its reply budget"),
        )
        .into());
    }
    let trace = request_trace(&headers);
    let posted = state
        .store
        .post_message(principal.scope(), id, &req.content, &model, |turn| {
            input["conversation"] = json!({ "id": id, "turn": turn });
            llm_chat_job(
                &principal,
                input,
                json!({ "conversation_id": id, "turn": turn }),
                &trace,
            )
        })
        .await?
        .ok_or_else(|| ApiError::not_found("conversation"))?;
    let (message, job) = posted;
    let view = job.to_job();
    state.submitter.dispatch(job).await;
    let location = format!("/v1/jobs/{}", view.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(PostedMessage { message, job: view }),
    )
        .into_response())
}
