//! The wasm tier: the contract suite plus raw-module cases.

use std::sync::Arc;
use std::time::Duration;

use switchyard_core::code::{KilledBy, Language, Limits};
use switchyard_sandbox::wasm::{WasmConfig, WasmSandbox};
use switchyard_sandbox::{Capture, RunRequest, Sandbox, SandboxError, Source};
use tokio_util::sync::CancellationToken;

pub fn sandbox() -> Arc<WasmSandbox> {
    crate::canary();
    let root = crate::sandbox_dir();
    let runtimes = root.join("wasm");
    assert!(
        runtimes.join("python.wasm").exists() && runtimes.join("quickjs.wasm").exists(),
        "wasm runtimes missing in {}: run `bash sandbox-images/wasm/fetch.sh` (scripts/test.sh does)",
        runtimes.display()
    );
    Arc::new(
        WasmSandbox::new(config(
            std::env::temp_dir().join("switchyard-test-scratch"),
            4,
        ))
        .expect("wasm sandbox"),
    )
}

/// The tests' configuration: runs in `scratch`, `slots` at once.
fn config(scratch: std::path::PathBuf, slots: u32) -> WasmConfig {
    WasmConfig {
        runtimes_dir: crate::sandbox_dir().join("wasm"),
        cache_dir: std::env::temp_dir().join("switchyard-test-code/cwasm"),
        scratch_dir: scratch,
        slots,
        max_memory_mb: 512,
        compile_timeout: Duration::from_secs(10),
    }
}

crate::contract_tests!(sandbox());

fn module(wat_text: &str) -> RunRequest {
    RunRequest {
        language: Language::Wasm,
        source: Source::Module(wat::parse_str(wat_text).expect("wat")),
        stdin: Vec::new(),
        args: Vec::new(),
        files: Default::default(),
        limits: Limits::default(),
    }
}

const HELLO: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hi from wasm\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 13))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $exit (i32.const 7))))"#;

#[tokio::test]
async fn raw_module_writes_and_exits() {
    let r = crate::suite::run(&*sandbox(), module(HELLO)).await;
    assert_eq!(r.stdout, "hi from wasm\n");
    assert_eq!((r.outcome.exit_code, r.outcome.killed_by), (Some(7), None));
}

