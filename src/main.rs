//! `switchyard`: one binary for every role (dev, api, worker, scheduler, migrate, mock-llm, admin).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchyard::roles;
use switchyard_core::config::Config;
use tokio_util::sync::CancellationToken;

mod admin_flags;
use admin_flags::{parse_code_limits, parse_queue_weight, parse_quotas, parse_retention_days};

// glibc malloc showed up as ~20% of the process' CPU under load (fragmentation across threads)
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Durable LLM and code-execution jobs"
)]
struct Cli {
    /// Configuration file (TOML); also SWITCHYARD_CONFIG. Env vars SWITCHYARD_* override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Everything locally: services if missing, migrations, demo tenant + key, mock LLM, API, worker, scheduler.
    Dev {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the mock LLM listens (when no provider is configured).
        #[arg(long, default_value = "127.0.0.1:0")]
        mock_listen: SocketAddr,
    },
    /// The HTTP API.
    Api {
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// A worker.
    Worker {
        /// Queues to serve, comma separated (default: all).
        #[arg(long, value_delimiter = ',')]
        queues: Option<Vec<String>>,
        /// Jobs run at once.
        #[arg(long)]
        concurrency: Option<usize>,
    },
    /// The scheduler (reconciler, delayed jobs).
    Scheduler,
    /// Applies database migrations.
    Migrate,
    /// Container health check: exits 0 if URL (default: this host's `health_listen`, then the
    /// API's `/healthz`) answers 200 within 3 s.
    Probe { url: Option<String> },
    /// The mock LLM provider (OpenAI- and Anthropic-compatible).
    MockLlm {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// Time to first token, ms.
        #[arg(long, default_value_t = 0)]
        ttft_ms: u64,
        /// Delay between tokens, ms.
        #[arg(long, default_value_t = 0)]
        inter_token_ms: u64,
        /// Upper bound of a uniform random extra added to every delay, ms.
        #[arg(long, default_value_t = 0)]
        jitter_ms: u64,
    },
    /// Tenants and API keys.
    Admin {
        #[command(subcommand)]
        cmd: AdminCmd,
    },
}

impl Cmd {
    /// The role's name (the traces' service is `switchyard-<role>`).
    fn role(&self) -> &'static str {
        match self {
            Cmd::Dev { .. } => "dev",
            Cmd::Api { .. } => "api",
            Cmd::Worker { .. } => "worker",
            Cmd::Scheduler => "scheduler",
            Cmd::Migrate => "migrate",
            Cmd::Probe { .. } => "probe",
            Cmd::MockLlm { .. } => "mock-llm",
            Cmd::Admin { .. } => "admin",
        }
    }
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Creates a tenant.
    CreateTenant { name: String },
    /// Creates an API key for a tenant and prints it (shown only this once).
    CreateKey {
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Revokes an API key by id or visible prefix (sy_xxxxxxxx).
    RevokeKey { key: String },
    /// Lists a tenant's keys (prefixes only).
    ListKeys {
        #[arg(long)]
        tenant: String,
    },
    /// Checks a tenant's audit chain (every tenant without --tenant); reports the first broken
    /// link and exits 1 if there is one.
    AuditVerify {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Deletes a tenant's audit rows older than DAYS and re-anchors its chain.
    AuditPrune {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        older_than_days: u32,
    },
    /// Changes a tenant's settings.
    SetTenant {
        name: String,
        /// Cache LLM responses for this tenant unless a request says otherwise.
        #[arg(long, value_parser = clap::builder::BoolishValueParser::new())]
        llm_cache: Option<bool>,
        /// Models the tenant may use, comma-separated aliases, `provider/model` names or
        /// prefixes ending in `*` (`mock-*`); `all` lifts the limit.
        #[arg(long)]
        models: Option<String>,
        /// Largest `code.exec` limits the tenant may ask for, e.g.
        /// `wall_ms=60000,cpu_ms=30000,memory_mb=512,output_bytes=16777216` (missing ones keep
        /// the worker's `code.max_limits`); `default` removes the tenant's own.
        #[arg(long)]
        code_limits: Option<String>,
        /// Lets the tenant's app sign end users' JWTs (HS256) with issuer ISSUER: a new secret
        /// is generated and printed once (rotating any old one); `off` stops accepting them.
        #[arg(long, value_name = "ISSUER|off")]
        jwt_hs256: Option<String>,
        /// The tenant's own quotas, e.g. `requests_per_minute=600,concurrent_jobs=20,
        /// llm_tokens_per_day=1000000,sandbox_cpu_seconds_per_day=3600` (missing ones keep the
        /// configured `quotas`); `default` removes the tenant's own.
        #[arg(long)]
        quotas: Option<String>,
        /// Days the tenant's finished jobs are kept (0: forever); `default` follows the
        /// configured `job_retention_days`.
        #[arg(long, value_name = "DAYS|default")]
        job_retention_days: Option<String>,
        /// The tenant's webhook: its jobs submitted without a `webhook_url` post their end
        /// there; `off` removes it.
        #[arg(long, value_name = "URL|off")]
        webhook_url: Option<String>,
        /// `rotate`: a new secret for signing the tenant's webhook deliveries (printed once).
        #[arg(long, value_name = "rotate")]
        webhook_secret: Option<String>,
        /// The tenant's share of each queue relative to others (1 to 1000; `default`: 1).
        #[arg(long, value_name = "N|default")]
        queue_weight: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut cfg = Config::load(cli.config.as_deref())?;
    let endpoint = cfg
        .otlp_endpoint
        .clone()
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok());
    let (extra, _otel) = match switchyard::otel::layer(endpoint.as_deref(), cli.cmd.role())? {
        Some((layer, guard)) => (Some(layer), Some(guard)),
        None => (None, None),
    };
    switchyard_core::telemetry::init_with(cfg.log_json, extra);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Dev {
                listen,
                mock_listen,
            } => {
                let fixed_key = std::env::var("SWITCHYARD_DEV_API_KEY")
                    .ok()
                    .filter(|k| !k.is_empty());
                roles::run_dev(
                    cfg,
                    roles::DevOptions {
                        listen,
                        mock_listen,
                        fixed_key,
                    },
                )
                .await
            }
            Cmd::Api { listen } => {
                let addr = listen.unwrap_or(cfg.listen);
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                let stop = CancellationToken::new();
                roles::shutdown_on_signals(stop.clone());
                roles::run_api(&cfg, listener, stop).await
            }
            Cmd::Worker {
                queues,
                concurrency,
            } => {
                if let Some(q) = queues {
                    cfg.worker.queues = q.iter().map(|s| s.trim().to_string()).collect();
                }
                if let Some(c) = concurrency {
                    cfg.worker.concurrency = c.max(1);
                }
                // the flags' queue names are held to the same rules as the file's
                cfg.check().context("worker flags")?;
                let stop = CancellationToken::new();
                roles::shutdown_on_signals(stop.clone());
                let health = roles::Health::new();
                let handle = roles::start_worker(&cfg, stop, Some(&health)).await?;
                handle.join().await;
                health.close().await;
                Ok(())
            }
            Cmd::Scheduler => {
                let stop = CancellationToken::new();
                roles::shutdown_on_signals(stop.clone());
                let health = roles::Health::new();
                let r = roles::run_scheduler(&cfg, stop, Some(&health)).await;
                health.close().await;
                r
            }
            Cmd::Probe { url } => {
                if switchyard::health::probe(url, &cfg).await {
                    Ok(())
                } else {
                    std::process::exit(1)
                }
            }
            Cmd::Migrate => {
                let store = roles::store(&cfg, 2)?;
                store.migrate().await.context("applying migrations")?;
                println!("migrations applied");
                Ok(())
            }
            Cmd::MockLlm {
                listen,
                ttft_ms,
                inter_token_ms,
                jitter_ms,
            } => {
                let l = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("binding {listen}"))?;
                println!("mock LLM on http://{}/v1", l.local_addr()?);
                let stop = CancellationToken::new();
                roles::shutdown_on_signals(stop.clone());
                let mock = switchyard_mock_llm::MockLlmConfig {
                    ttft: std::time::Duration::from_millis(ttft_ms),
                    inter_token: std::time::Duration::from_millis(inter_token_ms),
                    jitter: std::time::Duration::from_millis(jitter_ms),
                    ..Default::default()
                };
                switchyard_mock_llm::serve(l, mock, stop).await
            }
            Cmd::Admin { cmd } => admin(&cfg, cmd).await,
        }
    })
}

