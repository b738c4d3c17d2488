//! `code.exec` jobs: the input (language, code or module, stdin, files, sandbox tier, limits),
//! its validation with field paths, limit capping, and the output clients get back.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::FieldError;

/// Largest decoded WebAssembly module accepted from a user.
pub const MAX_MODULE_BYTES: usize = 8 * 1024 * 1024;
/// Largest source text (`code`).
pub const MAX_CODE_BYTES: usize = 1024 * 1024;
/// Largest `stdin`.
pub const MAX_STDIN_BYTES: usize = 4 * 1024 * 1024;
/// At most this many `files`, together at most `MAX_FILES_BYTES`.
pub const MAX_FILES: usize = 64;
pub const MAX_FILES_BYTES: usize = 4 * 1024 * 1024;
pub const MAX_ARGS: usize = 64;
pub const MAX_ARG_BYTES: usize = 4096;
const MAX_PATH_BYTES: usize = 255;
const MAX_PATH_DEPTH: usize = 8;

/// The language of a `code.exec` job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    Javascript,
    /// A raw WASI (preview 1) command module (`_start`), given as `module_base64`.
    Wasm,
}

impl Language {
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Javascript => "javascript",
            Language::Wasm => "wasm",
        }
    }
}

/// Where code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// WebAssembly inside the worker process (wasmtime): fastest.
    Wasm,
    /// A gVisor container (runsc): a full Linux userland, strongest isolation.
    Gvisor,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Wasm => "wasm",
            Tier::Gvisor => "gvisor",
        }
    }
}

/// Limits a request may ask for (each capped by the tenant's maximum).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    pub wall_ms: Option<u64>,
    pub cpu_ms: Option<u64>,
    pub memory_mb: Option<u64>,
    pub output_bytes: Option<u64>,
}

/// Limits of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Wall-clock time of the program (start to exit).
    pub wall_ms: u64,
    /// CPU time of the program.
    pub cpu_ms: u64,
    /// Memory of the program (linear memory for wasm; the container's cgroup for gVisor).
    pub memory_mb: u64,
    /// stdout + stderr together; the program is stopped when it writes more.
    pub output_bytes: u64,
}

impl Default for Limits {
    /// Around Judge0's defaults: 5 s CPU, 10 s wall, 128 MiB, 1 MiB of output.
    fn default() -> Self {
        Limits {
            wall_ms: 10_000,
            cpu_ms: 5_000,
            memory_mb: 128,
            output_bytes: 1024 * 1024,
        }
    }
}

impl Limits {
    /// The ceiling of any tenant's limits: 10 minutes wall, 5 minutes CPU, 4 GiB, 64 MiB.
    pub const MAX: Limits = Limits {
        wall_ms: 600_000,
        cpu_ms: 300_000,
        memory_mb: 4096,
        output_bytes: 64 * 1024 * 1024,
    };

    /// Each limit the smaller of the two.
    pub fn min(self, o: Limits) -> Limits {
        Limits {
            wall_ms: self.wall_ms.min(o.wall_ms),
            cpu_ms: self.cpu_ms.min(o.cpu_ms),
            memory_mb: self.memory_mb.min(o.memory_mb),
            output_bytes: self.output_bytes.min(o.output_bytes),
        }
    }

    /// What a run gets: the request where given, else `defaults`, never above `max`.
    pub fn resolve(req: Option<LimitsRequest>, defaults: Limits, max: Limits) -> Limits {
        let r = req.unwrap_or_default();
        Limits {
            wall_ms: r.wall_ms.unwrap_or(defaults.wall_ms).min(max.wall_ms),
            cpu_ms: r.cpu_ms.unwrap_or(defaults.cpu_ms).min(max.cpu_ms),
            memory_mb: r.memory_mb.unwrap_or(defaults.memory_mb).min(max.memory_mb),
            output_bytes: r
                .output_bytes
                .unwrap_or(defaults.output_bytes)
                .min(max.output_bytes),
        }
    }
}