#[tokio::test]
async fn raw_module_limits() {
    let sb = sandbox();
    let mut spin = module(r#"(module (func (export "_start") (loop (br 0))))"#);
    spin.limits.wall_ms = 300;
    let r = crate::suite::run(&*sb, spin).await;
    assert_eq!(r.outcome.killed_by, Some(KilledBy::Timeout));

    let mut grow = module(
        r#"(module (memory 1) (func (export "_start")
            (loop (br_if 0 (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))))"#,
    );
    grow.limits.memory_mb = 32;
    let r = crate::suite::run(&*sb, grow).await;
    assert_eq!(r.outcome.killed_by, Some(KilledBy::Memory));

    // its own trap (not a limit): reported like a crash, with the reason on stderr
    let r = crate::suite::run(
        &*sb,
        module(r#"(module (func (export "_start") unreachable))"#),
    )
    .await;
    assert_eq!(
        (r.outcome.exit_code, r.outcome.killed_by),
        (Some(switchyard_sandbox::wasm::TRAP_EXIT_CODE), None)
    );
    assert!(r.stderr.contains("wasm trap"), "{}", r.stderr);
}

#[tokio::test]
async fn invalid_modules_are_refused() {
    let sb = sandbox();
    for (req, why) in [
        (
            RunRequest {
                source: Source::Module(b"\0asm\x01\0\0\0garbage".to_vec()),
                ..module(HELLO)
            },
            "invalid module",
        ),
        (
            module(r#"(module (import "env" "system" (func)) (func (export "_start")))"#),
            "WASI preview 1 only",
        ),
    ] {
        let err = sb
            .run(req, Arc::new(Capture::new(1000)), CancellationToken::new())
            .await
            .unwrap_err();
        match err {
            SandboxError::InvalidModule(m) => assert!(m.contains(why), "{m}"),
            other => panic!("expected InvalidModule, got {other:?}"),
        }
    }
}

/// QuickJS specifics (the gVisor tier runs Node instead): stdin, args, files, exit codes.
#[tokio::test]
async fn quickjs_stdin_args_files_exit() {
    let sb = sandbox();
    let mut req = crate::suite::request(
        Language::Javascript,
        "console.log(std.in.readAsString().toUpperCase(), scriptArgs.slice(1).join('|'), \
         std.loadFile('data/in.txt')); std.exit(4)",
    );
    req.stdin = b"def".to_vec();
    req.args = vec!["a".into(), "b".into()];
    req.files
        .insert("data/in.txt".into(), b"js-nested".to_vec());
    let r = crate::suite::run(&*sb, req).await;
    assert_eq!(r.stdout, "DEF a|b js-nested\n", "{}", r.stderr);
    assert_eq!(r.outcome.exit_code, Some(4));
}

/// QuickJS programs of the escape suite (std/os modules are what QuickJS offers the guest).
fn quickjs_programs() -> Vec<crate::escape::Hostile> {
    use crate::escape::{js, Expect::*};
    vec![
        js("js: read /etc/shadow", "console.log(std.loadFile('/etc/shadow') === null ? 'blocked' : 'ESCAPED')", Blocked),
        js("js: read a host-only file", "console.log(std.loadFile('{MARKER}') === null ? 'blocked' : 'ESCAPED')", Blocked),
        js("js: environment", "console.log(JSON.stringify(std.getenviron()))", Contained),
        js("js: exec a shell", "try { console.log(os.exec(['/bin/sh', '-c', 'id'])) } catch (e) { console.log('blocked', e) }", Contained),
        js("js: list /", "console.log(JSON.stringify(os.readdir('/')))", Contained),
        js("js: write outside", "const f = std.open('/tmp/sy-escape-{PID}', 'w'); console.log(f === null ? 'blocked' : 'opened')", Contained),
        js("js: memory bomb", "const a = []; for (;;) a.push(new Array(1 << 20).fill(1));", Killed(&[KilledBy::Memory])),
        js("js: busy loop", "for (;;) {}", Killed(&[KilledBy::Timeout, KilledBy::Cpu])),
        js("js: huge output", "for (;;) std.out.puts('A'.repeat(65536));", Killed(&[KilledBy::Output])),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escape_suite() {
    let mut programs = crate::escape::python_programs();
    programs.extend(quickjs_programs());
    crate::escape::assert_contained(sandbox(), programs).await;
}

/// WASI writes land on the worker's own disk: a program that writes past the tier's cap (in
/// bytes, or in files; a file deleted while it is open and written counts, as does nesting
/// deeper than the walk follows) is stopped with `killed_by: disk` instead of filling the disk
/// for every tenant of the worker.
#[tokio::test]
async fn files_past_the_cap_stop_the_program() {
    let sb = sandbox();
    // limits far away: the cap must stop these, not the clock (file creation is slow on a
    // loaded machine)
    let req = |code: &str| {
        let mut r = crate::suite::request(Language::Python, code);
        r.limits.wall_ms = 300_000;
        r.limits.cpu_ms = 300_000;
        r
    };
    let big = "c = b'0' * (8 << 20)\nwith open('big', 'wb') as f:\n    for _ in range(64):\n        f.write(c)\nprint('wrote it all')";
    let r = crate::suite::run(&*sb, req(big)).await;
    assert_eq!(
        r.outcome.killed_by,
        Some(KilledBy::Disk),
        "{:?} {}",
        r.outcome,
        r.stderr
    );
    assert!(!r.stdout.contains("wrote it all"));
    let many = "for i in range(20000):\n    open(f'f{i}', 'w').close()\nprint('made them all')";
    let r = crate::suite::run(&*sb, req(many)).await;
    assert_eq!(
        r.outcome.killed_by,
        Some(KilledBy::Disk),
        "{:?} {}",
        r.outcome,
        r.stderr
    );
    assert!(!r.stdout.contains("made them all"));
    // a file deleted while open still takes disk as it is written
    let unlinked = "import os\nf = open('big', 'wb')\nos.remove('big')\nc = b'0' * (8 << 20)\nfor _ in range(64):\n    f.write(c)\nprint('wrote it all')";
    let r = crate::suite::run(&*sb, req(unlinked)).await;
    assert_eq!(
        r.outcome.killed_by,
        Some(KilledBy::Disk),
        "{:?} {}",
        r.outcome,
        r.stderr
    );
    assert!(!r.stdout.contains("wrote it all"));
    // nesting past the depth a walk follows
    let deep = "import os, time\nos.makedirs('/'.join(['d'] * 200))\ntime.sleep(3)\nprint('slept')";
    let r = crate::suite::run(&*sb, req(deep)).await;
    assert_eq!(
        r.outcome.killed_by,
        Some(KilledBy::Disk),
        "{:?} {}",
        r.outcome,
        r.stderr
    );
    assert!(!r.stdout.contains("slept"));
    // within the cap: untouched
    let small = "open('a', 'wb').write(b'0' * (1 << 20))\nprint('ok')";
    let r = crate::suite::run(&*sb, crate::suite::request(Language::Python, small)).await;
    assert_eq!(
        (r.outcome.exit_code, r.outcome.killed_by),
        (Some(0), None),
        "{}",
        r.stderr
    );
}

/// A run whose future is dropped (a job's `timeout_s` ends it) stops its guest, and its engine
/// instance is given back when the guest has ended: the next run starts normally. (The guest
/// ran on holding its instance while its slot went to the next run, which found no instance
/// and reported a trap, exit 134, as if the program had crashed.)
#[tokio::test]
async fn a_dropped_run_stops_its_guest_and_the_next_run_starts() {
    crate::canary();
    let scratch = std::env::temp_dir().join("switchyard-test-scratch");
    let sb = WasmSandbox::new(config(scratch, 1)).expect("wasm sandbox");
    let mut spin = module(
        r#"(module (memory (export "memory") 1)
        (func (export "_start") (loop (br 0))))"#,
    );
    spin.limits.wall_ms = 60_000;
    spin.limits.cpu_ms = 60_000;
    let cap = Arc::new(Capture::new(spin.limits.output_bytes));
    let dropped = tokio::time::timeout(
        Duration::from_millis(300),
        sb.run(spin, cap, CancellationToken::new()),
    )
    .await;
    assert!(dropped.is_err(), "the spinning run was cut by the timeout");
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        crate::suite::run(&sb, module(HELLO)),
    )
    .await
    .expect("the next run got the instance once the dropped guest stopped");
    assert_eq!(r.outcome.exit_code, Some(7), "{:?} {}", r.outcome, r.stderr);
    assert_eq!(r.stdout, "hi from wasm\n");
}

/// A worker killed mid-run leaves its runs' directories (tenants' files, up to the disk cap
/// each): the next worker on the directory removes them when it starts.
#[tokio::test]
async fn run_directories_left_by_a_killed_worker_are_removed_at_start() {
    crate::canary();
    let tmp = std::env::temp_dir();
    let scratch = tmp.join(format!(
        "switchyard-test-scratch-left-{}",
        std::process::id()
    ));
    let left = scratch.join("run-left");
    std::fs::create_dir_all(&left).unwrap();
    std::fs::write(left.join("tenant-file"), b"secret").unwrap();
    let _sb = WasmSandbox::new(config(scratch.clone(), 1)).expect("wasm sandbox");
    assert!(!left.exists(), "left at {}", left.display());
    drop(_sb);
    let _ = std::fs::remove_dir_all(&scratch);
}
