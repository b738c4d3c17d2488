//! The binaries on a Redis Cluster: API replicas, workers and the scheduler given a
//! `redis+cluster://` URL (a private three-primary cluster) run, stream and cancel jobs.

use serde_json::json;
use switchyard_queue::testing::PrivateCluster;

use crate::cluster::{env_database_url, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_runs_on_a_redis_cluster() {
    let rc = PrivateCluster::start();
    crate::replicas_stream_each_others_jobs(Cluster::on(&env_database_url(), &rc.url).await).await;
    // the processes are gone with their test cluster; new ones on the same Redis Cluster
    // cancel a running job
    let mut c = Cluster::on(&env_database_url(), &rc.url).await;
    let api = c.api().await;
    c.worker(4);
    c.spawn("scheduler", &["scheduler"]);
    let id = c
        .submit(
            &api,
            json!({"kind": "system.noop", "input": {"sleep_ms": 30000}}),
        )
        .await;
    c.wait_status(&api, id, "running").await;
    let r = c
        .http
        .post(format!("{api}/v1/jobs/{id}/cancel"))
        .bearer_auth(&c.key)
        .send()
        .await
        .unwrap();
    assert!(r.status() == 202 || r.status() == 200, "{}", r.status());
    c.wait_status(&api, id, "cancelled").await;
}
