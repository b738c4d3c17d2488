//! Tests of configuration loading, secrets and checks.

use super::*;

#[test]
fn secrets_are_read_from_files_in_the_secrets_dir() {
    let dir = std::env::temp_dir().join(format!("sy-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = "file-token-0123456789abcdef0123456789";
    std::fs::write(dir.join("SWITCHYARD_OPERATOR_TOKEN"), format!("{token}\n")).unwrap();
    std::fs::write(dir.join("ANTHROPIC_API_KEY"), "").unwrap(); // empty: ignored
    let missing = Path::new("/nonexistent/switchyard.toml");
    assert!(Config::load_from(Some(missing), Some(dir.clone())).is_err());
    let toml = dir.join("switchyard.toml");
    std::fs::write(&toml, "").unwrap();
    let cfg = Config::load_from(Some(&toml), Some(dir.clone())).unwrap();
    if std::env::var_os("SWITCHYARD_OPERATOR_TOKEN").is_none() {
        assert_eq!(cfg.operator_token.unwrap().expose_secret(), token);
    }
    if std::env::var_os("ANTHROPIC_API_KEY").is_none() {
        assert!(cfg.llm.anthropic_api_key.is_none());
    }
    // a secret that cannot be read is an error, not a silent default
    std::fs::create_dir_all(dir.join("REDIS_URL")).unwrap();
    let e = Config::load_from(Some(&toml), Some(dir.clone())).unwrap_err();
    assert!(e.to_string().contains("REDIS_URL"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A declared provider reading `OPENAI_API_KEY` gets the key mounted as a file of the
/// secrets directory (the worker reads only the environment; the file's key was lost).
#[test]
fn a_declared_providers_key_comes_from_the_secrets_dir() {
    if std::env::var_os("OPENAI_API_KEY").is_some() {
        return; // the environment wins over the file; nothing to show here
    }
    let dir = std::env::temp_dir().join(format!("sy-provider-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("OPENAI_API_KEY"), "sk-from-a-file\n").unwrap();
    let toml = dir.join("switchyard.toml");
    std::fs::write(
        &toml,
        "[llm.providers.openai]\nkind = \"openai\"\nbase_url = \"https://api.openai.com/v1\"\napi_key_env = \"OPENAI_API_KEY\"\n",
    )
    .unwrap();
    let cfg = Config::load_from(Some(&toml), Some(dir.clone())).unwrap();
    let table = cfg.llm.table();
    let key = table.providers["openai"]
        .api_key
        .as_ref()
        .expect("the file's key");
    assert_eq!(key.expose_secret(), "sk-from-a-file");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A zero limit is refused (it would read as none), and queue names set after loading
/// (the worker's `--queues`) are held to the file's rules.
#[test]
fn zero_limits_and_bad_queue_names_are_refused() {
    let base = Config::for_tests("postgres://h/db", "redis://h", "t");
    let mut cfg = base.clone();
    cfg.queue_limits.insert("llm".into(), 0);
    assert!(cfg
        .check()
        .unwrap_err()
        .to_string()
        .contains("queue_limits.llm"));
    let mut cfg = base.clone();
    cfg.quotas.concurrent_jobs = Some(0);
    assert!(cfg.check().is_err());
    let mut cfg = base.clone();
    cfg.worker.queues = vec!["llm".into(), "".into()];
    assert!(cfg.check().is_err());
    // marks that would land after the scheduler re-dispatched their jobs
    let mut cfg = base;
    cfg.dispatch_mark_linger_ms = MAX_DISPATCH_MARK_LINGER_MS + 1;
    let e = cfg.check().unwrap_err().to_string();
    assert!(e.contains("dispatch_mark_linger_ms"), "{e}");
    cfg.dispatch_mark_linger_ms = MAX_DISPATCH_MARK_LINGER_MS;
    assert!(cfg.check().is_ok());
}

#[test]
fn defaults_load_and_secrets_do_not_print() {
    let cfg = Config::for_tests("postgres://u:hunter2@h/db", "redis://h", "t1");
    assert_eq!(cfg.lease_s, 30);
    assert_eq!(cfg.max_body_bytes, 1024 * 1024);
    assert!(!format!("{cfg:?}").contains("hunter2"));
    assert!(cfg.check().is_ok());
}

#[test]
fn the_example_configuration_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/switchyard.example.toml");
    let cfg = Config::load(Some(&path)).unwrap();
    assert_eq!(cfg.database_role, "switchyard_app");
    assert_eq!(cfg.quotas.per_credential_rps, 1000);
    assert_eq!(cfg.jwt.audience, "switchyard");
    assert_eq!(cfg.audit_retention_days, 365);
    // and the one the Kubernetes manifests mount
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/k8s/base/switchyard.toml");
    let cfg = Config::load(Some(&path)).unwrap();
    assert_eq!(cfg.health_listen.map(|a| a.port()), Some(9090));
    assert_eq!(cfg.shutdown_grace_s, 30);
}
