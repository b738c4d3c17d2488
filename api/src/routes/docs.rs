//! `GET /docs`: the API reference as one HTML page, rendered on the server from the same
//! OpenAPI document as `/openapi.json` (no scripts, no CDN: it works in air-gapped clusters).

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

/// The API reference (HTML).
#[utoipa::path(get, path = "/docs", tag = "ops", responses((status = 200, description = "The API reference, rendered from /openapi.json", content_type = "text/html; charset=utf-8")))]
pub async fn docs() -> Response {
    let doc = serde_json::to_value(crate::openapi::document()).unwrap_or(Value::Null);
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'",
            ),
        ],
        render(&doc),
    )
        .into_response()
}

/// One operation: method, path, its OpenAPI object.
type Op<'a> = (&'a str, &'a str, &'a Value);

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

const STYLE: &str = "body{font:15px/1.5 system-ui,sans-serif;max-width:62rem;margin:2rem auto;\
padding:0 1rem;color:#1b1f24}code,pre{font:13px ui-monospace,monospace;background:#f4f5f7;\
padding:.1rem .3rem;border-radius:3px}pre{padding:.6rem;overflow:auto}h2{border-bottom:1px solid \
#ddd;margin-top:2.5rem}.op{border:1px solid #ddd;border-radius:6px;padding:.4rem 1rem;margin:\
1rem 0}.m{font-weight:700;text-transform:uppercase;display:inline-block;min-width:4rem}\
.get{color:#0b6e4f}.post{color:#1d4ed8}.patch,.put{color:#9a6700}.delete{color:#b42318}\
table{border-collapse:collapse;margin:.4rem 0}td,th{border:1px solid #e3e3e3;padding:.2rem \
.5rem;text-align:left;vertical-align:top}nav a{margin-right:.8rem}";

/// Renders the document as HTML (every string escaped).
pub fn render(doc: &Value) -> String {
    let mut out = String::with_capacity(64 * 1024);
    let title = esc(doc["info"]["title"].as_str().unwrap_or("API"));
    let version = esc(doc["info"]["version"].as_str().unwrap_or(""));
    out.push_str(&format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title} \
         reference</title><style>{STYLE}</style></head><body><h1>{title} <small>{version}</small></h1>\
         <p>Machine-readable: <a href=\"/openapi.json\">/openapi.json</a>.</p>"
    ));
    let empty = serde_json::Map::new();
    let paths = doc["paths"].as_object().unwrap_or(&empty);
    // operations grouped by their first tag, in the order tags first appear
    let mut groups: Vec<(String, Vec<Op>)> = Vec::new();
    for (path, item) in paths {
        for m in METHODS {
            let Some(op) = item.get(m) else { continue };
            let tag = op["tags"][0].as_str().unwrap_or("other").to_string();
            match groups.iter_mut().find(|(t, _)| *t == tag) {
                Some((_, ops)) => ops.push((m, path, op)),
                None => groups.push((tag, vec![(m, path, op)])),
            }
        }
    }
    out.push_str("<nav>");
    for (tag, _) in &groups {
        out.push_str(&format!("<a href=\"#tag-{0}\">{0}</a>", esc(tag)));
    }
    out.push_str("<a href=\"#schemas\">schemas</a></nav>");
    if let Some(d) = doc["info"]["description"].as_str() {
        out.push_str(&format!("<pre>{}</pre>", esc(d)));
    }
    for (tag, ops) in &groups {
        out.push_str(&format!("<h2 id=\"tag-{0}\">{0}</h2>", esc(tag)));
        for (m, path, op) in ops {
            operation(&mut out, m, path, op);
        }
    }
    out.push_str("<h2 id=\"schemas\">Schemas</h2>");
    if let Some(schemas) = doc["components"]["schemas"].as_object() {
        for (name, s) in schemas {
            out.push_str(&format!(
                "<div class=\"op\" id=\"schema-{0}\"><h3>{0}</h3>",
                esc(name)
            ));
            if let Some(d) = s["description"].as_str() {
                out.push_str(&format!("<p>{}</p>", esc(d)));
            }
            properties(&mut out, s);
            out.push_str("</div>");
        }
    }
    out.push_str("</body></html>");
    out
}

