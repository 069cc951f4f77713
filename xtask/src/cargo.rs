//! The workspace's own cargo invocations: build the proxy, run the tests.

use std::env;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;

use crate::cmd::Cmd;

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The workspace's target directory (`CARGO_TARGET_DIR` when set).
pub fn target_dir(root: &Path) -> PathBuf {
    let target = env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    if target.is_relative() {
        root.join(target)
    } else {
        target
    }
}

/// Where `cargo build -p wsproxy [--release]` puts the `wsproxy` binary.
pub fn wsproxy_binary(root: &Path, release: bool) -> PathBuf {
    target_dir(root).join(profile_dir(release)).join("wsproxy")
}

fn profile_dir(release: bool) -> &'static str {
    if release { "release" } else { "debug" }
}

/// The `cargo` on PATH: under rustup it keeps the toolchain xtask was started with.
fn cargo() -> Cmd {
    Cmd::new("cargo")
}

pub fn build_command(release: bool) -> Cmd {
    let cmd = cargo().args(["build", "--package", "wsproxy"]);
    if release { cmd.args(["--release"]) } else { cmd }
}

/// `cargo test` over every crate that builds for the host (proxy-ebpf builds for the kernel),
/// every test binary even after a failing one, so that one run shows every failure.
pub fn test_command(extra: &[String]) -> Cmd {
    cargo()
        .args(["test", "--workspace", "--exclude", "proxy-ebpf", "--no-fail-fast"])
        .args(extra)
}

pub fn build(root: &Path, release: bool) -> Result<()> {
    let cmd = build_command(release);
    println!("xtask: {cmd}");
    cmd.run_in(root)
}

/// Runs the tests with their output on this terminal and returns cargo's exit status.
pub fn test(root: &Path, extra: &[String]) -> Result<ExitCode> {
    let cmd = test_command(extra);
    println!("xtask: {cmd}");
    let status = cmd.status_in(root)?;
    if !status.success() {
        eprintln!("xtask: tests failed ({status})");
    }
    Ok(crate::run::exit_code(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_command_excludes_the_kernel_crate_and_passes_extra_args() {
        let cmd = test_command(&["handshake".into(), "--".into(), "--nocapture".into()]);
        assert_eq!(
            cmd.args,
            [
                "test",
                "--workspace",
                "--exclude",
                "proxy-ebpf",
                "--no-fail-fast",
                "handshake",
                "--",
                "--nocapture"
            ]
        );
    }

    #[test]
    fn build_command_and_binary_follow_the_profile() {
        assert_eq!(build_command(false).args, ["build", "--package", "wsproxy"]);
        assert_eq!(build_command(true).args, ["build", "--package", "wsproxy", "--release"]);
        if env::var_os("CARGO_TARGET_DIR").is_none() {
            let root = Path::new("/w");
            assert_eq!(wsproxy_binary(root, false), Path::new("/w/target/debug/wsproxy"));
            assert_eq!(wsproxy_binary(root, true), Path::new("/w/target/release/wsproxy"));
        }
    }

    #[test]
    fn root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
    }
}