async fn admin(cfg: &Config, cmd: AdminCmd) -> anyhow::Result<()> {
    let store = roles::store(cfg, 2)?;
    if let Err(e) = store.migrate().await {
        // a login that may not migrate (the services' least-privilege role), or a schema newer
        // than this binary (a rolling upgrade): the command itself may still work
        if !roles::migration_not_ours(&e) {
            return Err(e.context("applying migrations"));
        }
        eprintln!("note: migrations not applied ({e:#}); `switchyard migrate` with the owner's login applies them");
    }
    // running API replicas cache credential lookups (with the tenant's settings)
    let changes_credentials =
        matches!(cmd, AdminCmd::RevokeKey { .. } | AdminCmd::SetTenant { .. });
    match cmd {
        AdminCmd::CreateTenant { name } => {
            let t = store.create_tenant(&name).await?;
            println!("tenant {} ({})", t.name, t.id);
        }
        AdminCmd::SetTenant {
            name,
            llm_cache,
            models,
            code_limits,
            jwt_hs256,
            quotas,
            job_retention_days,
            webhook_url,
            webhook_secret,
            queue_weight,
        } => {
            anyhow::ensure!(
                llm_cache.is_some()
                    || models.is_some()
                    || code_limits.is_some()
                    || jwt_hs256.is_some()
                    || quotas.is_some()
                    || job_retention_days.is_some()
                    || webhook_url.is_some()
                    || webhook_secret.is_some()
                    || queue_weight.is_some(),
                "nothing to set: pass --llm-cache on|off, --models a,b,prefix-*|all, \
                 --code-limits wall_ms=N,cpu_ms=N,memory_mb=N,output_bytes=N|default and/or \
                 --jwt-hs256 ISSUER|off, --quotas name=N,..|default, --job-retention-days N|default, --webhook-url URL|off, --webhook-secret rotate, --queue-weight N|default"
            );
            // every flag is checked before anything changes: an error leaves the tenant as it
            // was (a secret rotated before a later flag's error was lost with the exit code)
            anyhow::ensure!(
                store.tenant_by_name(&name).await?.is_some(),
                "no tenant named {name}"
            );
            if let Some(spec) = &queue_weight {
                parse_queue_weight(spec)?;
            }
            if let Some(u) = webhook_url.as_deref().filter(|u| *u != "off") {
                switchyard_core::webhook::check_url("--webhook-url", u, cfg.webhooks.allow_private)
                    .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
            }
            if let Some(what) = &webhook_secret {
                anyhow::ensure!(what == "rotate", "--webhook-secret takes `rotate`");
            }
            if let Some(spec) = &job_retention_days {
                parse_retention_days(spec)?;
            }
            if let Some(spec) = &quotas {
                parse_quotas(spec)?;
            }
            if let Some(issuer) = &jwt_hs256 {
                anyhow::ensure!(!issuer.trim().is_empty(), "the issuer must not be empty");
            }
            if let Some(spec) = &code_limits {
                parse_code_limits(spec)?;
            }
            if let Some(spec) = queue_weight {
                let w = parse_queue_weight(&spec)?;
                anyhow::ensure!(
                    store.set_tenant_queue_weight(&name, w).await?,
                    "no tenant named {name}"
                );
                println!("tenant {name}: queue weight = {spec} (applied within 5 s)");
            }
            if let Some(url) = webhook_url {
                let url = (url != "off").then_some(url);
                if let Some(u) = &url {
                    switchyard_core::webhook::check_url(
                        "--webhook-url",
                        u,
                        cfg.webhooks.allow_private,
                    )
                    .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
                }
                anyhow::ensure!(
                    store.set_tenant_webhook(&name, url.as_deref()).await?,
                    "no tenant named {name}"
                );
                println!(
                    "tenant {name}: webhook = {}",
                    url.as_deref().unwrap_or("off")
                );
            }
            if let Some(what) = webhook_secret {
                anyhow::ensure!(what == "rotate", "--webhook-secret takes `rotate`");
                let secret = store
                    .rotate_webhook_secret(&name)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("no tenant named {name}"))?;
                println!(
                    "tenant {name}: webhook signing secret (shown once): {secret}\n\
                     (deliveries are signed with the previous secret too for the next 24 h)"
                );
            }
            if let Some(spec) = job_retention_days {
                let days = parse_retention_days(&spec)?;
                anyhow::ensure!(
                    store.set_tenant_job_retention(&name, days).await?,
                    "no tenant named {name}"
                );
                println!("tenant {name}: job retention = {spec}");
            }
            if let Some(spec) = quotas {
                let q = parse_quotas(&spec)?;
                anyhow::ensure!(
                    store.set_tenant_quotas(&name, q.as_ref()).await?,
                    "no tenant named {name}"
                );
                println!("tenant {name}: quotas = {spec}");
            }
            if let Some(issuer) = jwt_hs256 {
                if issuer == "off" {
                    anyhow::ensure!(
                        store.set_tenant_jwt(&name, None).await?,
                        "no tenant named {name}"
                    );
                    println!("tenant {name}: HS256 tokens are no longer accepted");
                } else {
                    anyhow::ensure!(!issuer.trim().is_empty(), "the issuer must not be empty");
                    let secret = switchyard_core::apikey::random_secret(48);
                    anyhow::ensure!(
                        store
                            .set_tenant_jwt(&name, Some((&issuer, &secret)))
                            .await?,
                        "no tenant named {name}"
                    );
                    println!("{secret}");
                    eprintln!(
                        "tenant {name}: HS256 tokens with iss={issuer} are signed with the secret \
                         above; it is shown only this once"
                    );
                }
            }
            if let Some(spec) = code_limits {
                let limits = parse_code_limits(&spec)?;
                anyhow::ensure!(
                    store.set_tenant_code_limits(&name, limits.as_ref()).await?,
                    "no tenant named {name}"
                );
                println!("tenant {name}: code_limits = {spec}");
            }
            if let Some(on) = llm_cache {
                anyhow::ensure!(
                    store.set_tenant_llm_cache(&name, on).await?,
                    "no tenant named {name}"
                );
                println!("tenant {name}: llm_cache = {on}");
            }
            if let Some(list) = models {
                let list: Option<Vec<String>> = (list.trim() != "all").then(|| {
                    list.split(',')
                        .map(|m| m.trim().to_string())
                        .filter(|m| !m.is_empty())
                        .collect()
                });
                anyhow::ensure!(
                    store.set_tenant_models(&name, list.as_deref()).await?,
                    "no tenant named {name}"
                );
                match list {
                    Some(l) => println!("tenant {name}: models = {}", l.join(", ")),
                    None => println!("tenant {name}: models = all"),
                }
            }
        }
        AdminCmd::CreateKey { tenant, name } => {
            let t = store
                .tenant_by_name(&tenant)
                .await?
                .with_context(|| format!("no tenant named {tenant}"))?;
            let (rec, key) = store.create_api_key(t.id, &name, None).await?;
            println!("{key}");
            eprintln!(
                "key id {} (prefix {}); it is shown only this once",
                rec.id, rec.prefix
            );
        }
        AdminCmd::RevokeKey { key } => {
            let n = store.revoke_api_key(&key).await?;
            if n == 0 {
                anyhow::bail!("no active key matches {key}");
            }
            println!("revoked {n} key(s)");
        }
        AdminCmd::ListKeys { tenant } => {
            let t = store
                .tenant_by_name(&tenant)
                .await?
                .with_context(|| format!("no tenant named {tenant}"))?;
            for k in store.list_api_keys(t.id).await? {
                println!(
                    "{}  {}  {}  {}",
                    k.id,
                    k.prefix,
                    if k.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    },
                    k.name
                );
            }
        }
        AdminCmd::AuditVerify { tenant } => {
            let tenants = match tenant {
                Some(name) => vec![store
                    .tenant_by_name(&name)
                    .await?
                    .with_context(|| format!("no tenant named {name}"))?],
                None => store.list_tenants().await?,
            };
            let mut broken = false;
            for t in tenants {
                let v = store.verify_audit(t.id).await?;
                match v.first_broken {
                    None => println!("tenant {}: audit chain intact ({} rows)", t.name, v.checked),
                    Some(seq) => {
                        broken = true;
                        println!(
                            "tenant {}: audit chain BROKEN at seq {seq}: {} ({} rows verified before it)",
                            t.name,
                            v.reason.unwrap_or_default(),
                            v.checked
                        );
                    }
                }
            }
            if broken {
                std::process::exit(1);
            }
        }
        AdminCmd::AuditPrune {
            tenant,
            older_than_days,
        } => {
            let t = store
                .tenant_by_name(&tenant)
                .await?
                .with_context(|| format!("no tenant named {tenant}"))?;
            let min = store.audit_min_retention().await?;
            anyhow::ensure!(
                u128::from(older_than_days) * 86_400 >= min.as_secs().into(),
                "audit rows are kept at least {} days (audit_settings.min_retention, which only \
                 the database owner can lower): --older-than-days {older_than_days} is shorter",
                min.as_secs().div_ceil(86_400)
            );
            let before = chrono::Utc::now() - chrono::Duration::days(older_than_days as i64);
            let n = store.prune_audit(t.id, before).await?;
            println!("tenant {tenant}: pruned {n} audit rows older than {older_than_days} days");
        }
    }
    if changes_credentials {
        roles::announce_credentials_change(cfg).await;
    }
    Ok(())
}
