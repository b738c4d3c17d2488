//! The escape suite: hostile programs that must all be contained — no host file, no secret,
//! no network, no host process reached; limits end the bombs; the host stays healthy.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

use switchyard_core::code::{KilledBy, Language};
use switchyard_sandbox::Sandbox;

use crate::suite::{request, run, Ran};

/// What a hostile program must end with (besides the checks every program gets).
#[derive(Debug, Clone, Copy)]
pub enum Expect {
    /// Every attempt it makes fails: it prints `blocked` and never `ESCAPED`.
    Blocked,
    /// A limit stops it.
    Killed(&'static [KilledBy]),
    /// Either (a fork bomb meets the process limit or the memory limit first).
    BlockedOrKilled(&'static [KilledBy]),
    /// Anything, as long as the common checks hold (what it sees is its own sandbox).
    Contained,
}

pub struct Hostile {
    pub name: &'static str,
    pub language: Language,
    pub code: &'static str,
    pub expect: Expect,
}

const TIME: &[KilledBy] = &[KilledBy::Timeout, KilledBy::Cpu];

/// Prepended to every Python program: runs one attempt, says whether it got through.
const PY_PRELUDE: &str = r#"import os, sys, socket
def attempt(f):
    try:
        r = f()
        print('ESCAPED', repr(r)[:200])
    except BaseException as e:
        print('blocked', type(e).__name__)
"#;

macro_rules! py {
    ($name:literal, $expect:expr, $code:literal) => {
        Hostile {
            name: $name,
            language: Language::Python,
            code: $code,
            expect: $expect,
        }
    };
}

/// Programs that are hostile in every tier (Python runs in both). Placeholders: `{PID}` the
/// host process, `{MARKER}` a host file only the host can see, `{PROJECT}` the source tree,
/// `{PORT}` a host listener ("the API"), `{HOME}` the host user's home.
pub fn python_programs() -> Vec<Hostile> {
    use Expect::*;
    vec![
        py!("read /etc/shadow", Blocked, "attempt(lambda: open('/etc/shadow').read())"),
        py!("read a host-only file", Blocked, "attempt(lambda: open('{MARKER}').read())"),
        py!("read the worker's environ", Blocked, "attempt(lambda: open('/proc/{PID}/environ').read())"),
        py!("read the worker's cmdline", Blocked, "attempt(lambda: open('/proc/{PID}/cmdline').read())"),
        py!("read own environ", Contained, "print(open('/proc/self/environ').read() if os.path.exists('/proc/self/environ') else 'none')"),
        py!("print environment", Contained, "print(dict(os.environ))"),
        py!("read the project", Blocked, "attempt(lambda: open('{PROJECT}/Cargo.toml').read())"),
        py!("read the host home", Blocked, "attempt(lambda: os.listdir('{HOME}/.cargo'))"),
        py!("list /", Contained, "print(os.listdir('/'))"),
        py!("connect postgres", Blocked, "attempt(lambda: socket.create_connection(('127.0.0.1', 5432), timeout=2))"),
        py!("connect redis", Blocked, "attempt(lambda: socket.create_connection(('127.0.0.1', 6379), timeout=2))"),
        py!("connect the API", Blocked, "attempt(lambda: socket.create_connection(('127.0.0.1', {PORT}), timeout=2))"),
        py!("connect IPv6 loopback", Blocked, "attempt(lambda: socket.create_connection(('::1', {PORT}), timeout=2))"),
        py!("DNS lookup", Blocked, "attempt(lambda: socket.getaddrinfo('example.com', 443))"),
        py!("UDP to DNS", Blocked, "s = None\ndef u():\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    s.settimeout(2)\n    s.sendto(b'x', ('8.8.8.8', 53))\n    return s.recvfrom(10)\nattempt(u)"),
        py!("fork bomb", BlockedOrKilled(&[KilledBy::Memory]), "n = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            import time\n            time.sleep(5)\n            os._exit(0)\n        n += 1\nexcept BaseException as e:\n    print('blocked after', n, type(e).__name__)"),
        py!("memory bomb", Killed(&[KilledBy::Memory]), "x = []\nwhile True:\n    x.append(bytearray(8 << 20))"),
        py!("busy loop", Killed(TIME), "while True:\n    pass"),
        py!("huge output", Killed(&[KilledBy::Output]), "while True:\n    sys.stdout.write('A' * 65536)"),
        py!("huge stderr", Killed(&[KilledBy::Output]), "while True:\n    sys.stderr.write('E' * 65536)"),
        py!("symlink to shadow", Blocked, "def f():\n    os.symlink('/etc/shadow', '/work/s')\n    return open('/work/s').read()\nattempt(f)"),
        py!("symlink out of the work dir", Blocked, "def f():\n    os.symlink('../../../../../../../../{MARKER}', '/work/up')\n    return open('/work/up').read()\nattempt(f)"),
        py!("symlink a directory up", Blocked, "def f():\n    os.symlink('/', '/work/root')\n    return open('/work/root{MARKER}').read()\nattempt(f)"),
        py!("hard link a host file", Blocked, "attempt(lambda: os.link('{MARKER}', '/work/h'))"),
        py!("write outside /work", Contained, "try:\n    open('/tmp/sy-escape-{PID}', 'w').write('x')\n    print('wrote inside the sandbox')\nexcept BaseException as e:\n    print('blocked', type(e).__name__)"),
        py!("write through ..", Contained, "try:\n    open('/work/../../../tmp/sy-escape-dots-{PID}', 'w').write('x')\nexcept BaseException as e:\n    print('blocked', type(e).__name__)"),
        py!("probe /proc", Contained, "print(os.listdir('/proc') if os.path.isdir('/proc') else 'no /proc')"),
        py!("probe /sys", Contained, "print(os.listdir('/sys') if os.path.isdir('/sys') else 'no /sys')"),
        py!("read host kernel memory", Blocked, "attempt(lambda: open('/dev/mem', 'rb').read(16))"),
        py!("read a host disk", Blocked, "attempt(lambda: open('/dev/vda', 'rb').read(16))"),
        py!("signal the worker", Blocked, "attempt(lambda: os.kill({PID}, 9))"),
        py!("signal pid 1", Contained, "try:\n    os.kill(1, 9)\nexcept BaseException as e:\n    print('blocked', type(e).__name__)"),
        py!("deep recursion", Contained, "sys.setrecursionlimit(10 ** 7)\ndef f(n):\n    return f(n + 1) + 1\ntry:\n    f(0)\nexcept BaseException as e:\n    print('stopped', type(e).__name__)"),
        py!("walk up with chdir", Contained, "for _ in range(20):\n    try:\n        os.chdir('..')\n    except BaseException:\n        pass\nprint(os.getcwd(), os.listdir('.'))"),
        py!("ptrace via ctypes", Contained, "try:\n    import ctypes\n    libc = ctypes.CDLL(None)\n    print('ptrace', libc.ptrace(16, {PID}, 0, 0))\nexcept BaseException as e:\n    print('blocked', type(e).__name__)"),
    ]
}

/// A JavaScript program of the suite (each tier has its own: QuickJS or Node).
pub fn js(name: &'static str, code: &'static str, expect: Expect) -> Hostile {
    Hostile {
        name,
        language: Language::Javascript,
        code,
        expect,
    }
}

/// Host state the checks compare against.
pub struct Host {
    pub pid: u32,
    pub marker_path: PathBuf,
    pub marker: String,
    pub project: PathBuf,
    pub listener: TcpListener,
}

impl Host {
    pub fn new() -> Host {
        let pid = std::process::id();
        let marker = format!("host-only-secret-{}", uuid::Uuid::new_v4());
        let marker_path = std::env::temp_dir().join(format!("sy-marker-{pid}"));
        std::fs::write(&marker_path, &marker).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        Host {
            pid,
            marker_path,
            marker,
            project: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
            listener,
        }
    }

    pub fn render(&self, code: &str) -> String {
        code.replace("{PID}", &self.pid.to_string())
            .replace("{MARKER}", &self.marker_path.display().to_string())
            .replace("{PROJECT}", &self.project.display().to_string())
            .replace(
                "{PORT}",
                &self.listener.local_addr().unwrap().port().to_string(),
            )
            .replace("{HOME}", &std::env::var("HOME").unwrap_or_default())
    }
}

/// Runs every program; returns what went wrong (empty = all contained).
pub async fn run_all(sb: &dyn Sandbox, host: &Host, programs: &[Hostile]) -> Vec<String> {
    let canary = crate::canary();
    let mut failures = Vec::new();
    for h in programs {
        let code = match h.language {
            Language::Python => format!("{PY_PRELUDE}{}", host.render(h.code)),
            _ => host.render(h.code),
        };
        let mut req = request(h.language, &code);
        req.limits.wall_ms = 3_000;
        req.limits.cpu_ms = 2_000;
        req.limits.memory_mb = 64;
        req.limits.output_bytes = 64 * 1024;
        let r: Ran = run(sb, req).await;
        let all = format!("{}\n{}", r.stdout, r.stderr);
        let mut why = Vec::new();
        if all.contains(canary) {
            why.push("printed the canary secret".to_string());
        }
        if all.contains(&host.marker) {
            why.push("printed a host-only file".into());
        }
        if all.contains("description = \"Sandboxes for untrusted code") {
            why.push("printed the project's source".into());
        }
        match h.expect {
            Expect::Blocked => {
                if all.contains("ESCAPED") || !all.contains("blocked") {
                    why.push("an attempt was not blocked".into());
                }
            }
            Expect::Killed(by) => {
                if !r.outcome.killed_by.is_some_and(|k| by.contains(&k)) {
                    why.push(format!(
                        "expected killed_by {by:?}, got {:?}",
                        r.outcome.killed_by
                    ));
                }
            }
            Expect::BlockedOrKilled(by) => {
                let killed = r.outcome.killed_by.is_some_and(|k| by.contains(&k));
                if all.contains("ESCAPED") || !(killed || all.contains("blocked")) {
                    why.push(format!(
                        "neither blocked nor killed by {by:?} (killed_by {:?})",
                        r.outcome.killed_by
                    ));
                }
            }
            Expect::Contained => {}
        }
        if !why.is_empty() {
            failures.push(format!(
                "{}: {} (exit {:?}, killed_by {:?})\nstdout: {}\nstderr: {}",
                h.name,
                why.join("; "),
                r.outcome.exit_code,
                r.outcome.killed_by,
                r.stdout.chars().take(500).collect::<String>(),
                r.stderr.chars().take(500).collect::<String>()
            ));
        }
    }
    failures
}

/// After the suite: no connection reached the host, no file appeared, the marker is intact,
/// and the sandbox still runs a normal program.
pub async fn host_is_healthy(sb: &dyn Sandbox, host: &Host) -> Vec<String> {
    let mut failures = Vec::new();
    if host.listener.accept().is_ok() {
        failures.push("a program connected to the host listener".into());
    }
    for p in [
        format!("/tmp/sy-escape-{}", host.pid),
        format!("/tmp/sy-escape-dots-{}", host.pid),
    ] {
        if std::path::Path::new(&p).exists() {
            failures.push(format!("{p} was written on the host"));
        }
    }
    if std::fs::read_to_string(&host.marker_path).ok().as_deref() != Some(host.marker.as_str()) {
        failures.push("the host marker file changed".into());
    }
    let r = run(sb, request(Language::Python, "print('still fine')")).await;
    if r.stdout != "still fine\n" {
        failures.push(format!(
            "sandbox unhealthy afterwards: {:?} {}",
            r.outcome, r.stderr
        ));
    }
    failures
}

/// Runs the programs and the health checks; panics listing every failure.
pub async fn assert_contained(sb: Arc<dyn Sandbox>, programs: Vec<Hostile>) {
    let host = Host::new();
    assert!(programs.len() >= 30 || programs.iter().all(|p| p.language != Language::Python));
    let mut failures = run_all(&*sb, &host, &programs).await;
    failures.extend(host_is_healthy(&*sb, &host).await);
    let _ = std::fs::remove_file(&host.marker_path);
    assert!(
        failures.is_empty(),
        "{} of {} hostile programs were not contained:\n\n{}",
        failures.len(),
        programs.len(),
        failures.join("\n\n")
    );
}
