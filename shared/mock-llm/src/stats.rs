//! Observation for tests: per-model call counters (`GET /mock/stats`) kept up to
//! date by a drop guard, and a bounded log of recent requests (`GET /mock/requests`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::server::{AppState, Route};

/// How many requests `GET /mock/requests` remembers (over all models).
pub(crate) const REQUEST_LOG_CAPACITY: usize = 200;

/// Headers recorded besides every `x-*` header.
const RECORDED_HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "anthropic-version",
    "content-type",
];

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    calls: u64,
    completed: u64,
    aborted: u64,
}

#[derive(Debug)]
struct Recorded {
    route: Route,
    model: Option<String>,
    headers: Map<String, Value>,
    body: Value,
}

/// Counters and the request log. Locks are only held for a few map operations.
#[derive(Debug, Default)]
pub(crate) struct Observer {
    models: Mutex<BTreeMap<String, Counters>>,
    requests: Mutex<VecDeque<Recorded>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Observer {
    /// Counts a call to `model`; returns its 1-based number for that model and
    /// the guard that settles its outcome.
    pub fn begin(self: &Arc<Self>, model: &str) -> (u64, CallGuard) {
        let mut models = lock(&self.models);
        let c = models.entry(model.to_owned()).or_default();
        c.calls += 1;
        let n = c.calls;
        drop(models);
        let guard = CallGuard {
            observer: Arc::clone(self),
            model: model.to_owned(),
            settled: false,
        };
        (n, guard)
    }

    fn bump(&self, model: &str, f: impl FnOnce(&mut Counters)) {
        f(lock(&self.models).entry(model.to_owned()).or_default());
    }

    /// Appends a request to the log, dropping the oldest beyond the capacity.
    pub fn record(&self, route: Route, headers: &HeaderMap, body: Value) {
        let mut kept = Map::new();
        for (name, value) in headers {
            let name = name.as_str();
            if name.starts_with("x-") || RECORDED_HEADERS.contains(&name) {
                kept.entry(name.to_owned()).or_insert_with(|| {
                    Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned())
                });
            }
        }
        let model = body.get("model").and_then(Value::as_str).map(str::to_owned);
        let mut log = lock(&self.requests);
        while log.len() >= REQUEST_LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(Recorded {
            route,
            model,
            headers: kept,
            body,
        });
    }

    fn stats_json(&self) -> Value {
        let models: Map<String, Value> = lock(&self.models)
            .iter()
            .map(|(name, c)| {
                (
                    name.clone(),
                    json!({ "calls": c.calls, "completed": c.completed, "aborted": c.aborted }),
                )
            })
            .collect();
        json!({ "models": models })
    }

    fn requests_json(&self, model: Option<&str>) -> Value {
        let requests: Vec<Value> = lock(&self.requests)
            .iter()
            .filter(|r| model.is_none() || r.model.as_deref() == model)
            .map(|r| json!({ "route": r.route.name(), "headers": r.headers, "body": r.body }))
            .collect();
        json!({ "requests": requests })
    }
}

/// Settles one call's outcome. Dropping it unsettled (the client went away while
/// the handler waited or the body streamed) counts the call as aborted.
#[derive(Debug)]
pub(crate) struct CallGuard {
    observer: Arc<Observer>,
    model: String,
    settled: bool,
}

impl CallGuard {
    /// The response was fully produced.
    pub fn complete(&mut self) {
        if !std::mem::replace(&mut self.settled, true) {
            self.observer.bump(&self.model, |c| c.completed += 1);
        }
    }

    /// The call ended on purpose without completing (an error, a scenario's cut,
    /// shutdown): count it as neither completed nor aborted.
    pub fn settle(&mut self) {
        self.settled = true;
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.settled {
            tracing::debug!(model = %self.model, "mock LLM request abandoned by the client");
            self.observer.bump(&self.model, |c| c.aborted += 1);
        }
    }
}

pub(crate) async fn stats(State(state): State<AppState>) -> Json<Value> {
    Json(state.observer.stats_json())
}

#[derive(Debug, Deserialize)]
pub(crate) struct RequestsQuery {
    model: Option<String>,
}

pub(crate) async fn requests(
    State(state): State<AppState>,
    Query(q): Query<RequestsQuery>,
) -> Json<Value> {
    Json(state.observer.requests_json(q.model.as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn guard_outcomes() {
        let o = Arc::new(Observer::default());
        let (n1, mut g1) = o.begin("m");
        let (n2, mut g2) = o.begin("m");
        let (n3, _g3) = o.begin("m");
        assert_eq!((n1, n2, n3), (1, 2, 3));
        g1.complete();
        g1.complete();
        g2.settle();
        drop((g1, g2, _g3));
        assert_eq!(
            o.stats_json(),
            json!({ "models": { "m": { "calls": 3, "completed": 1, "aborted": 1 } } })
        );
    }

    #[test]
    fn request_log_is_bounded_and_filtered() {
        let o = Observer::default();
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer k"));
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("user-agent", HeaderValue::from_static("t"));
        for i in 0..(REQUEST_LOG_CAPACITY + 5) {
            let model = if i % 2 == 0 { "a" } else { "b" };
            o.record(Route::OpenAi, &h, json!({ "model": model, "i": i }));
        }
        let all = o.requests_json(None);
        let all = all["requests"].as_array().expect("array");
        assert_eq!(all.len(), REQUEST_LOG_CAPACITY);
        assert_eq!(all[0]["body"]["i"], 5);
        assert_eq!(
            all[0]["headers"],
            json!({ "authorization": "Bearer k", "x-custom": "1" })
        );
        let a = o.requests_json(Some("a"));
        assert!(a["requests"]
            .as_array()
            .expect("array")
            .iter()
            .all(|r| r["body"]["model"] == "a" && r["route"] == "openai"));
    }
}
