//! Redis side of Switchyard: job dispatch over Streams (consumer groups, leases, reclaim),
//! the delayed set, the epoch that detects data loss, live job events and cancel notices.
//!
//! Redis is never the source of truth: everything here can be rebuilt from Postgres.

pub mod conn;
pub mod consumers;
pub mod events;
pub mod fair;
pub mod keys;
pub mod lease;
pub mod live;
pub mod queue;
pub mod quotas;
pub mod registry;
#[cfg(feature = "test-support")]
pub mod testing;

pub use events::EventBus;
pub use keys::Keys;
pub use live::{LiveHub, LiveMsg, LiveSubscription};
pub use queue::{Delivery, Fetched, Queue};
pub use quotas::{DailyUse, Quotas, RateDecision};

use std::time::Duration;

pub use conn::{RedisClient, RedisConn};

/// [`RedisClient::connect`], retrying with backoff for about a minute (a restarting Redis is not fatal).
pub async fn connect_retrying(client: &RedisClient) -> redis::RedisResult<RedisConn> {
    let mut delay = Duration::from_millis(100);
    let mut tries = 0;
    loop {
        match client.connect(Duration::from_secs(5)).await {
            Ok(c) => return Ok(c),
            Err(e) if tries >= 60 => return Err(e),
            Err(e) => {
                if tries % 10 == 0 {
                    tracing::warn!(error = %e, "waiting for redis");
                }
                tries += 1;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Whether an error is worth a retry after a pause (connection trouble, failover, loading).
pub fn is_transient(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            redis::ErrorKind::BusyLoadingError
                | redis::ErrorKind::TryAgain
                | redis::ErrorKind::ClusterDown
                | redis::ErrorKind::MasterDown
        )
}
