//! The OpenAPI document (utoipa): every route, schema and error response, plus the error table.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::{ErrorBody, ErrorDetail};
use crate::routes;

#[derive(OpenApi)]
#[openapi(
    info(title = "Switchyard API", description = "Durable LLM and code-execution jobs."),
    paths(
        routes::jobs::create_job,
        routes::jobs::get_job,
        routes::jobs::list_jobs,
        routes::jobs::cancel_job,
        routes::stream::ws,
        routes::stream::sse,
        routes::health::healthz,
        routes::health::readyz,
        routes::health::metrics,
        routes::health::openapi,
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        switchyard_core::ErrorCode,
        switchyard_core::Job,
        switchyard_core::JobStatus,
        switchyard_core::JobError,
        switchyard_core::Event,
        switchyard_core::job::CreateJobRequest,
        switchyard_core::job::LlmChatInput,
        switchyard_core::job::ChatMessage,
        switchyard_core::job::NoopInput,
        routes::jobs::JobList,
    )),
    modifiers(&Security),
    tags(
        (name = "jobs", description = "Submit, read, list and cancel jobs"),
        (name = "events", description = "Live job events over WebSocket and SSE"),
        (name = "ops", description = "Health, readiness, metrics"),
    )
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key `sy_...`"))
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
