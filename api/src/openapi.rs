//! The OpenAPI document (utoipa): every route, schema and error response, plus the error table.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::{ErrorBody, ErrorDetail};
use crate::openai::error::{OaiErrorBody, OaiErrorDetail};
use crate::routes;

#[derive(OpenApi)]
#[openapi(
    info(title = "Switchyard API", description = "Durable LLM and code-execution jobs."),
    paths(
        routes::jobs::create_job,
        routes::job_batch::create_batch,
        routes::dead::retry_job,
        routes::jobs::get_job,
        routes::jobs::list_jobs,
        routes::jobs::cancel_job,
        routes::conversations::create,
        routes::conversations::get,
        routes::conversations::list,
        routes::conversations::delete,
        routes::conversations::post_message,
        crate::openai::chat_completions,
        routes::models::list_models,
        routes::models::get_model,
        routes::usage::get_usage,
        routes::quotas::get_quotas,
        routes::workers::list,
        routes::deliveries::list,
        routes::schedules::create,
        routes::schedules::list,
        routes::schedules::get,
        routes::schedules::update,
        routes::schedules::delete,
        routes::api_keys::create,
        routes::api_keys::list,
        routes::api_keys::get,
        routes::api_keys::revoke,
        routes::audit::list,
        routes::tenants::create,
        routes::tenants::list,
        routes::stream::ws,
        routes::stream::sse,
        routes::health::healthz,
        routes::health::readyz,
        routes::health::metrics,
        routes::health::openapi,
        routes::docs::docs,
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        OaiErrorBody,
        OaiErrorDetail,
        switchyard_core::ErrorCode,
        switchyard_core::Job,
        switchyard_core::JobStatus,
        switchyard_core::JobError,
        switchyard_core::Event,
        switchyard_core::job::CreateJobRequest,
        switchyard_core::job::LlmChatInput,
        switchyard_core::job::ChatMessage,
        switchyard_core::job::NoopInput,
        switchyard_core::job::ToolCall,
        switchyard_core::job::FunctionCall,
        switchyard_core::job::ToolSpec,
        switchyard_core::job::FunctionSpec,
        switchyard_core::job::ConversationRef,
        switchyard_store::Conversation,
        switchyard_store::Message,
        routes::conversations::CreateConversation,
        routes::conversations::PostMessage,
        routes::conversations::ConversationWithMessages,
        routes::conversations::ConversationList,
        routes::conversations::PostedMessage,
        routes::jobs::JobList,
        routes::models::Model,
        routes::models::ModelList,
        routes::usage::UsageReport,
        routes::usage::UsageEntry,
        routes::usage::UsageTotals,
        routes::quotas::QuotaReport,
        routes::job_batch::BatchRequest,
        routes::dead::RetryRequest,
        routes::job_batch::BatchResponse,
        routes::quotas::QuotaUse,
        routes::schedules::ScheduleList,
        routes::workers::WorkerList,
        routes::deliveries::DeliveryList,
        switchyard_core::webhook::WebhookDelivery,
        switchyard_core::queueing::WorkerInfo,
        switchyard_core::queueing::WorkerQueue,
        switchyard_core::schedule::CreateScheduleRequest,
        switchyard_core::schedule::UpdateScheduleRequest,
        switchyard_core::schedule::Schedule,
        switchyard_core::schedule::ScheduleRun,
        switchyard_core::schedule::RunSkipped,
        switchyard_core::queueing::Backoff,
        switchyard_core::queueing::BackoffKind,
        switchyard_core::quota::QuotaLimits,
        routes::api_keys::CreateApiKey,
        routes::api_keys::ApiKeyView,
        routes::api_keys::CreatedApiKey,
        routes::api_keys::ApiKeyList,
        routes::audit::AuditPage,
        routes::tenants::CreateTenant,
        routes::tenants::TenantView,
        routes::tenants::CreatedTenant,
        routes::tenants::TenantList,
        switchyard_store::AuditRow,
        switchyard_core::authz::Role,
        switchyard_core::authz::Permission,
    )),
    modifiers(&Security, &CommonErrors),
    tags(
        (name = "jobs", description = "Submit, read, list and cancel jobs"),
        (name = "events", description = "Live job events over WebSocket and SSE"),
        (name = "conversations", description = "Durable conversations; each posted message is answered by an llm.chat job"),
        (name = "openai", description = "OpenAI-compatible front door (OpenAI's request, response and error shapes)"),
        (name = "models", description = "The model aliases this server routes (OpenAI list shape)"),
        (name = "schedules", description = "Cron schedules that submit a job at each fire time"),
        (name = "usage", description = "Tokens and cost of succeeded llm.chat jobs per tenant"),
        (name = "api-keys", description = "A tenant's API keys: roles, scopes, expiry (needs `keys:manage`)"),
        (name = "audit", description = "The tenant's hash-chained audit trail (needs `audit:read`)"),
        (name = "tenants", description = "Tenants, managed by the platform operator (`operator_token`)"),
        (name = "ops", description = "Health, readiness, metrics"),
    )
)]
struct ApiDoc;