/// Input of a `code.exec` job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeExecInput {
    pub language: Language,
    /// Source text (python, javascript).
    #[serde(default)]
    pub code: Option<String>,
    /// A WASI command module, base64 (language `wasm`).
    #[serde(default)]
    pub module_base64: Option<String>,
    #[serde(default)]
    pub stdin: Option<String>,
    /// Arguments after the program (`sys.argv[1:]`, `scriptArgs`).
    #[serde(default)]
    pub args: Vec<String>,
    /// Files placed in the program's working directory before it starts: relative path →
    /// UTF-8 content.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    #[serde(default)]
    pub sandbox: Option<Tier>,
    #[serde(default)]
    pub limits: Option<LimitsRequest>,
}

impl CodeExecInput {
    /// Checks what can be checked without a sandbox; errors name the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        match self.language {
            Language::Wasm => {
                if self.code.is_some() {
                    return Err(FieldError::invalid(
                        "input.code",
                        "language `wasm` takes `module_base64`, not `code`",
                    ));
                }
                self.module()?;
                if self.sandbox == Some(Tier::Gvisor) {
                    return Err(FieldError::invalid(
                        "input.sandbox",
                        "WebAssembly modules run in the `wasm` sandbox",
                    ));
                }
            }
            Language::Python | Language::Javascript => {
                if self.module_base64.is_some() {
                    return Err(FieldError::invalid(
                        "input.module_base64",
                        "only language `wasm` takes a module",
                    ));
                }
                let code = self.code.as_deref().unwrap_or("");
                if code.trim().is_empty() {
                    return Err(FieldError::invalid("input.code", "must not be empty"));
                }
                if code.len() > MAX_CODE_BYTES {
                    return Err(too_big("input.code", MAX_CODE_BYTES));
                }
                if code.contains('\0') {
                    return Err(FieldError::invalid("input.code", "must not contain NUL"));
                }
            }
        }
        if self
            .stdin
            .as_ref()
            .is_some_and(|s| s.len() > MAX_STDIN_BYTES)
        {
            return Err(too_big("input.stdin", MAX_STDIN_BYTES));
        }
        if self.args.len() > MAX_ARGS {
            return Err(FieldError::invalid(
                "input.args",
                format!("at most {MAX_ARGS} arguments"),
            ));
        }
        for (i, a) in self.args.iter().enumerate() {
            if a.len() > MAX_ARG_BYTES || a.contains('\0') {
                return Err(FieldError::invalid(
                    format!("input.args[{i}]"),
                    format!("must be at most {MAX_ARG_BYTES} bytes, without NUL"),
                ));
            }
        }
        self.validate_files()?;
        if let Some(l) = self.limits {
            for (name, v) in [
                ("wall_ms", l.wall_ms),
                ("cpu_ms", l.cpu_ms),
                ("memory_mb", l.memory_mb),
                ("output_bytes", l.output_bytes),
            ] {
                if v == Some(0) {
                    return Err(FieldError::invalid(
                        format!("input.limits.{name}"),
                        "must be at least 1",
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_files(&self) -> Result<(), FieldError> {
        if self.files.len() > MAX_FILES {
            return Err(FieldError::invalid(
                "input.files",
                format!("at most {MAX_FILES} files"),
            ));
        }
        let total: usize = self.files.values().map(String::len).sum();
        if total > MAX_FILES_BYTES {
            return Err(too_big("input.files", MAX_FILES_BYTES));
        }
        let paths: Vec<&str> = self.files.keys().map(String::as_str).collect();
        // the program itself is written beside the files under this name
        let main = match self.language {
            Language::Python => Some("main.py"),
            Language::Javascript => Some("main.js"),
            Language::Wasm => None,
        };
        for p in &paths {
            if let Err(why) = check_relative_path(p) {
                return Err(FieldError::invalid(format!("input.files.{p}"), why));
            }
            if let Some(m) = main.filter(|m| *p == *m || p.starts_with(&format!("{m}/"))) {
                return Err(FieldError::invalid(
                    format!("input.files.{p}"),
                    format!("`{m}` is the program's own file"),
                ));
            }
            // a file may not also be a directory of another file
            let dir = format!("{p}/");
            if paths.iter().any(|q| q.starts_with(&dir)) {
                return Err(FieldError::invalid(
                    format!("input.files.{p}"),
                    "is both a file and a directory of another file",
                ));
            }
        }
        Ok(())
    }

    /// The decoded module (language `wasm`).
    pub fn module(&self) -> Result<Vec<u8>, FieldError> {
        let b64 = self.module_base64.as_deref().unwrap_or("");
        if b64.is_empty() {
            return Err(FieldError::invalid(
                "input.module_base64",
                "language `wasm` needs a module",
            ));
        }
        if b64.len() > MAX_MODULE_BYTES / 3 * 4 + 4 {
            return Err(too_big("input.module_base64", MAX_MODULE_BYTES));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| FieldError::invalid("input.module_base64", format!("not base64: {e}")))?;
        if !bytes.starts_with(b"\0asm") {
            return Err(FieldError::invalid(
                "input.module_base64",
                "not a WebAssembly module (no `\\0asm` header)",
            ));
        }
        Ok(bytes)
    }
}

fn too_big(field: &str, max: usize) -> FieldError {
    FieldError::invalid(field, format!("must be at most {max} bytes"))
}

/// A path inside the sandbox's working directory: relative, normal components only.
pub fn check_relative_path(p: &str) -> Result<(), &'static str> {
    if p.is_empty() || p.len() > MAX_PATH_BYTES {
        return Err("path must be 1 to 255 bytes");
    }
    if p.starts_with('/') || p.starts_with('\\') {
        return Err("path must be relative");
    }
    if p.contains('\0') || p.contains('\\') || p.chars().any(char::is_control) {
        return Err("path must not contain NUL, backslashes or control characters");
    }
    let parts: Vec<&str> = p.split('/').collect();
    if parts.len() > MAX_PATH_DEPTH {
        return Err("path is nested too deeply (at most 8 parts)");
    }
    if parts
        .iter()
        .any(|c| c.is_empty() || *c == "." || *c == "..")
    {
        return Err("path parts must not be empty, `.` or `..`");
    }
    Ok(())
}

/// Worker settings of `code.exec` (`code.*` in the config file, `SWITCHYARD_CODE__*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CodeConfig {
    /// Where `sandbox-images/*` put the runtimes (`wasm/`, `gvisor/`); default
    /// `$SWITCHYARD_SANDBOX_DIR` or `~/.cache/switchyard/sandbox`.
    pub sandbox_dir: Option<PathBuf>,
    /// The worker's private directory (compiled modules, scratch directories, gVisor state);
    /// default `<tmp>/switchyard-code`.
    pub work_dir: Option<PathBuf>,
    /// Tiers this worker offers (a worker without any does not serve the `code` queue).
    pub tiers: Vec<Tier>,
    /// The tier a language runs in when the job does not say.
    pub python_sandbox: Tier,
    pub javascript_sandbox: Tier,
    /// Code jobs run at once by one worker (default: the number of CPUs).
    pub concurrency: Option<usize>,
    /// Limits of a job that asks for none (each capped by the tenant's maximum).
    pub default_limits: Limits,
    /// Largest limits a job may ask for, unless its tenant has its own (`admin set-tenant`).
    pub max_limits: Limits,
    /// Longest compile of a user's WebAssembly module.
    pub compile_timeout_ms: u64,
    /// gVisor sandboxes kept started per language (the warm pool).
    pub gvisor_pool: usize,
}

impl Default for CodeConfig {
    fn default() -> Self {
        CodeConfig {
            sandbox_dir: None,
            work_dir: None,
            tiers: vec![Tier::Wasm],
            python_sandbox: Tier::Wasm,
            javascript_sandbox: Tier::Wasm,
            concurrency: None,
            default_limits: Limits::default(),
            max_limits: Limits::default(),
            compile_timeout_ms: 10_000,
            gvisor_pool: 2,
        }
    }
}

impl CodeConfig {
    pub fn sandbox_dir(&self) -> PathBuf {
        self.sandbox_dir
            .clone()
            .or_else(|| std::env::var_os("SWITCHYARD_SANDBOX_DIR").map(PathBuf::from))
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
                    .join(".cache/switchyard/sandbox")
            })
    }

    pub fn work_dir(&self) -> PathBuf {
        self.work_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("switchyard-code"))
    }

    /// The tier a job runs in.
    pub fn tier_for(&self, input: &CodeExecInput) -> Tier {
        input.sandbox.unwrap_or(match input.language {
            Language::Python => self.python_sandbox,
            Language::Javascript => self.javascript_sandbox,
            Language::Wasm => Tier::Wasm,
        })
    }
}

