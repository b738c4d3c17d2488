//! Lease reclaim: every quarter lease, a worker takes over (XAUTOCLAIM) entries of its queues
//! whose worker stopped heartbeating, highest priority first, as far as it has free slots.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::deliver::spawn_batch;
use crate::runtime::Shared;

pub(crate) async fn reclaim_loop(s: Arc<Shared>, stop: CancellationToken) {
    // one loop per queue: each waits in line for its queue's slots as long as it takes (a
    // wait that gave up after a while lost its place to the fetch loop, which queues again
    // right after each slot it gets: under steady load reclaim then never got one)
    let loops = s
        .opts
        .queues
        .iter()
        .map(|q| reclaim_queue(s.clone(), q.clone(), stop.clone()));
    futures::future::join_all(loops).await;
}

async fn reclaim_queue(s: Arc<Shared>, q: String, stop: CancellationToken) {
    let every = (s.opts.lease / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    let mut cursors: HashMap<i16, String> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let slots = s.slots_for(&q);
        // wait in line for one slot (the semaphore is fair), then take whatever else is free
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            p = slots.clone().acquire_owned() => p,
        };
        let Ok(first) = first else { return };
        let mut permits = vec![first];
        while permits.len() < 32 {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        // highest priority first, while there are free slots
        for p in switchyard_queue::keys::PRIORITIES.iter().rev() {
            if permits.is_empty() {
                break;
            }
            let cursor = cursors.entry(*p).or_insert_with(|| "0-0".into());
            match s
                .queue
                .reclaim(&q, *p, &s.id, s.opts.lease, cursor, permits.len())
                .await
            {
                Ok(ds) => {
                    if !ds.is_empty() {
                        if let Err(e) = s.queue.count_reclaims(&q, ds.len() as u64).await {
                            tracing::debug!(error = %e, "could not count reclaims");
                        }
                    }
                    for d in &ds {
                        tracing::info!(job_id = %d.job_id, queue = %q, "reclaimed a job whose lease expired");
                    }
                    spawn_batch(&s, ds, &mut permits).await;
                }
                Err(e) => {
                    *cursor = "0-0".into();
                    tracing::debug!(error = %e, queue = %q, "reclaim failed");
                }
            }
        }
    }
}