fn operation(out: &mut String, method: &str, path: &str, op: &Value) {
    out.push_str(&format!(
        "<div class=\"op\"><p><span class=\"m {method}\">{method}</span> <code>{}</code></p>",
        esc(path)
    ));
    if let Some(s) = op["summary"].as_str() {
        out.push_str(&format!("<p><b>{}</b></p>", esc(s)));
    }
    if let Some(d) = op["description"].as_str() {
        out.push_str(&format!("<p>{}</p>", esc(d)));
    }
    if let Some(params) = op["parameters"].as_array().filter(|p| !p.is_empty()) {
        out.push_str(
            "<table><tr><th>parameter</th><th>in</th><th>type</th><th>description</th></tr>",
        );
        for p in params {
            out.push_str(&format!(
                "<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(p["name"].as_str().unwrap_or("")),
                if p["required"].as_bool() == Some(true) {
                    " *"
                } else {
                    ""
                },
                esc(p["in"].as_str().unwrap_or("")),
                type_of(&p["schema"]),
                esc(p["description"].as_str().unwrap_or("")),
            ));
        }
        out.push_str("</table>");
    }
    if let Some(content) = op["requestBody"]["content"].as_object() {
        for (mime, c) in content {
            out.push_str(&format!(
                "<p>Body <code>{}</code>: {}</p>",
                esc(mime),
                type_of(&c["schema"])
            ));
        }
    }
    if let Some(responses) = op["responses"].as_object() {
        out.push_str("<table><tr><th>status</th><th>description</th><th>body</th></tr>");
        for (status, r) in responses {
            let body = r["content"]
                .as_object()
                .and_then(|c| c.values().next())
                .map(|c| type_of(&c["schema"]))
                .unwrap_or_default();
            out.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{body}</td></tr>",
                esc(status),
                esc(r["description"].as_str().unwrap_or(""))
            ));
        }
        out.push_str("</table>");
    }
    out.push_str("</div>");
}

fn properties(out: &mut String, schema: &Value) {
    let Some(props) = schema["properties"].as_object() else {
        return;
    };
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    out.push_str("<table><tr><th>field</th><th>type</th><th>description</th></tr>");
    for (name, p) in props {
        out.push_str(&format!(
            "<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            if required.contains(&name.as_str()) {
                " *"
            } else {
                ""
            },
            type_of(p),
            esc(p["description"].as_str().unwrap_or(""))
        ));
    }
    out.push_str("</table>");
}

/// A short type: a link for a `$ref`, `array of …`, one of several, or the plain type.
fn type_of(s: &Value) -> String {
    if let Some(r) = s["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap_or(r);
        return format!("<a href=\"#schema-{0}\">{0}</a>", esc(name));
    }
    for key in ["oneOf", "anyOf", "allOf"] {
        if let Some(v) = s[key].as_array() {
            let parts: Vec<String> = v.iter().map(type_of).collect();
            return parts.join(" | ");
        }
    }
    match &s["type"] {
        Value::String(t) if t == "array" => format!("array of {}", type_of(&s["items"])),
        Value::String(t) => esc(t),
        Value::Array(ts) => esc(&ts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" | ")),
        _ => String::new(),
    }
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_and_schema_is_rendered_and_text_is_escaped() {
        let doc = serde_json::json!({
            "info": {"title": "T<x>", "version": "1"},
            "paths": {"/v1/a/{id}": {
                "get": {"tags": ["jobs"], "summary": "Get <a>", "parameters": [
                    {"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "ok", "content": {"application/json":
                        {"schema": {"$ref": "#/components/schemas/Job"}}}}}},
                "delete": {"tags": ["jobs"], "responses": {"204": {"description": "gone"}}}}},
            "components": {"schemas": {"Job": {"properties": {"id": {"type": "string"}},
                "required": ["id"]}}}
        });
        let html = render(&doc);
        assert!(html.contains("T&lt;x&gt;"));
        assert!(!html.contains("<x>"));
        assert!(html.contains("<span class=\"m get\">get</span> <code>/v1/a/{id}</code>"));
        assert!(html.contains("<span class=\"m delete\">delete</span>"));
        assert!(html.contains("Get &lt;a&gt;"));
        assert!(html.contains("<a href=\"#schema-Job\">Job</a>"));
        assert!(html.contains("id=\"schema-Job\""));
    }
}
