//! `/v1/models`: the model table in OpenAI's list shape (so OpenAI SDKs' `models.list()` works),
//! with context windows, prices and fallbacks. Provider URLs and keys are never exposed. Errors
//! use OpenAI's shape here, like the front door.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use switchyard_core::models::{ModelConfig, ModelTable};
use switchyard_store::Principal;

use crate::auth::Auth;
use crate::error::ApiError;
use crate::openai::error::OaiErrorBody;
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

/// Why a tenant cannot use a model name.
#[derive(Debug)]
pub enum ModelRefused {
    /// Not routable here (message from the table).
    Unknown(String),
    /// Routable, but not enabled for this tenant.
    NotAllowed,
}

impl ModelRefused {
    pub fn message(&self, model: &str) -> String {
        match self {
            ModelRefused::Unknown(m) => m.clone(),
            ModelRefused::NotAllowed => format!("model `{model}` is not enabled for this tenant"),
        }
    }
}

/// Checks that `model` resolves in the table and that the tenant may use it (fallbacks the
/// operator configured are not checked: they are the alias' own business).
pub fn usable(table: &ModelTable, principal: &Principal, model: &str) -> Result<(), ModelRefused> {
    table
        .resolve(model)
        .map_err(|e| ModelRefused::Unknown(e.to_string()))?;
    if principal.may_use(model) {
        Ok(())
    } else {
        Err(ModelRefused::NotAllowed)
    }
}

/// The models, sorted by id.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<Model>,
}

/// List the model aliases this server can route and the caller's tenant may use.
#[utoipa::path(
    get, path = "/v1/models", tag = "models",
    responses(
        (status = 200, body = ModelList),
        (status = 401, description = "invalid_api_key", body = OaiErrorBody),
        (status = 403, description = "permission_error", body = OaiErrorBody),
        (status = 429, description = "rate_limit_exceeded", body = OaiErrorBody),
        (status = 503, description = "unavailable", body = OaiErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_models(
    State(table): State<Arc<ModelTable>>,
    auth: Result<Auth, ApiError>,
) -> Result<Json<ModelList>, OaiError> {
    let Auth(principal) = auth?;
    let data = table
        .listed()
        .into_iter()
        .filter(|(alias, _)| principal.may_use(alias))
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
        (status = 401, description = "invalid_api_key", body = OaiErrorBody),
        (status = 403, description = "permission_error", body = OaiErrorBody),
        (status = 429, description = "rate_limit_exceeded", body = OaiErrorBody),
        (status = 404, description = "model_not_found", body = OaiErrorBody),
        (status = 503, description = "unavailable", body = OaiErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_model(
    State(table): State<Arc<ModelTable>>,
    auth: Result<Auth, ApiError>,
    Path(id): Path<String>,
) -> Result<Json<Model>, OaiError> {
    let Auth(principal) = auth?;
    table
        .listed()
        .into_iter()
        .find(|(alias, _)| *alias == id && principal.may_use(alias))
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
