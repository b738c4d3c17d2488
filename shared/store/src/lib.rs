//! Postgres store: the source of truth for tenants, API keys and jobs (with attempt fencing),
//! and usage reports over finished jobs.

mod api_keys;
mod audit;
mod conversations;
mod end_users;
mod idempotency;
mod insert;
mod job_audit;
mod jobs;
mod marks;
mod reconcile;
mod retry;
mod run_end;
mod schedules;
mod scope;
mod tenants;
mod usage;
mod webhooks;

pub use audit::*;
pub use conversations::*;
pub use end_users::*;
pub use idempotency::*;
pub use insert::NewJob;
pub use job_audit::{Chained, JOB_AUDIT_CHAIN_LOCK};
pub use jobs::*;
pub use reconcile::{DispatchLock, DISPATCH_LOCK};
pub use retry::*;
pub use run_end::RunEndWrite;
pub use schedules::*;
pub use scope::Scope;
pub use tenants::*;
pub use usage::*;
pub use webhooks::*;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// Errors of the store. `Unavailable` means Postgres could not be reached or refused for a
/// passing reason (retry later).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("postgres unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
                StoreError::AlreadyExists(db.message().to_string())
            }
            // passing trouble, not the statement's fault: connection exceptions (08),
            // insufficient resources such as too many connections (53), operator
            // intervention such as a shutdown or a cancelled statement (57), a rolled-back
            // transaction: serialization failure, deadlock (40), a read-only server during a
            // failover (25006)
            sqlx::Error::Database(db)
                if db.code().is_some_and(|c| {
                    ["08", "53", "57", "40"].iter().any(|p| c.starts_with(p)) || c == "25006"
                }) =>
            {
                StoreError::Unavailable(e)
            }
            _ => StoreError::Database(e),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Handle to Postgres; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// A few connections whose sessions always run generic plans, for the batched statements
    /// on `jobs` (see [`Store::batch_pool`]).
    batch: PgPool,
    /// How to connect as the owner (no role), for migrations.
    owner: std::sync::Arc<PgConnectOptions>,
}

/// A small lazy pool on the same database and role whose sessions use generic plans only, and
/// no nested loops: the run end joins its arrays (`UNNEST`) with `jobs`, and with statistics
/// taken while few jobs were running the planner nested a rescan of the whole array under
/// each running job, quadratic in the batch (256 run ends: 51 ms against 18 ms with a hash
/// join). Claims and dispatch marks join nothing.
fn batch_pool(opts: &PgConnectOptions, max_connections: u32) -> PgPool {
    let opts = opts.clone().options([
        ("plan_cache_mode", "force_generic_plan"),
        ("enable_nestloop", "off"),
    ]);
    PgPoolOptions::new()
        .max_connections((max_connections / 4).clamp(1, 4))
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(opts)
}

/// Server-side bounds of every service session: a statement stalled on a lock or a slow disk
/// is cancelled (SQLSTATE 57014, answered 503 by the API, retried by workers) instead of
/// holding its caller, and its locks, indefinitely; a session idle inside a transaction (a
/// client that died mid-way) gives its locks up. Generous: the longest statements the
/// services run (a statistics refresh, a page of retention or audit chaining) take seconds.
/// Migrations connect as the owner, without these.
fn bounded(opts: PgConnectOptions) -> PgConnectOptions {
    opts.options([
        ("statement_timeout", "60s"),
        ("idle_in_transaction_session_timeout", "60s"),
    ])
}

/// The role the services act as (row-level security binds it; see the RLS migration).
pub const SERVICE_ROLE: &str = "switchyard_app";

/// The migrations, embedded at build time (no database needed to compile).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

