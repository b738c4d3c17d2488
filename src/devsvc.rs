//! `switchyard dev` services: use Postgres and Redis at the configured URLs when reachable,
//! otherwise start private `postgres` / `redis-server` processes under `./.switchyard/` and stop
//! them on exit. Says exactly what to install when the binaries are missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use secrecy::ExposeSecret;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use switchyard_core::config::Config;

/// Private processes started for `dev`; stopped when dropped.
#[derive(Default)]
pub struct Services {
    children: Vec<(String, Child)>,
    /// How to stop the private postgres cleanly (`pg_ctl stop`, waiting for the shutdown).
    pg_stop: Option<Command>,
}

impl Drop for Services {
    fn drop(&mut self) {
        if let Some(mut stop) = self.pg_stop.take() {
            let _ = stop.stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
        for (name, child) in self.children.iter_mut().rev() {
            // SIGINT: postgres' "fast" shutdown; redis saves nothing (no persistence)
            unsafe {
                libc::kill(child.id() as i32, libc::SIGINT);
            }
            for _ in 0..50 {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("stopped private {name}");
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn find_binary(name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin").join(name))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|p| p.is_file());
    versions.sort();
    versions.pop()
}

async fn redis_reachable(url: &str) -> bool {
    let Ok(client) = switchyard_queue::RedisClient::open(url) else {
        return false;
    };
    let fut = async {
        let mut c = client.connect(Duration::from_secs(2)).await?;
        redis::cmd("PING").query_async::<()>(&mut c).await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), fut).await,
        Ok(Ok(()))
    )
}

/// Makes sure Postgres and Redis are usable, starting private ones when needed.
pub async fn ensure_services(cfg: &mut Config) -> anyhow::Result<Services> {
    let mut services = Services::default();
    let base = PathBuf::from(".switchyard");
    let cluster = switchyard_queue::RedisClient::open(cfg.redis_url())
        .map(|c| c.is_cluster())
        .unwrap_or(false);
    let reachable = redis_reachable(cfg.redis_url()).await;
    if cluster && !reachable {
        anyhow::bail!(
            "the Redis Cluster at REDIS_URL ({}) is unreachable: start it (dev starts only a single local Redis)",
            redact(cfg.redis_url())
        );
    }
    if !reachable {
        let bin = find_binary("redis-server").context(
            "no Redis at REDIS_URL and no redis-server binary: install it (Debian/Ubuntu: `sudo apt-get install redis-server`) or set REDIS_URL",
        )?;
        let port = local_port_of_redis(cfg.redis_url()).map_or_else(free_port, Ok)?;
        let dir = base.join("redis");
        std::fs::create_dir_all(&dir)?;
        eprintln!(
            "no Redis at {}: starting a private one on port {port}",
            redact(cfg.redis_url())
        );
        services
            .children
            .push(("redis".into(), spawn_redis(&bin, &dir, port)?));
        let url = format!("redis://127.0.0.1:{port}");
        let mut up = false;
        for _ in 0..50 {
            if redis_reachable(&url).await {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !up {
            bail!(
                "the private redis-server did not answer on port {port}: is another server using the port (one that wants a password)? set REDIS_URL to a Redis that works"
            );
        }
        cfg.redis_url = url.into();
    }
    let opts: PgConnectOptions = cfg
        .database_url
        .expose_secret()
        .parse()
        .context("invalid DATABASE_URL")?;
    let server_up = ensure_database(&opts).await?;
    if !server_up {
        let loopback = matches!(opts.get_host(), "127.0.0.1" | "localhost" | "::1");
        let port = if loopback {
            opts.get_port()
        } else {
            free_port()?
        };
        let dir = private_pg_dir(&base);
        start_private_postgres(&dir, port, &mut services)?;
        let db = opts.get_database().unwrap_or("switchyard").to_string();
        let url = format!("postgres://postgres@127.0.0.1:{port}/{db}");
        let opts: PgConnectOptions = url.parse()?;
        let mut ok = false;
        for _ in 0..100 {
            if ensure_database(&opts).await? {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !ok {
            bail!(
                "the private postgres did not come up; see {}",
                dir.join("log").display()
            );
        }
        cfg.database_url = url.into();
    }
    Ok(services)
}

fn spawn_redis(bin: &Path, dir: &Path, port: u16) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt;
    Command::new(bin)
        // its own process group: a Ctrl-C in the terminal reaches dev, which drains the worker
        // before it stops the services (else they died first and the drain failed)
        .process_group(0)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server")
}

/// A private Redis without persistence on `port` (tests that restart or wipe Redis use it);
/// `None` when `redis-server` is not installed. Stopped when dropped: its data is gone.
pub async fn private_redis(dir: &Path, port: u16) -> anyhow::Result<Option<Services>> {
    let Some(bin) = find_binary("redis-server") else {
        return Ok(None);
    };
    std::fs::create_dir_all(dir)?;
    let mut services = Services::default();
    services
        .children
        .push(("redis".into(), spawn_redis(&bin, dir, port)?));
    let url = format!("redis://127.0.0.1:{port}");
    for _ in 0..100 {
        if redis_reachable(&url).await {
            return Ok(Some(services));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the private redis on port {port} did not come up")
}

/// A private Postgres cluster in `dir` on `port` (initialised on first use; tests that restart
/// Postgres use it); `None` when the postgres binaries are not installed. Stopped (fast
/// shutdown) when dropped; its data stays in `dir`.
pub async fn private_postgres(dir: &Path, port: u16) -> anyhow::Result<Option<Services>> {
    if find_binary("initdb").is_none() || find_binary("postgres").is_none() {
        return Ok(None);
    }
    let mut services = Services::default();
    start_private_postgres(dir, port, &mut services)?;
    let opts: PgConnectOptions =
        format!("postgres://postgres@127.0.0.1:{port}/postgres").parse()?;
    for _ in 0..150 {
        if ensure_database(&opts).await? {
            return Ok(Some(services));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "the private postgres did not come up; see {}/log",
        dir.display()
    )
}

/// The port of a loopback Redis URL (a private Redis then takes that port, so the URL stays valid).
fn local_port_of_redis(url: &str) -> Option<u16> {
    let info = redis::Client::open(url)
        .ok()?
        .get_connection_info()
        .addr
        .clone();
    match info {
        redis::ConnectionAddr::Tcp(host, port) if host == "127.0.0.1" || host == "localhost" => {
            Some(port)
        }
        _ => None,
    }
}

fn redact(url: &str) -> String {
    match url.split_once('@') {
        Some((scheme_user, host)) => {
            let scheme = scheme_user.split("://").next().unwrap_or("");
            format!("{scheme}://***@{host}")
        }
        None => url.to_string(),
    }
}

/// Where dev keeps its private Postgres: under the checkout, unless its socket path would pass
/// the 107-byte limit or (as root, where the `postgres` user runs it) the `postgres` user
/// cannot reach the checkout (under `/root`, mode 0700): then under `/var/tmp`.
fn private_pg_dir(base: &Path) -> PathBuf {
    let own = base.join("pg");
    let short = own.as_os_str().len() < 80;
    let reachable = unsafe { libc::geteuid() } != 0
        || Command::new("runuser")
            .args(["-u", "postgres", "--", "test", "-x"])
            .arg(base.parent().unwrap_or(base))
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if short && reachable {
        return own;
    }
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::canonicalize(base)
        .unwrap_or_else(|_| base.to_path_buf())
        .hash(&mut h);
    PathBuf::from(format!(
        "/var/tmp/switchyard-dev-pg-{:08x}",
        h.finish() as u32
    ))
}

/// Returns false if no server answers; creates the database if the server lacks it.
async fn ensure_database(opts: &PgConnectOptions) -> anyhow::Result<bool> {
    match tokio::time::timeout(Duration::from_secs(3), opts.connect()).await {
        Ok(Ok(c)) => {
            let _ = c.close().await;
            Ok(true)
        }
        Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("3D000") => {
            let db = opts.get_database().unwrap_or("switchyard").to_string();
            let admin = opts.clone().database("postgres");
            let mut c = admin
                .connect()
                .await
                .context("connecting to create the database")?;
            let q = format!("CREATE DATABASE \"{}\"", db.replace('"', ""));
            match sqlx::query(&q).execute(&mut c).await {
                Ok(_) => eprintln!("created database {db}"),
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
                Err(e) => return Err(e).context("creating the database"),
            }
            Ok(true)
        }
        // 57P03: the server is starting up (or shutting down)
        Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("57P03") => Ok(false),
        Ok(Err(sqlx::Error::Io(_))) | Err(_) => Ok(false),
        // another server on the port, that wants a password or knows no such role
        Ok(Err(sqlx::Error::Database(e)))
            if matches!(e.code().as_deref(), Some("28P01" | "28000")) =>
        {
            bail!(
                "the postgres at DATABASE_URL refuses its login ({}): set DATABASE_URL to a user it accepts (postgres://user:password@host:port/db), or stop that server so dev can start a private one",
                e.message()
            )
        }
        Ok(Err(e)) => Err(e).context("connecting to postgres"),
    }
}

fn start_private_postgres(dir: &Path, port: u16, services: &mut Services) -> anyhow::Result<()> {
    let missing = "no Postgres at DATABASE_URL and no postgres binaries: install them (Debian/Ubuntu: `sudo apt-get install postgresql`) or set DATABASE_URL";
    let initdb = find_binary("initdb").context(missing)?;
    let postgres = find_binary("postgres").context(missing)?;
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let data = dir.join("data");
    // postgres refuses to run as root: run it as the `postgres` user then
    let as_root = unsafe { libc::geteuid() } == 0;
    let wrap = |bin: &Path| -> Command {
        if as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        }
    };
    if as_root {
        let st = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&dir)
            .status();
        if !matches!(st, Ok(s) if s.success()) {
            bail!("running as root needs a `postgres` system user to run a private postgres (install the postgresql package)");
        }
    }
    if !data.join("PG_VERSION").exists() {
        eprintln!("initialising a private postgres in {}", data.display());
        let st = wrap(&initdb)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
            .stdout(Stdio::null())
            .status()
            .context("running initdb")?;
        if !st.success() {
            bail!("initdb failed");
        }
    }
    eprintln!("no Postgres at DATABASE_URL: starting a private one on port {port}");
    let log = std::fs::File::create(dir.join("log"))?;
    use std::os::unix::process::CommandExt;
    let child = wrap(&postgres)
        .process_group(0)
        .arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting postgres")?;
    services.children.push(("postgres".into(), child));
    if let Some(pg_ctl) = find_binary("pg_ctl") {
        let mut stop = wrap(&pg_ctl);
        stop.args(["stop", "-m", "fast", "-w", "-t", "20", "-D"])
            .arg(&data);
        services.pg_stop = Some(stop);
    }
    Ok(())
}
