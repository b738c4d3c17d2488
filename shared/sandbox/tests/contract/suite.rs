//! The contract every `Sandbox` must pass: languages, stdin, files, args, exit codes, streaming,
//! each limit with the right `killed_by`, cancellation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_core::code::{KilledBy, Language, Limits, Truncated};
use switchyard_sandbox::{Capture, RunOutcome, RunRequest, Sandbox, Source};
use tokio_util::sync::CancellationToken;

pub struct Ran {
    pub outcome: RunOutcome,
    pub stdout: String,
    pub stderr: String,
    pub truncated: Truncated,
}

pub fn request(language: Language, code: &str) -> RunRequest {
    RunRequest {
        language,
        source: Source::Code(code.to_string()),
        stdin: Vec::new(),
        args: Vec::new(),
        files: Default::default(),
        limits: Limits::default(),
    }
}

pub async fn run(sb: &dyn Sandbox, req: RunRequest) -> Ran {
    let cap = Arc::new(Capture::new(req.limits.output_bytes));
    let outcome = sb
        .run(req, cap.clone(), CancellationToken::new())
        .await
        .expect("run");
    let (stdout, stderr, truncated) = cap.finish();
    Ran {
        outcome,
        stdout,
        stderr,
        truncated,
    }
}

pub async fn run_code(sb: &dyn Sandbox, language: Language, code: &str) -> Ran {
    run(sb, request(language, code)).await
}