impl Store {
    /// Connects lazily: the pool (re)connects on demand, so a Postgres outage never kills a
    /// process. Sessions act as `role` (normally [`SERVICE_ROLE`], so row-level security
    /// applies); `None` keeps the connecting user (RLS then proves nothing for an owner or
    /// superuser).
    pub fn connect_lazy(
        url: &str,
        max_connections: u32,
        role: Option<&str>,
    ) -> anyhow::Result<Store> {
        let owner: PgConnectOptions = url
            .parse()
            .map_err(|e| anyhow::anyhow!("invalid DATABASE_URL: {e}"))?;
        // Prepared statements keep their cached plans (planning every execution cost ~30 % of
        // the throughput). A generic plan cached while `jobs` was empty would keep scanning it
        // as it grows (measured: 5,000 → 1,300 jobs/s): the scheduler refreshes the table's
        // statistics as it changes (`refresh_statistics`), which re-plans every cached plan.
        let mut opts = bounded(owner.clone());
        if let Some(role) = role.filter(|r| !r.is_empty()) {
            opts = opts.options([("role", role)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(opts.clone());
        Ok(Store {
            batch: batch_pool(&opts, max_connections),
            pool,
            owner: std::sync::Arc::new(owner),
        })
    }

    /// A store on an existing pool (tests); migrations run on it too.
    pub fn from_pool(pool: PgPool) -> Store {
        let owner = std::sync::Arc::new((*pool.connect_options()).clone());
        Store {
            batch: batch_pool(&owner, pool.options().get_max_connections()),
            pool,
            owner,
        }
    }

    /// The same database as `pool`'s, acting as `role` (tests run the services' role).
    pub fn with_role(pool: &PgPool, role: &str) -> Store {
        let owner = (*pool.connect_options()).clone();
        let opts = bounded(owner.clone()).options([("role", role)]);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(opts.clone());
        Store {
            batch: batch_pool(&opts, 16),
            pool,
            owner: std::sync::Arc::new(owner),
        }
    }

    /// A transaction confined to one tenant by row-level security (one round trip to open):
    /// every statement in it sees and writes only that tenant's rows.
    pub(crate) async fn tenant_tx(
        &self,
        tenant: uuid::Uuid,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        // a UUID's text form is hex and dashes: safe to inline
        Ok(self
            .pool
            .begin_with(format!(
                "BEGIN; SET LOCAL switchyard.tenant = '{}'",
                tenant.hyphenated()
            ))
            .await?)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The pool for the batched claim, end and dispatch-mark statements on `jobs`. They take
    /// arrays of ids; Postgres plans a custom plan for each execution, since one for the
    /// actual array length always looks cheaper than the generic plan's guess of ten, and
    /// planning an update of `jobs` (ten indexes, row-level security, a locking sub-select)
    /// cost more than running it for the one or two jobs of a batch at moderate load
    /// (measured: ~0.4 ms per statement, about a fifth of Postgres' CPU at 500 chat
    /// completions/s). These sessions always run the generic plan, without nested loops (see
    /// `batch_pool` below); plans made while `jobs` was small are replaced when the scheduler
    /// refreshes its statistics.
    pub fn batch_pool(&self) -> &PgPool {
        &self.batch
    }

    /// Applies the migrations as the owner (the connecting user, not the service role).
    pub async fn migrate(&self) -> anyhow::Result<()> {
        use sqlx::Connection;
        // a Postgres that is still starting is waited for (up to about 30 s), like the pool does
        let mut tries = 0;
        let mut conn = loop {
            match sqlx::PgConnection::connect_with(&self.owner).await {
                Ok(c) => break c,
                Err(e) => {
                    let e = StoreError::from(e);
                    if tries >= 60 || !matches!(e, StoreError::Unavailable(_)) {
                        return Err(e.into());
                    }
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        MIGRATOR.run(&mut conn).await?;
        rebuild_invalid_indexes(&mut conn).await?;
        conn.close().await?;
        Ok(())
    }

    /// Runs ANALYZE on `jobs` if at least `min_changes + fraction × rows` rows changed since
    /// its statistics were last taken (by us or autovacuum); returns whether it did. Fresh
    /// statistics also invalidate every cached plan that reads the table.
    pub async fn refresh_statistics(&self, min_changes: i64, fraction: f64) -> Result<bool> {
        Ok(
            sqlx::query_scalar("SELECT switchyard_refresh_statistics($1, $2)")
                .bind(min_changes)
                .bind(fraction)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// The Redis epoch Postgres last agreed on (see the reconciler).
    pub async fn redis_epoch(&self) -> Result<i64> {
        let v: i64 = sqlx::query_scalar("SELECT value FROM system_state WHERE key = 'redis_epoch'")
            .fetch_one(&self.pool)
            .await?;
        Ok(v)
    }

    /// Starts a new Redis epoch (after Redis lost its data) and returns it.
    pub async fn bump_redis_epoch(&self, seen: i64) -> Result<i64> {
        let v: i64 = sqlx::query_scalar(
            "UPDATE system_state SET value = GREATEST(value, $1) + 1 WHERE key = 'redis_epoch' RETURNING value",
        )
        .bind(seen)
        .fetch_one(&self.pool)
        .await?;
        Ok(v)
    }
}

/// Rebuilds the indexes a concurrent build left invalid: a `CREATE INDEX CONCURRENTLY`
/// migration that failed half-way (a cancel, a statement timeout) leaves one behind, which a
/// re-run with `IF NOT EXISTS` takes for done. Rebuilt concurrently: writes go on meanwhile.
async fn rebuild_invalid_indexes(conn: &mut sqlx::PgConnection) -> anyhow::Result<()> {
    let invalid: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_index i
         JOIN pg_class c ON c.oid = i.indexrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE NOT i.indisvalid AND n.nspname = current_schema()",
    )
    .fetch_all(&mut *conn)
    .await?;
    for index in invalid {
        tracing::warn!(%index, "rebuilding an index a failed migration left invalid");
        sqlx::query(&format!("REINDEX INDEX CONCURRENTLY {index}"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
