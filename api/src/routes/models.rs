//! `/v1/models`: the model table in OpenAI's list shape (so OpenAI SDKs' `models.list()` works),
//! with context windows, prices and fallbacks. Provider URLs and keys are never exposed. Errors
//! use OpenAI's shape here, like the front door.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use switchyard_core::models::{ModelConfig, ModelTable};

use crate::auth::Auth;
use crate::error::{ApiError, ErrorBody};
use crate::openai::OaiError;

/// One model alias.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Model {
    /// The alias to send as `input.model`.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Always 0 (OpenAI's field; aliases have no creation time).
    pub created: i64,
    /// The provider the alias calls (its name in the table).
    pub owned_by: String,
    /// Tokens the model accepts (prompt + reply).
    pub context_window: u32,
    /// Reply budget when a request names none.
    pub max_output_tokens: u32,
    /// USD per million prompt tokens.
    pub input_usd_per_mtok: f64,
    /// USD per million completion tokens.
    pub output_usd_per_mtok: f64,
    /// Aliases tried in order when this one fails.
    pub fallbacks: Vec<String>,
}

impl Model {
    fn from_entry(alias: &str, m: &ModelConfig) -> Model {
        Model {
            id: alias.to_string(),
            object: "model",
            created: 0,
            owned_by: m.provider.clone(),
            context_window: m.context_window,
            max_output_tokens: m.max_output_tokens,
            input_usd_per_mtok: m.input_usd_per_mtok,
            output_usd_per_mtok: m.output_usd_per_mtok,
            fallbacks: m.fallbacks.clone(),
        }
    }
}

/// The models, sorted by id.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<Model>,
}

/// List the model aliases this server can route.
#[utoipa::path(
    get, path = "/v1/models", tag = "models",
    responses(
        (status = 200, body = ModelList),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_models(
    State(table): State<Arc<ModelTable>>,
    auth: Result<Auth, ApiError>,
) -> Result<Json<ModelList>, OaiError> {
    auth?;
    let data = table
        .listed()
        .into_iter()
        .map(|(alias, m)| Model::from_entry(alias, m))
        .collect();
    Ok(Json(ModelList {
        object: "list",
        data,
    }))
}

/// Read one model alias (ids may contain `/`).
#[utoipa::path(
    get, path = "/v1/models/{id}", tag = "models",
    params(("id" = String, Path, description = "model alias")),
    responses(
        (status = 200, body = Model),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 404, description = "not_found", body = ErrorBody),
        (status = 503, description = "unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_model(
    State(table): State<Arc<ModelTable>>,
    auth: Result<Auth, ApiError>,
    Path(id): Path<String>,
) -> Result<Json<Model>, OaiError> {
    auth?;
    table
        .listed()
        .into_iter()
        .find(|(alias, _)| *alias == id)
        .map(|(alias, m)| Json(Model::from_entry(alias, m)))
        .ok_or_else(|| {
            OaiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{id}` does not exist or you do not have access to it."),
            )
            .code("model_not_found")
        })
}
