//! The deployment manifests against the code: every KEDA trigger under `deploy/k8s` reads the
//! backlog gauge the API really exports (its name comes from `switchyard_api::metrics`), for a
//! queue that the scaled Deployment's workers really serve, and every queue they serve has a
//! trigger. The CRDs have no schema in kubernetes-validate, so their shape is checked here.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;
use serde_yaml::Value;
use sqlx::PgPool;

use crate::support::{spawn_app_with, Opts};

fn manifests() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s/base");
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v = Value::deserialize(doc).unwrap();
                if !v.is_null() {
                    docs.push(v);
                }
            }
        }
    }
    docs
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

/// The queues a worker Deployment serves (`worker --queues a,b`).
fn served_queues(deployment: &Value) -> BTreeSet<String> {
    let args: Vec<String> = s(deployment, &["spec", "template", "spec", "containers"])[0]["args"]
        .as_sequence()
        .expect("the container has args")
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(args.first().map(String::as_str), Some("worker"), "{args:?}");
    let at = args.iter().position(|a| a == "--queues").expect("--queues");
    args[at + 1].split(',').map(str::to_string).collect()
}

/// `(metric, queue)` read by a trigger's PromQL query.
fn query_reads(q: &str) -> (String, String) {
    let metric: String = {
        let start = q.find("switchyard_").expect("a switchyard_ metric");
        q[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let label = q.find("queue=\"").expect("a queue label") + "queue=\"".len();
    let queue: String = q[label..].chars().take_while(|c| *c != '"').collect();
    (metric, queue)
}

#[sqlx::test(migrator = "switchyard_store::MIGRATOR")]
async fn keda_triggers_read_exported_metrics_of_served_queues(pool: PgPool) {
    let docs = manifests();
    let scaled: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ScaledObject")
        .collect();
    assert!(
        scaled.len() >= 2,
        "the LLM and sandbox workers are autoscaled"
    );
    let mut wanted: Vec<(String, String)> = Vec::new();
    for so in &scaled {
        assert_eq!(so["apiVersion"], "keda.sh/v1alpha1");
        let target = s(so, &["spec", "scaleTargetRef", "name"]).as_str().unwrap();
        let dep = docs
            .iter()
            .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == target)
            .unwrap_or_else(|| panic!("no Deployment {target}"));
        let served = served_queues(dep);
        let min = so["spec"]["minReplicaCount"].as_u64().unwrap();
        let max = so["spec"]["maxReplicaCount"].as_u64().unwrap();
        assert!(min <= max && max > 0);
        assert!(so["spec"]["cooldownPeriod"].as_u64().unwrap() > 0);
        let mut triggered = BTreeSet::new();
        for t in so["spec"]["triggers"].as_sequence().unwrap() {
            assert_eq!(t["type"], "prometheus", "{target}");
            let m = &t["metadata"];
            assert!(m["serverAddress"].as_str().unwrap().starts_with("http"));
            assert!(m["threshold"].as_str().unwrap().parse::<f64>().unwrap() > 0.0);
            let (metric, queue) = query_reads(m["query"].as_str().unwrap());
            assert_eq!(
                metric,
                switchyard_api::metrics::queue_backlog_metric(),
                "{target} scales on the backlog gauge"
            );
            assert!(
                served.contains(&queue),
                "{target} scales on queue {queue} but serves {served:?}"
            );
            triggered.insert(queue.clone());
            wanted.push((metric, queue));
        }
        assert_eq!(
            triggered, served,
            "{target}: a trigger for every queue it serves"
        );
    }
    // ... and those series exist: the API exports the backlog of every queue a worker serves
    let queues: BTreeSet<String> = wanted.iter().map(|w| w.1.clone()).collect();
    let app = spawn_app_with(
        pool,
        Opts {
            configure: Some(std::sync::Arc::new(move |cfg| {
                cfg.worker.queues = queues.iter().cloned().collect();
            })),
            ..Opts::default()
        },
    )
    .await;
    app.wait_epoch().await;
    let mut text = String::new();
    for _ in 0..100 {
        text = app.metrics_text().await;
        if wanted
            .iter()
            .all(|(m, q)| text.contains(&format!("{m}{{queue=\"{q}\"")))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for (m, q) in &wanted {
        assert!(
            text.contains(&format!("{m}{{queue=\"{q}\"")),
            "/metrics has no {m} for queue {q}:\n{text}"
        );
    }
    app.stop().await;
}
