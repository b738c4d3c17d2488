//! The sandbox test binary: the contract suite run against every tier, tier-specific cases,
//! and the escape suite of hostile programs.

mod escape;
mod gvisor;
mod suite;
mod wasm;

use std::path::PathBuf;

/// Where the fetched runtimes are (`sandbox-images/*/`), as the worker finds them.
pub fn sandbox_dir() -> PathBuf {
    std::env::var_os("SWITCHYARD_SANDBOX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/switchyard/sandbox")
        })
}

/// A secret in this process's environment that must never appear in any sandbox output.
pub fn canary() -> &'static str {
    static CANARY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CANARY.get_or_init(|| {
        let v = format!("canary-{}", std::process::id());
        // set before any sandbox exists (first call happens in each test's constructor)
        std::env::set_var("SWITCHYARD_CANARY_SECRET", &v);
        v
    })
}
