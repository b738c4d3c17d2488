//! Configuration: defaults, then an optional TOML file, then `SWITCHYARD_*` env vars, then
//! `DATABASE_URL` / `REDIS_URL` (or files in `SWITCHYARD_SECRETS_DIR`). Secrets are wrapped so
//! they never print.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::models::{
    ModelConfig, ModelTable, ProviderConfig, ProviderKind, MOCK_ANTHROPIC_PROVIDER, MOCK_PROVIDER,
};

/// Everything a Switchyard process may need. Each role reads the parts it uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Postgres URL (`DATABASE_URL`).
    pub database_url: SecretString,
    /// Redis URL (`REDIS_URL`).
    pub redis_url: SecretString,
    /// Prefix of every Redis key; tests use a unique one each.
    pub redis_prefix: String,
    /// The Postgres role the services act as (`role=` on every connection), so row-level
    /// security binds them; migrations run as the connecting user. Empty: act as the connecting
    /// user (RLS then proves nothing for an owner or superuser).
    pub database_role: String,
    /// Postgres connections per process (the API's pool; workers use at most this many).
    pub database_max_connections: u32,
    /// API listen address (`--listen`).
    pub listen: SocketAddr,
    /// OTLP/HTTP collector to export traces to (e.g. `http://otel-collector:4318`); unset:
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, else no export.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Where a worker or the scheduler serves `/healthz` and `/readyz` (the API serves them on
    /// `listen`). Unset: no health endpoint (containers set `0.0.0.0:9090`).
    #[serde(default)]
    pub health_listen: Option<SocketAddr>,
    /// Lease of a running job; a worker that stops heartbeating loses it after this long.
    pub lease_s: u64,
    /// Grace period for draining on SIGTERM.
    pub shutdown_grace_s: u64,
    /// Maximum request body.
    pub max_body_bytes: usize,
    /// Maximum body of `POST /v1/jobs` and `/v1/jobs/batch` (a `code.exec` job may carry an
    /// 8 MiB module and 4 MiB of files), `/v1/chat/completions` and a conversation's messages.
    pub max_job_body_bytes: usize,
    /// Failed authentications a source address may make per minute before all its requests
    /// get 429 for a while.
    pub auth_failures_per_minute: u32,
    /// Seconds an API replica reuses a credential lookup. A revoked key or a changed tenant
    /// setting is announced to every replica over Redis, which then drop their lookups at
    /// once; this bounds how long one that missed the announcement (Redis away) goes on.
    pub auth_cache_ttl_s: u64,
    /// Addresses or networks (CIDR) of reverse proxies in front of the API (nginx, an
    /// ingress): a request from one is attributed to the client its `X-Forwarded-For` names
    /// (per-source limits, the audit trail's `source`). Empty: the TCP peer (behind a proxy,
    /// every client would then share the proxy's limits).
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Audit rows older than this many days are pruned by the scheduler (0: kept forever).
    /// The database keeps them at least `audit_settings.min_retention` (30 days) whatever this
    /// says: only its owner can lower that, not the services' role.
    pub audit_retention_days: u64,
    /// Undelivered jobs one tenant (of weight 1) may have in a queue's streams before the rest
    /// waits in its own lane: another tenant's new job waits behind at most this many of each
    /// busy tenant's (fairness; see ARCHITECTURE.md).
    pub queue_lane_depth: u64,
    /// Named queues (beyond the kinds' own) this deployment holds at most: a job naming a new
    /// queue past it is refused (422 on `queue`). Every queue costs the scheduler work each
    /// pass and `/metrics` series; named queues that hold nothing and that no live worker
    /// serves are dropped from the registry by the scheduler, freeing their place.
    pub max_named_queues: u64,
    /// Of those, how many one tenant may have created (a queue counts for the tenant whose
    /// job, batch or schedule named it first), so that one tenant cannot take every place.
    pub max_named_queues_per_tenant: u64,
    /// Jobs of a queue running at once across all workers, e.g. `{ llm = 200 }`.
    #[serde(default)]
    pub queue_limits: std::collections::BTreeMap<String, u64>,
    /// Finished jobs (and their events) are pruned this many days after they ended, unless
    /// the tenant has its own setting (0: kept forever). Usage reports cover this period.
    pub job_retention_days: u64,
    /// Whether `system.noop` is accepted (on in `dev` and benchmarks).
    pub enable_noop: bool,
    /// How long a finished job's live event stream stays in Redis.
    pub event_ttl_s: u64,
    /// How long the API waits before it marks dispatched jobs with their Redis epoch
    /// (`jobs.dispatch_epoch`, one statement for all): a job a worker claims meanwhile is
    /// marked by its claim and never written for it. Keep it well below the scheduler's
    /// re-dispatch age of unmarked jobs (5 s), or jobs are dispatched twice (harmless, wasted).
    pub dispatch_mark_linger_ms: u64,
    /// JSON logs instead of text.
    pub log_json: bool,
    /// The platform operator's bearer token (`SWITCHYARD_OPERATOR_TOKEN`): manages tenants
    /// over `/v1/tenants`. Unset: those routes are closed.
    #[serde(default)]
    pub operator_token: Option<SecretString>,
    /// A bearer token `/metrics` asks for (`SWITCHYARD_METRICS_TOKEN`; the operator token is
    /// taken too). Unset: `/metrics` is public (it names queues, so keep it on an internal
    /// network then).
    #[serde(default)]
    pub metrics_token: Option<SecretString>,
    pub worker: WorkerConfig,
    pub llm: LlmConfig,
    /// `code.exec`: sandboxes, limits (`SWITCHYARD_CODE__...`).
    #[serde(default)]
    pub code: crate::code::CodeConfig,
    /// End users' JWTs (`[jwt]`).
    #[serde(default)]
    pub jwt: crate::jwt_config::JwtConfig,
    /// Tenant quotas and per-credential rates (`[quotas]`).
    #[serde(default)]
    pub quotas: crate::quota::QuotaConfig,
    /// Webhook deliveries (`[webhooks]`).
    #[serde(default)]
    pub webhooks: crate::webhook::WebhookConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// Queues this worker serves (`llm`, `system`, ...).
    pub queues: Vec<String>,
    /// Jobs run at once by one worker process (shared by the queues without their own).
    pub concurrency: usize,
    /// Queues with their own number of slots, e.g. `{ reports = 4 }` (`code` queues default to
    /// `code.concurrency`).
    #[serde(default)]
    pub queue_concurrency: std::collections::BTreeMap<String, usize>,
    /// Name prefix of this worker's consumers (a random suffix is added).
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LlmConfig {
    /// Base URL (up to, not including, `/chat/completions`) of the built-in `openai` provider.
    pub openai_base_url: String,
    pub openai_api_key: Option<SecretString>,
    /// Key of the built-in `anthropic` provider (`ANTHROPIC_API_KEY`).
    #[serde(default)]
    pub anthropic_api_key: Option<SecretString>,
    pub anthropic_base_url: String,
    /// Base URL of the mock provider serving `mock-*` models (e.g. `http://127.0.0.1:8081/v1`).
    pub mock_base_url: Option<String>,
    /// Connect timeout, and the longest silence tolerated inside a streamed reply.
    pub request_timeout_s: u64,
    /// Default time to first token of one provider call.
    pub ttft_timeout_ms: u64,
    /// Default limit of one whole provider call.
    pub call_timeout_s: u64,
    /// Provider-level retries of one model inside one job attempt (before falling back).
    pub max_retries: u32,
    /// First retry delay; doubles per retry, with jitter, capped by `retry_max_ms`.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// How long a cached LLM response is kept (exact-match cache, per tenant).
    pub cache_ttl_s: u64,
    /// Model that summarizes conversations under the `summarize` strategy (default: the
    /// turn's own model).
    #[serde(default)]
    pub summary_model: Option<String>,
    /// Extra providers by name (`openai`, `anthropic`, `mock`, `mock-anthropic` are built in
    /// when configured).
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// The model table: alias → provider, upstream model, context window, prices, fallbacks.
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
    /// Provider for bare names not in the table; default `openai` when that is configured.
    #[serde(default)]
    pub default_provider: Option<String>,
}

impl LlmConfig {
    /// The model table with the built-in providers (and the mock's demo aliases) added.
    pub fn table(&self) -> ModelTable {
        let mut providers = BTreeMap::new();
        let plain = |kind, base: &str, key: Option<SecretString>| ProviderConfig {
            kind,
            base_url: base.trim_end_matches('/').to_string(),
            api_key: key,
            api_key_env: None,
            headers: BTreeMap::new(),
            max_tokens_field: None,
            stream_usage: true,
        };
        let openai_on = self.openai_api_key.is_some() || self.openai_base_url != DEFAULT_OPENAI_URL;
        if openai_on {
            providers.insert(
                "openai".to_string(),
                plain(
                    ProviderKind::Openai,
                    &self.openai_base_url,
                    self.openai_api_key.clone(),
                ),
            );
        }
        if self.anthropic_api_key.is_some() || self.anthropic_base_url != DEFAULT_ANTHROPIC_URL {
            providers.insert(
                "anthropic".to_string(),
                plain(
                    ProviderKind::Anthropic,
                    &self.anthropic_base_url,
                    self.anthropic_api_key.clone(),
                ),
            );
        }
        let mut models = BTreeMap::new();
        if let Some(mock) = &self.mock_base_url {
            providers.insert(
                MOCK_PROVIDER.to_string(),
                plain(ProviderKind::OpenaiCompatible, mock, None),
            );
            providers.insert(
                MOCK_ANTHROPIC_PROVIDER.to_string(),
                plain(ProviderKind::Anthropic, mock, None),
            );
            models.insert("mock-echo".to_string(), ModelConfig::on(MOCK_PROVIDER));
            let mut claude = ModelConfig::on(MOCK_ANTHROPIC_PROVIDER);
            claude.model = Some("mock-echo".into());
            models.insert("mock-claude".to_string(), claude);
        }
        // a declared provider reading OPENAI_API_KEY or ANTHROPIC_API_KEY gets the key loaded
        // for it (that variable, a file of the secrets directory or `llm.*_api_key`): the
        // worker reads only the environment, so a key mounted as a file was lost
        providers.extend(self.providers.iter().map(|(name, p)| {
            let mut p = p.clone();
            if p.api_key.is_none() {
                p.api_key = match p.api_key_env.as_deref() {
                    Some("OPENAI_API_KEY") => self.openai_api_key.clone(),
                    Some("ANTHROPIC_API_KEY") => self.anthropic_api_key.clone(),
                    _ => None,
                };
            }
            (name.clone(), p)
        }));
        models.extend(self.models.clone());
        let default_provider = self
            .default_provider
            .clone()
            .or_else(|| openai_on.then(|| "openai".to_string()));
        ModelTable {
            providers,
            models,
            default_provider,
        }
    }
}

#[derive(Serialize)]
struct Defaults {
    database_url: &'static str,
    redis_url: &'static str,
    redis_prefix: &'static str,
    database_role: &'static str,
    database_max_connections: u32,
    listen: &'static str,
    lease_s: u64,
    shutdown_grace_s: u64,
    max_body_bytes: usize,
    max_job_body_bytes: usize,
    auth_failures_per_minute: u32,
    auth_cache_ttl_s: u64,
    audit_retention_days: u64,
    job_retention_days: u64,
    queue_lane_depth: u64,
    max_named_queues: u64,
    max_named_queues_per_tenant: u64,
    enable_noop: bool,
    event_ttl_s: u64,
    dispatch_mark_linger_ms: u64,
    log_json: bool,
    worker: WorkerConfig,
    llm: LlmDefaults,
}

#[derive(Serialize)]
struct LlmDefaults {
    openai_base_url: &'static str,
    anthropic_base_url: &'static str,
    request_timeout_s: u64,
    ttft_timeout_ms: u64,
    call_timeout_s: u64,
    max_retries: u32,
    retry_base_ms: u64,
    retry_max_ms: u64,
    cache_ttl_s: u64,
}

/// Longest `dispatch_mark_linger_ms`: marks must land before the scheduler re-dispatches
/// unmarked jobs (after 5 s), with room for the mark's own statement.
pub const MAX_DISPATCH_MARK_LINGER_MS: u64 = 3000;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/switchyard";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const DEFAULT_OPENAI_URL: &str = "https://api.openai.com/v1";
pub const DEFAULT_ANTHROPIC_URL: &str = "https://api.anthropic.com/v1";

fn defaults() -> Defaults {
    Defaults {
        database_url: DEFAULT_DATABASE_URL,
        redis_url: DEFAULT_REDIS_URL,
        redis_prefix: "sy",
        database_role: "switchyard_app",
        database_max_connections: 16,
        listen: "127.0.0.1:8080",
        lease_s: 30,
        shutdown_grace_s: 30,
        max_body_bytes: 1024 * 1024,
        max_job_body_bytes: 16 * 1024 * 1024,
        auth_failures_per_minute: 30,
        auth_cache_ttl_s: 5,
        audit_retention_days: 365,
        job_retention_days: 30,
        queue_lane_depth: 256,
        max_named_queues: 1000,
        max_named_queues_per_tenant: 100,
        enable_noop: false,
        event_ttl_s: 3600,
        dispatch_mark_linger_ms: 1000,
        log_json: false,
        worker: WorkerConfig {
            queues: crate::job::known_queues()
                .into_iter()
                .map(String::from)
                .collect(),
            concurrency: 64,
            queue_concurrency: Default::default(),
            name: None,
        },
        llm: LlmDefaults {
            openai_base_url: DEFAULT_OPENAI_URL,
            anthropic_base_url: DEFAULT_ANTHROPIC_URL,
            request_timeout_s: 60,
            ttft_timeout_ms: 30_000,
            call_timeout_s: 600,
            max_retries: 2,
            retry_base_ms: 250,
            retry_max_ms: 10_000,
            cache_ttl_s: 3600,
        },
    }
}

/// Files read from `SWITCHYARD_SECRETS_DIR` (when set), each into its configuration key; an
/// environment variable of the same name still wins.
pub const SECRET_FILES: [(&str, &str); 6] = [
    ("DATABASE_URL", "database_url"),
    ("REDIS_URL", "redis_url"),
    ("SWITCHYARD_OPERATOR_TOKEN", "operator_token"),
    ("SWITCHYARD_METRICS_TOKEN", "metrics_token"),
    ("OPENAI_API_KEY", "llm.openai_api_key"),
    ("ANTHROPIC_API_KEY", "llm.anthropic_api_key"),
];

impl Config {
    /// Loads the configuration. `file` overrides `SWITCHYARD_CONFIG`; a missing default file
    /// (`switchyard.toml`) is fine, a missing explicitly named one is an error.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        Self::load_from(
            file,
            std::env::var_os("SWITCHYARD_SECRETS_DIR").map(std::path::PathBuf::from),
        )
    }

    fn load_from(
        file: Option<&Path>,
        secrets: Option<std::path::PathBuf>,
    ) -> anyhow::Result<Config> {
        let mut fig = Figment::from(Serialized::defaults(defaults()));
        let named = file
            .map(|p| p.to_path_buf())
            .or_else(|| std::env::var_os("SWITCHYARD_CONFIG").map(Into::into));
        match named {
            Some(p) => {
                if !p.exists() {
                    anyhow::bail!("config file {} does not exist", p.display());
                }
                fig = fig.merge(Toml::file(p));
            }
            None => fig = fig.merge(Toml::file("switchyard.toml")),
        }
        // secrets mounted as files (a Kubernetes Secret volume): below the environment
        if let Some(dir) = secrets {
            for (file, key) in SECRET_FILES {
                let path = dir.join(file);
                match std::fs::read_to_string(&path) {
                    Ok(v) if !v.trim().is_empty() => {
                        fig = fig.merge(Serialized::default(key, v.trim().to_string()));
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => anyhow::bail!("cannot read the secret {}: {e}", path.display()),
                }
            }
        }
        fig = fig
            .merge(
                Env::prefixed("SWITCHYARD_")
                    .ignore(&["CONFIG", "LOG", "DEV_API_KEY", "SECRETS_DIR"])
                    .split("__"),
            )
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL", "REDIS_URL"])
                    .map(|k| k.as_str().to_ascii_lowercase().into()),
            )
            .merge(
                Env::raw()
                    .only(&["OPENAI_API_KEY"])
                    .map(|_| "llm.openai_api_key".into()),
            )
            .merge(
                Env::raw()
                    .only(&["ANTHROPIC_API_KEY"])
                    .map(|_| "llm.anthropic_api_key".into()),
            );
        let cfg: Config = fig
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        cfg.check()?;
        Ok(cfg)
    }

    /// A configuration with defaults only (tests adjust fields).
    pub fn for_tests(database_url: &str, redis_url: &str, redis_prefix: &str) -> Config {
        let mut cfg: Config = Figment::from(Serialized::defaults(defaults()))
            .extract()
            .expect("defaults are valid");
        cfg.database_url = database_url.to_string().into();
        cfg.redis_url = redis_url.to_string().into();
        cfg.redis_prefix = redis_prefix.to_string();
        cfg.enable_noop = true;
        cfg
    }

    /// Checks the configuration as loaded, and again after command-line flags changed it.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.lease_s >= 2, "lease_s must be at least 2");
        anyhow::ensure!(
            self.dispatch_mark_linger_ms <= MAX_DISPATCH_MARK_LINGER_MS,
            "dispatch_mark_linger_ms must be at most {MAX_DISPATCH_MARK_LINGER_MS} (the \
             scheduler re-dispatches jobs left unmarked for 5 s)"
        );
        anyhow::ensure!(
            self.worker.concurrency >= 1,
            "worker.concurrency must be at least 1"
        );
        anyhow::ensure!(
            !self.redis_prefix.is_empty() && !self.redis_prefix.contains(['{', '}']),
            "redis_prefix must be non-empty and contain no braces"
        );
        if let Some(t) = &self.operator_token {
            anyhow::ensure!(
                t.expose_secret().len() >= 32,
                "operator_token must be at least 32 characters"
            );
        }
        if let Some(t) = &self.metrics_token {
            anyhow::ensure!(
                t.expose_secret().len() >= 16,
                "metrics_token must be at least 16 characters"
            );
        }
        self.jwt.check().map_err(anyhow::Error::msg)?;
        let table = self.llm.table();
        for (alias, m) in &table.models {
            anyhow::ensure!(
                table.providers.contains_key(&m.provider),
                "llm.models.{alias}: provider `{}` is not configured (known: {})",
                m.provider,
                table
                    .providers
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            anyhow::ensure!(
                m.context_window > m.max_output_tokens,
                "llm.models.{alias}: context_window must exceed max_output_tokens"
            );
            anyhow::ensure!(
                m.input_usd_per_mtok >= 0.0 && m.output_usd_per_mtok >= 0.0,
                "llm.models.{alias}: prices must not be negative"
            );
            for f in &m.fallbacks {
                if f.is_empty() {
                    anyhow::bail!("llm.models.{alias}: empty fallback name");
                }
                if let Err(e) = table.resolve(f) {
                    anyhow::bail!("llm.models.{alias}: fallback `{f}`: {e}");
                }
            }
        }
        if let Some(m) = &self.llm.summary_model {
            if let Err(e) = table.resolve(m) {
                anyhow::bail!("llm.summary_model: {e}");
            }
        }
        if let Err(e) = crate::proxy::TrustedProxies::parse(&self.trusted_proxies) {
            anyhow::bail!("trusted_proxies: {e}");
        }
        for q in &self.worker.queues {
            if let Err(e) = crate::queueing::check_queue_name("worker.queues", q) {
                anyhow::bail!("worker.queues: `{q}`: {}", e.message);
            }
        }
        for (q, n) in &self.worker.queue_concurrency {
            anyhow::ensure!(
                self.worker.queues.contains(q),
                "worker.queue_concurrency.{q}: not one of worker.queues"
            );
            anyhow::ensure!(*n >= 1, "worker.queue_concurrency.{q} must be at least 1");
        }
        // 0 would read as "no limit" where a limit was meant (to pause a queue, stop its
        // workers; to stop a tenant, revoke its keys)
        for (q, n) in &self.queue_limits {
            anyhow::ensure!(
                *n >= 1,
                "queue_limits.{q} must be at least 1 (leave it out for no limit)"
            );
        }
        anyhow::ensure!(
            self.quotas.concurrent_jobs != Some(0),
            "quotas.concurrent_jobs must be at least 1 (leave it out for no limit)"
        );
        Ok(())
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_s)
    }

    pub fn database_url(&self) -> &str {
        self.database_url.expose_secret()
    }

    pub fn redis_url(&self) -> &str {
        self.redis_url.expose_secret()
    }
}

#[cfg(test)]
mod tests;
