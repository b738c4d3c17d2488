//! Chaos tests: workers SIGKILLed over and over, Redis restarted empty, Postgres restarted
//! under load. Each checks that every job reaches exactly one terminal state (the job audit
//! trail records each state change in the job's own transaction) and none is lost.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use switchyard::devsvc::{private_postgres, private_redis};
use uuid::Uuid;

use crate::cluster::{env_database_url, env_redis_url, free_port, Cluster};

/// Submits `n` jobs of `body` through `POST /v1/jobs/batch`, 1,000 at a time.
async fn submit_many(c: &Cluster, api: &str, n: usize, body: &Value) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(n);
    while ids.len() < n {
        let k = (n - ids.len()).min(1000);
        let r = c
            .http
            .post(format!("{api}/v1/jobs/batch"))
            .bearer_auth(&c.key)
            .json(&json!({ "jobs": vec![body.clone(); k] }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let v: Value = r.json().await.unwrap();
        for j in v["jobs"].as_array().unwrap() {
            ids.push(j["id"].as_str().unwrap().parse().unwrap());
        }
    }
    ids
}

async fn count_status(c: &Cluster, status: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = $1")
        .bind(status)
        .fetch_one(c.store.pool())
        .await
        .unwrap_or(-1)
}

/// Waits until `n` jobs succeeded (panics after `limit`, naming what is left).
async fn wait_succeeded(c: &Cluster, n: i64, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let done = count_status(c, "succeeded").await;
        if done == n {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let left: Vec<(String, i64)> =
                sqlx::query_as("SELECT status, count(*) FROM jobs GROUP BY status")
                    .fetch_all(c.store.pool())
                    .await
                    .unwrap();
            let why = explain_stuck(c).await;
            panic!("{done} of {n} jobs succeeded in {limit:?}: {left:?}\n{why}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where the unfinished jobs are: their rows, and the Redis state of their queue (counters,
/// limits, streams, pending entries, lanes, delayed set) with each job's place in it.
async fn explain_stuck(c: &Cluster) -> String {
    use std::fmt::Write;
    type Row = (
        Uuid,
        Uuid,
        String,
        i32,
        i64,
        String,
        Option<String>,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, tenant_id, status, attempt, dispatch_epoch, queue, run_at::text,
                lease_owner || ' until ' || lease_expires_at::text
         FROM jobs WHERE status IN ('queued', 'running') ORDER BY id LIMIT 30",
    )
    .fetch_all(c.store.pool())
    .await
    .unwrap_or_default();
    let mut out = String::new();
    let Ok(mut r) = redis::Client::open(c.redis_url.as_str()).and_then(|x| x.get_connection())
    else {
        return "redis unreachable".into();
    };
    let keys = switchyard_queue::keys::Keys::new(&c.prefix);
    let epoch: Option<i64> = redis::cmd("GET").arg(keys.epoch()).query(&mut r).ok();
    let _ = writeln!(out, "redis epoch {epoch:?}");
    let mut queues: Vec<String> = rows.iter().map(|x| x.5.clone()).collect();
    queues.dedup();
    for q in &queues {
        let hget = |r: &mut redis::Connection, k: String| -> Vec<(String, String)> {
            redis::cmd("HGETALL").arg(k).query(r).unwrap_or_default()
        };
        let _ = writeln!(out, "queue {q}: fair {:?}", hget(&mut r, keys.fair(q)));
        let _ = writeln!(out, "  limits {:?}", hget(&mut r, keys.limits(q)));
        for p in 0..=9i16 {
            let s = keys.stream(q, p);
            let len: i64 = redis::cmd("XLEN").arg(&s).query(&mut r).unwrap_or(-1);
            if len <= 0 {
                continue;
            }
            let pending: redis::Value = redis::cmd("XPENDING")
                .arg(&s)
                .arg(switchyard_queue::keys::GROUP)
                .query(&mut r)
                .unwrap_or(redis::Value::Nil);
            let groups: redis::Value = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&s)
                .query(&mut r)
                .unwrap_or(redis::Value::Nil);
            let _ = writeln!(
                out,
                "  p{p}: len {len}, pending {pending:?}, groups {groups:?}"
            );
        }
        let lanes: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:t:*", keys.queue_base(q)))
            .query(&mut r)
            .unwrap_or_default();
        for l in &lanes {
            let n: i64 = redis::cmd("LLEN").arg(l).query(&mut r).unwrap_or(-1);
            let _ = writeln!(out, "  lane {l}: {n}");
        }
        let delayed: i64 = redis::cmd("ZCARD")
            .arg(keys.delayed(q))
            .query(&mut r)
            .unwrap_or(-1);
        let _ = writeln!(out, "  delayed {delayed}");
    }
    for (id, tenant, status, attempt, epoch, q, run_at, lease) in &rows {
        let job = id.to_string();
        let mut at = Vec::new();
        for p in 0..=9i16 {
            let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(keys.stream(q, p))
                .arg("-")
                .arg("+")
                .query(&mut r)
                .unwrap_or_default();
            for (eid, f) in entries {
                if f.iter().any(|(k, v)| k == "job" && *v == job) {
                    at.push(format!("p{p} entry {eid}"));
                }
            }
            let lane = format!("{}:t:{tenant}:p{p}", keys.queue_base(q));
            let l: Vec<String> = redis::cmd("LRANGE")
                .arg(&lane)
                .arg(0)
                .arg(-1)
                .query(&mut r)
                .unwrap_or_default();
            if l.contains(&job) {
                at.push(format!("lane p{p}"));
            }
        }
        let _ = writeln!(
            out,
            "job {id} {status} attempt {attempt} epoch {epoch} run_at {run_at:?} lease {lease:?}: {at:?}"
        );
    }
    out
}

/// Every job of `ids` has exactly one terminal state change in its audit trail (chained or
/// still in the outbox); returns how many jobs ran more than once (at-least-once re-runs).
async fn assert_one_terminal_each(c: &Cluster, ids: &[Uuid]) -> i64 {
    let targets: Vec<String> = ids.iter().map(|id| format!("job:{id}")).collect();
    let (once, more): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE n = 1), count(*) FILTER (WHERE n > 1) FROM (
             SELECT target, count(*) AS n FROM (
                 SELECT e ->> 'target', e ->> 'action'
                 FROM job_audit_batches, jsonb_array_elements(entries) e
                 UNION ALL SELECT 'job:' || c.id, 'job.' || c.status
                 FROM job_audit_changes b, unnest(b.job_ids, b.statuses) c (id, status)
                 UNION ALL SELECT target, action FROM audit_outbox
                 UNION ALL SELECT target, action FROM audit_events) a (target, action)
             WHERE action IN ('job.succeeded', 'job.failed', 'job.cancelled')
               AND target = ANY($1)
             GROUP BY target) t",
    )
    .bind(&targets)
    .fetch_one(c.store.pool())
    .await
    .unwrap();
    assert_eq!(more, 0, "jobs with more than one terminal state");
    assert_eq!(once, ids.len() as i64, "jobs without a terminal state");
    let ids: Vec<Uuid> = ids.to_vec();
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE id = ANY($1) AND attempt > 1")
        .bind(&ids)
        .fetch_one(c.store.pool())
        .await
        .unwrap()
}

fn scratch_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("switchyard-{name}-{}", Uuid::new_v4().simple()))
}