struct Security;

/// Documents the errors every operation of a kind can answer with, where the route's own
/// annotation does not: authentication, permission, rate limit and unavailability on secured
/// routes; malformed, oversized, mistyped and invalid bodies where there is one; an invalid id
/// where the path has one. (Found missing by the schemathesis run.)
struct CommonErrors;

impl Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        for (path, item) in openapi.paths.paths.iter_mut() {
            let openai = path == "/v1/chat/completions" || path.starts_with("/v1/models");
            let schema = if openai { "OaiErrorBody" } else { "ErrorBody" };
            let ops = [
                item.get.as_mut(),
                item.post.as_mut(),
                item.put.as_mut(),
                item.patch.as_mut(),
                item.delete.as_mut(),
            ];
            for op in ops.into_iter().flatten() {
                let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
                let mut add = |status: &str, what: &str| {
                    if op.responses.responses.contains_key(status) {
                        return;
                    }
                    let resp = ResponseBuilder::new()
                        .description(what)
                        .content(
                            "application/json",
                            ContentBuilder::new()
                                .schema(Some(Ref::from_schema_name(schema)))
                                .build(),
                        )
                        .build();
                    op.responses
                        .responses
                        .insert(status.to_string(), resp.into());
                };
                if secured {
                    add("401", "unauthorized");
                    add("403", "forbidden");
                    add("429", "rate_limited");
                    add("503", "unavailable");
                }
                if op.request_body.is_some() {
                    add("400", "malformed_json");
                    add("413", "payload_too_large");
                    add("415", "unsupported_media_type");
                    add("422", "invalid_input, unknown_field (with `field`)");
                }
                if path.contains('{') && secured {
                    add("404", "not_found");
                    add("422", "invalid_parameter: the id is malformed");
                }
            }
        }
    }
}

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("sy_ API key or JWT")
                    .description(Some(
                        "A tenant's API key (`sy_...`), or an end user's JWT (HS256 signed with \
                         the tenant's secret, or RS256/ES256 from a configured issuer's JWKS)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The markdown table of error codes (also in the document's description).
pub fn error_table() -> String {
    let mut s = String::from("| code | HTTP status | meaning |\n|---|---|---|\n");
    for c in switchyard_core::ErrorCode::ALL {
        s.push_str(&format!(
            "| `{}` | {} | {} |\n",
            c.as_str(),
            c.http_status(),
            c.description()
        ));
    }
    s
}

pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.info.description = Some(format!(
        "Durable LLM and code-execution jobs.\n\nErrors are `{{\"error\": {{\"code\", \"message\", \"field\"?}}}}` with these codes:\n\n{}",
        error_table()
    ));
    doc
}