fn ok(r: &Ran) {
    assert_eq!(
        (r.outcome.exit_code, r.outcome.killed_by),
        (Some(0), None),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
}

pub async fn hello_python(sb: &dyn Sandbox) {
    let r = run_code(sb, Language::Python, "print('hello', 6 * 7)").await;
    ok(&r);
    assert_eq!(r.stdout, "hello 42\n");
}

pub async fn hello_javascript(sb: &dyn Sandbox) {
    let r = run_code(sb, Language::Javascript, "console.log('hello', 6 * 7)").await;
    ok(&r);
    assert_eq!(r.stdout, "hello 42\n");
}

pub async fn stdin_and_args(sb: &dyn Sandbox) {
    let mut req = request(
        Language::Python,
        "import sys\nprint(sys.stdin.read().upper(), sys.argv[1:])",
    );
    req.stdin = b"abc".to_vec();
    req.args = vec!["x".into(), "y z".into()];
    let r = run(sb, req).await;
    ok(&r);
    assert_eq!(r.stdout, "ABC ['x', 'y z']\n");
}

pub async fn files_in_the_working_directory(sb: &dyn Sandbox) {
    let mut req = request(
        Language::Python,
        "print(open('data/in.txt').read(), open('/work/top.txt').read())\n\
         open('out.txt', 'w').write('written')\nprint(open('out.txt').read())",
    );
    req.files.insert("data/in.txt".into(), b"nested".to_vec());
    req.files.insert("top.txt".into(), b"top".to_vec());
    let r = run(sb, req).await;
    ok(&r);
    assert_eq!(r.stdout, "nested top\nwritten\n");
}

pub async fn exit_codes(sb: &dyn Sandbox) {
    let r = run_code(
        sb,
        Language::Python,
        "import sys\nprint('bye')\nsys.exit(3)",
    )
    .await;
    assert_eq!((r.outcome.exit_code, r.outcome.killed_by), (Some(3), None));
    assert_eq!(r.stdout, "bye\n");
    // statuses of 126 and above are the program's own, not a crash; the low byte counts
    let r = run_code(sb, Language::Python, "import sys\nsys.exit(200)").await;
    assert_eq!(
        (r.outcome.exit_code, r.outcome.killed_by),
        (Some(200), None)
    );
    assert!(!r.stderr.contains("trap"), "{}", r.stderr);
    let r = run_code(sb, Language::Python, "import os\nos._exit(300)").await;
    assert_eq!(r.outcome.exit_code, Some(44));
    let r = run_code(sb, Language::Python, "raise ValueError('boom')").await;
    assert_eq!(r.outcome.exit_code, Some(1));
    assert!(r.stderr.contains("ValueError: boom"), "{}", r.stderr);
    let r = run_code(sb, Language::Javascript, "throw new Error('js boom')").await;
    assert_eq!(r.outcome.exit_code, Some(1));
    assert!(r.stderr.contains("js boom"), "{}", r.stderr);
}

pub async fn stdout_and_stderr_apart(sb: &dyn Sandbox) {
    let r = run_code(
        sb,
        Language::Python,
        "import sys\nprint('out1')\nprint('err1', file=sys.stderr)\nprint('out2')",
    )
    .await;
    ok(&r);
    assert_eq!(r.stdout, "out1\nout2\n");
    assert_eq!(r.stderr, "err1\n");
}

pub async fn invalid_utf8_is_replaced(sb: &dyn Sandbox) {
    let r = run_code(
        sb,
        Language::Python,
        "import sys\nsys.stdout.buffer.write(b'a\\xffb')\nsys.stdout.flush()",
    )
    .await;
    ok(&r);
    assert_eq!(r.stdout, "a\u{FFFD}b");
}

/// Output arrives while the program still runs.
pub async fn output_streams_while_running(sb: &dyn Sandbox) {
    let req = request(
        Language::Python,
        "import sys, time\nprint('early', flush=True)\ntime.sleep(1.5)\nprint('late')",
    );
    let cap = Arc::new(Capture::new(req.limits.output_bytes));
    let started = Instant::now();
    let watch = {
        let cap = cap.clone();
        async move {
            let mut off = [0usize; 2];
            let mut seen = Vec::new();
            loop {
                let [out, _] = cap.take_new(&mut off);
                seen.extend(out);
                if seen.starts_with(b"early") {
                    return started.elapsed();
                }
                cap.changed().await;
            }
        }
    };
    let (outcome, first) = tokio::join!(sb.run(req, cap.clone(), CancellationToken::new()), watch);
    let outcome = outcome.unwrap();
    let total = started.elapsed();
    assert_eq!(outcome.exit_code, Some(0));
    assert!(
        first + Duration::from_millis(1000) < total,
        "first output at {first:?}, end at {total:?}: not streamed"
    );
    assert_eq!(cap.finish().0, "early\nlate\n");
}

pub async fn wall_time_limit(sb: &dyn Sandbox) {
    for (lang, code) in [
        (Language::Python, "import time\ntime.sleep(30)"),
        (Language::Javascript, "for (;;) {}"),
    ] {
        let mut req = request(lang, code);
        req.limits.wall_ms = 500;
        req.limits.cpu_ms = 60_000;
        let t = Instant::now();
        let r = run(sb, req).await;
        assert_eq!(r.outcome.killed_by, Some(KilledBy::Timeout), "{lang:?}");
        assert_eq!(r.outcome.exit_code, None);
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }
}

pub async fn cpu_time_limit(sb: &dyn Sandbox) {
    let mut req = request(Language::Python, "while True:\n    pass");
    req.limits.cpu_ms = 300;
    req.limits.wall_ms = 20_000;
    let r = run(sb, req).await;
    assert_eq!(r.outcome.killed_by, Some(KilledBy::Cpu));
    assert_eq!(r.outcome.exit_code, None);
}

pub async fn memory_limit(sb: &dyn Sandbox) {
    for (lang, code) in [
        (
            Language::Python,
            "x = []\nwhile True:\n    x.append(bytearray(1 << 20))",
        ),
        (
            Language::Javascript,
            "const a = []; for (;;) a.push(new Uint8Array(1 << 20).fill(7));",
        ),
    ] {
        let mut req = request(lang, code);
        req.limits.memory_mb = 64;
        // only the memory limit may end it, however slow the machine
        req.limits.wall_ms = 60_000;
        req.limits.cpu_ms = 60_000;
        let r = run(sb, req).await;
        assert_eq!(
            r.outcome.killed_by,
            Some(KilledBy::Memory),
            "{lang:?}: {}",
            r.stderr
        );
    }
}

pub async fn output_limit(sb: &dyn Sandbox) {
    let mut req = request(Language::Python, "while True:\n    print('x' * 100)");
    req.limits.output_bytes = 10_000;
    let r = run(sb, req).await;
    assert_eq!(r.outcome.killed_by, Some(KilledBy::Output));
    assert_eq!(r.stdout.len(), 10_000);
    assert!(r.truncated.stdout);
    // the budget is shared: whatever the program still writes to stderr before the kill lands
    // (CPython may report the broken pipe) is cut too — flagged, never kept
    assert!(r.stderr.is_empty(), "{:?}", r.stderr);
}

pub async fn cancellation_stops_within_a_second(sb: &dyn Sandbox) {
    let req = request(Language::Javascript, "for (;;) {}");
    let cap = Arc::new(Capture::new(req.limits.output_bytes));
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let t = Instant::now();
    let run = sb.run(req, cap, cancel);
    let trigger = async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.cancel();
        Instant::now()
    };
    let (outcome, cancelled_at) = tokio::join!(run, trigger);
    let stopped = cancelled_at.elapsed();
    assert!(
        stopped < Duration::from_secs(1),
        "stopped {stopped:?} after cancel"
    );
    assert_eq!(outcome.unwrap().exit_code, None);
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// Declares one `#[tokio::test]` per contract case for a sandbox constructor.
#[macro_export]
macro_rules! contract_tests {
    ($make:expr) => {
        $crate::contract_tests!(@each $make;
            hello_python, hello_javascript, stdin_and_args, files_in_the_working_directory,
            exit_codes, stdout_and_stderr_apart, invalid_utf8_is_replaced,
            output_streams_while_running, wall_time_limit, cpu_time_limit, memory_limit,
            output_limit, cancellation_stops_within_a_second);
    };
    (@each $make:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let sb = $make;
                $crate::suite::$case(&*sb).await;
            }
        )*
    };
}