/// Why a run was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KilledBy {
    Timeout,
    Cpu,
    Memory,
    Output,
    /// The wasm tier: the program's files passed their cap (the gVisor tier's file systems are
    /// size-limited: a write there fails instead).
    Disk,
}

/// Which streams were cut at the output limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truncated {
    pub stdout: bool,
    pub stderr: bool,
}

/// Output of a `code.exec` job (a run that started always succeeds with this).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodeExecOutput {
    /// The program's exit status; `null` when it was killed before it exited.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub truncated: Truncated,
    pub killed_by: Option<KilledBy>,
    pub duration_ms: u64,
    pub sandbox: Tier,
    /// The limits the run had (after capping).
    pub limits: Limits,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<CodeExecInput, FieldError> {
        let i: CodeExecInput = crate::job::parse_at("input", &v)?;
        i.validate().map(|_| i)
    }

    #[test]
    fn accepts_code_and_files() {
        let i = parse(
            json!({"language":"python","code":"print(1)","files":{"a/b.txt":"x"},
            "limits":{"wall_ms":500}}),
        )
        .unwrap();
        assert_eq!(i.language, Language::Python);
        assert_eq!(i.limits.unwrap().wall_ms, Some(500));
    }

    #[test]
    fn rejects_bad_paths_with_the_field() {
        for p in ["../x", "/etc/passwd", "a/../b", "a//b", "./a", "", "a\\b"] {
            let e = parse(json!({"language":"python","code":"1","files":{p:"x"}})).unwrap_err();
            assert_eq!(e.field, format!("input.files.{p}"), "{p}");
        }
        let e =
            parse(json!({"language":"python","code":"1","files":{"a":"x","a/b":"y"}})).unwrap_err();
        assert_eq!(e.field, "input.files.a");
        // the program's own file is not a file of the input (a directory of that name broke
        // the run with an internal error that was retried)
        for (lang, p) in [
            ("python", "main.py/x"),
            ("python", "main.py"),
            ("javascript", "main.js/x"),
        ] {
            let e = parse(json!({"language": lang, "code": "1", "files": {p: "x"}})).unwrap_err();
            assert_eq!(e.field, format!("input.files.{p}"), "{p}");
        }
        assert!(
            parse(json!({"language": "javascript", "code": "1", "files": {"main.py": "x"}}))
                .is_ok()
        );
    }

    #[test]
    fn wasm_needs_a_module() {
        let e = parse(json!({"language":"wasm","code":"x"})).unwrap_err();
        assert_eq!(e.field, "input.code");
        let e = parse(json!({"language":"wasm"})).unwrap_err();
        assert_eq!(e.field, "input.module_base64");
        let e = parse(json!({"language":"wasm","module_base64":"aGVsbG8="})).unwrap_err();
        assert!(e.message.contains("asm"), "{}", e.message);
        let e = parse(json!({"language":"wasm","module_base64":"AGFzbQEAAAA=","sandbox":"gvisor"}))
            .unwrap_err();
        assert_eq!(e.field, "input.sandbox");
        parse(json!({"language":"wasm","module_base64":"AGFzbQEAAAA="})).unwrap();
    }

    #[test]
    fn rejects_unknown_fields_and_zero_limits() {
        let e = parse(json!({"language":"python","code":"1","colour":1})).unwrap_err();
        assert_eq!(e.field, "input.colour");
        let e = parse(json!({"language":"ruby","code":"1"})).unwrap_err();
        assert_eq!(e.field, "input.language");
        let e = parse(json!({"language":"python","code":"1","limits":{"cpu_ms":0}})).unwrap_err();
        assert_eq!(e.field, "input.limits.cpu_ms");
        let e = parse(json!({"language":"python","code":"  "})).unwrap_err();
        assert_eq!(e.field, "input.code");
    }

    #[test]
    fn limits_are_capped() {
        let max = Limits {
            wall_ms: 1000,
            cpu_ms: 500,
            memory_mb: 64,
            output_bytes: 100,
        };
        let req = LimitsRequest {
            wall_ms: Some(60_000),
            cpu_ms: Some(10),
            ..Default::default()
        };
        let l = Limits::resolve(Some(req), Limits::default(), max);
        assert_eq!(
            l,
            Limits {
                wall_ms: 1000,
                cpu_ms: 10,
                memory_mb: 64,
                output_bytes: 100
            }
        );
    }
}