/// Chaos 1: a worker is SIGKILLed every two seconds (and replaced) while 10,000 jobs run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_a_worker_every_two_seconds_under_10000_jobs() {
    let mut c = Cluster::new().await;
    let api = c.api().await;
    c.spawn("scheduler", &["scheduler"]);
    let mut workers = vec![c.worker(64), c.worker(64)];
    let body = json!({"kind": "system.noop", "input": {"sleep_ms": 20}, "max_attempts": 10});
    let ids = submit_many(&c, &api, 10_000, &body).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let mut kills = 0;
    while count_status(&c, "succeeded").await < ids.len() as i64 {
        assert!(tokio::time::Instant::now() < deadline, "not done in time");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let victim = workers.remove(0);
        c.children[victim].1.kill().unwrap(); // SIGKILL
        c.children[victim].1.wait().unwrap();
        kills += 1;
        workers.push(c.worker(64));
    }
    wait_succeeded(&c, ids.len() as i64, Duration::from_secs(60)).await;
    let reruns = assert_one_terminal_each(&c, &ids).await;
    eprintln!(
        "chaos sigkill: {} jobs, {kills} workers killed, {reruns} jobs ran more than once",
        ids.len()
    );
    assert!(kills >= 1);
}

/// Chaos 2: Redis (no persistence) is stopped mid-run and started again empty; jobs accepted
/// while it is down are kept; the reconciler restores dispatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_mid_run_loses_nothing() {
    let dir = scratch_dir("redis");
    let port = free_port();
    let Some(redis) = private_redis(&dir, port).await.unwrap() else {
        panic!("redis-server is not installed (scripts/test.sh installs it)");
    };
    let url = format!("redis://127.0.0.1:{port}");
    let mut c = Cluster::on(&env_database_url(), &url).await;
    let api = c.api().await;
    c.spawn("scheduler", &["scheduler"]);
    c.worker(32);
    c.worker(32);
    let body = json!({"kind": "system.noop", "input": {"sleep_ms": 10}, "max_attempts": 10});
    let mut ids = submit_many(&c, &api, 3000, &body).await;
    while count_status(&c, "succeeded").await < 300 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(redis); // its data is gone with it
                 // accepted while Redis is down: committed to Postgres, dispatched later
    ids.extend(submit_many(&c, &api, 200, &body).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let redis = private_redis(&dir, port).await.unwrap().unwrap();
    wait_succeeded(&c, ids.len() as i64, Duration::from_secs(180)).await;
    let reruns = assert_one_terminal_each(&c, &ids).await;
    eprintln!(
        "chaos redis restart: {} jobs, {reruns} ran more than once",
        ids.len()
    );
    drop(c);
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Chaos 3: Postgres is stopped mid-run: the API answers 503 with `Retry-After` (and readiness
/// goes red) instead of hanging; when it is back, everything resumes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_run_answers_503_then_resumes() {
    let dir = scratch_dir("pg");
    let port = free_port();
    let Some(pg) = private_postgres(&dir, port).await.unwrap() else {
        panic!("postgres is not installed (scripts/test.sh installs it)");
    };
    let base = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let mut c = Cluster::on(&base, &env_redis_url()).await;
    let api = c.api().await;
    c.spawn("scheduler", &["scheduler"]);
    c.worker(32);
    let body = json!({"kind": "system.noop", "input": {"sleep_ms": 10}, "max_attempts": 10});
    let mut ids = submit_many(&c, &api, 2000, &body).await;
    while count_status(&c, "succeeded").await < 200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(pg); // fast shutdown: every connection is cut

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let r = http
        .post(format!("{api}/v1/jobs"))
        .bearer_auth(&c.key)
        .json(&body)
        .send()
        .await
        .expect("the API answers while Postgres is down");
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unavailable", "{v}");
    let r = http.get(format!("{api}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["postgres"], "unreachable", "{v}");

    let pg = private_postgres(&dir, port).await.unwrap().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = http.get(format!("{api}/readyz")).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ids.push(c.submit(&api, body.clone()).await);
    wait_succeeded(&c, ids.len() as i64, Duration::from_secs(180)).await;
    let reruns = assert_one_terminal_each(&c, &ids).await;
    eprintln!(
        "chaos postgres restart: {} jobs, {reruns} ran more than once",
        ids.len()
    );
    drop(c);
    drop(pg);
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERMs the child with `pid` and waits for it to exit; returns whether it exited cleanly.
async fn drain_child(c: &mut Cluster, pid: u32) -> bool {
    let at = c
        .children
        .iter()
        .position(|(_, ch)| ch.id() == pid)
        .expect("a child of the cluster");
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let mut child = c.children.remove(at).1;
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap()
        .success()
}

/// A rolling update under load: a new API, worker and scheduler start next to the old ones,
/// then the old ones are drained with SIGTERM one by one (API, worker, scheduler) while clients
/// keep submitting to whichever API is up. Every job ends exactly once, and none that the
/// drained worker had taken runs again (it finished them before exiting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_loses_and_repeats_nothing() {
    let mut c = Cluster::new().await;
    let api1 = c.api().await;
    let old_api = c.children.last().unwrap().1.id();
    let old_sched = {
        let i = c.spawn("scheduler", &["scheduler"]);
        c.children[i].1.id()
    };
    let old_worker = {
        let i = c.worker(16);
        c.children[i].1.id()
    };
    let body = json!({"kind": "system.noop", "input": {"sleep_ms": 200}, "max_attempts": 10});
    let mut ids = submit_many(&c, &api1, 1000, &body).await;
    // the new generation comes up next to the old one
    let api2 = c.api().await;
    c.worker(16);
    c.spawn("scheduler", &["scheduler"]);
    while count_status(&c, "succeeded").await < 50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        drain_child(&mut c, old_api).await,
        "the old API drains cleanly"
    );
    ids.extend(submit_many(&c, &api2, 500, &body).await);
    assert!(
        drain_child(&mut c, old_worker).await,
        "the old worker drains cleanly"
    );
    ids.extend(submit_many(&c, &api2, 500, &body).await);
    assert!(
        drain_child(&mut c, old_sched).await,
        "the old scheduler stops cleanly"
    );
    wait_succeeded(&c, ids.len() as i64, Duration::from_secs(180)).await;
    let reruns = assert_one_terminal_each(&c, &ids).await;
    assert_eq!(
        reruns, 0,
        "no job ran twice: the drained worker finished what it had taken"
    );
}
