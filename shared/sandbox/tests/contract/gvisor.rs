//! The gVisor tier: the contract suite, Node specifics, the warm pool, and the escape suite.

use std::sync::Arc;

use switchyard_core::code::Language;
use switchyard_sandbox::gvisor::{GvisorConfig, GvisorSandbox};

pub async fn sandbox_with_pool(pool_size: usize) -> Arc<GvisorSandbox> {
    crate::canary();
    let root = crate::sandbox_dir();
    let mut cfg = GvisorConfig::new(
        &root,
        &std::env::temp_dir().join(format!("switchyard-test-gvisor-{}", std::process::id())),
    );
    cfg.pool_size = pool_size;
    Arc::new(GvisorSandbox::new(cfg).await.unwrap_or_else(|e| {
        panic!("gVisor sandbox: {e:#} (scripts/test.sh installs runsc and builds the rootfs)")
    }))
}

pub async fn sandbox() -> Arc<GvisorSandbox> {
    sandbox_with_pool(1).await
}

crate::contract_tests!(sandbox().await);

/// Node specifics: stdin, args, files, exit codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stdin_args_files_exit() {
    let sb = sandbox().await;
    let mut req = crate::suite::request(
        Language::Javascript,
        "const fs = require('fs');\n\
         console.log(fs.readFileSync(0, 'utf8').toUpperCase(), process.argv.slice(2).join('|'),\n\
           fs.readFileSync('data/in.txt', 'utf8'));\nprocess.exit(4);",
    );
    req.stdin = b"def".to_vec();
    req.args = vec!["a".into(), "b".into()];
    req.files
        .insert("data/in.txt".into(), b"js-nested".to_vec());
    let r = crate::suite::run(&*sb, req).await;
    assert_eq!(r.stdout, "DEF a|b js-nested\n", "{}", r.stderr);
    assert_eq!(r.outcome.exit_code, Some(4));
}

/// A job takes a started sandbox from the pool; the pool refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_pool_refills() {
    let sb = sandbox_with_pool(1).await;
    let t = std::time::Instant::now();
    while sb.pool_len(Language::Python).await < 1 {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "pool never filled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let r = crate::suite::run_code(&*sb, Language::Python, "print('pooled')").await;
    assert_eq!(r.stdout, "pooled\n");
    let t = std::time::Instant::now();
    while sb.pool_len(Language::Python).await < 1 {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "pool never refilled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    sb.shutdown().await;
}

/// Node programs of the escape suite.
fn node_programs() -> Vec<crate::escape::Hostile> {
    use crate::escape::{js, Expect::*};
    use switchyard_core::code::KilledBy;
    vec![
        js("node: read a host-only file", "try { console.log('ESCAPED', require('fs').readFileSync('{MARKER}', 'utf8')) } catch (e) { console.log('blocked', e.code) }", Blocked),
        js("node: environment", "console.log(JSON.stringify(process.env))", Contained),
        js("node: connect redis", "const s = require('net').connect(6379, '127.0.0.1'); s.on('connect', () => { console.log('ESCAPED'); process.exit(0) }); s.on('error', e => console.log('blocked', e.code));", Blocked),
        js("node: child process", "try { console.log(require('child_process').execSync('id').toString()) } catch (e) { console.log('blocked', e.message) }", Contained),
        js("node: memory bomb", "const a = []; for (;;) a.push(Buffer.alloc(8 << 20, 1));", Killed(&[KilledBy::Memory])),
        js("node: busy loop", "for (;;) {}", Killed(&[KilledBy::Timeout, KilledBy::Cpu])),
        js("node: huge output", "const s = 'A'.repeat(65536); for (;;) require('fs').writeSync(1, s);", Killed(&[KilledBy::Output])),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escape_suite() {
    let sb = sandbox().await;
    let mut programs = crate::escape::python_programs();
    programs.extend(node_programs());
    crate::escape::assert_contained(sb.clone(), programs).await;
    sb.shutdown().await;
}

/// A worker killed before it could clean up leaves bundles and memory cgroups behind: the next
/// worker on the same state directory removes them when it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_a_killed_worker_are_removed_at_start() {
    crate::canary();
    let state = std::env::temp_dir().join(format!(
        "switchyard-test-gvisor-leftovers-{}",
        std::process::id()
    ));
    let id = format!("sy-leftover-{}", std::process::id());
    let bundle = state.join("gvisor/bundles").join(&id);
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("config.json"), "{}").unwrap();
    let cgroup = std::path::Path::new("/sys/fs/cgroup/memory/switchyard").join(&id);
    std::fs::create_dir_all(&cgroup).unwrap();
    let mut cfg = GvisorConfig::new(&crate::sandbox_dir(), &state);
    cfg.pool_size = 0;
    let _sb = GvisorSandbox::new(cfg).await.unwrap();
    assert!(!bundle.exists(), "bundle left at {}", bundle.display());
    assert!(!cgroup.exists(), "cgroup left at {}", cgroup.display());
    let _ = std::fs::remove_dir_all(&state);
}

/// Two workers sharing one state directory (the default work_dir is one per host): the second
/// one's start does not remove the first one's live sandboxes as leftovers (it killed them,
/// and their runs ended as if the program had exited 137). Each takes a part of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_on_the_same_directory_leaves_the_first_ones_sandboxes_alone() {
    crate::canary();
    let state = std::env::temp_dir().join(format!(
        "switchyard-test-gvisor-shared-{}",
        std::process::id()
    ));
    let cfg = || {
        let mut c = GvisorConfig::new(&crate::sandbox_dir(), &state);
        c.pool_size = 0;
        c
    };
    let first = Arc::new(GvisorSandbox::new(cfg()).await.unwrap());
    let run = {
        let first = first.clone();
        tokio::spawn(async move {
            let mut req = crate::suite::request(
                Language::Python,
                "import time\nprint('started', flush=True)\ntime.sleep(3)\nprint('done')",
            );
            req.limits.wall_ms = 30_000;
            crate::suite::run(&*first, req).await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let second = GvisorSandbox::new(cfg()).await.unwrap();
    let r = run.await.unwrap();
    assert_eq!(
        (r.outcome.exit_code, r.outcome.killed_by),
        (Some(0), None),
        "{}",
        r.stderr
    );
    assert!(r.stdout.contains("done"), "{}", r.stdout);
    drop(second);
    let _ = std::fs::remove_dir_all(&state);
}
