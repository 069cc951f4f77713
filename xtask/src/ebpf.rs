//! The kernel programs, built as a step of their own before anything that embeds them.
//!
//! `proxy/build.rs` can build them too (aya-build), but a build script can only show a nested
//! build's output as `warning:` lines, and a first build of `core` for the BPF target prints
//! dozens. Built here, cargo's own progress shows on the terminal, and the object is handed to
//! `proxy/build.rs` through [`OBJECT_ENV`], which then embeds it as it is.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::cargo;
use crate::cmd::Cmd;
use crate::setup::NIGHTLY;

/// Read by `proxy/build.rs`: the path of a kernel object built by this step.
pub const OBJECT_ENV: &str = "WSPROXY_EBPF_OBJECT";
const PACKAGE: &str = "proxy-ebpf";
const TARGET: &str = "bpfel-unknown-none";
/// The flags aya-build passes (`bpf_target_arch` for aya-ebpf, BTF for CO-RE and map
/// definitions), separated as `CARGO_ENCODED_RUSTFLAGS` wants: by 0x1f.
const RUSTFLAGS: &str = "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf";

fn target_dir(root: &Path) -> PathBuf {
    cargo::target_dir(root).join("ebpf")
}

pub fn build_command(root: &Path) -> Cmd {
    Cmd::new("rustup")
        .args([
            "run",
            NIGHTLY,
            "cargo",
            "build",
            "--package",
            PACKAGE,
            "--bins",
            "--release",
        ])
        .args(["--target", TARGET, "-Z", "build-std=core", "--target-dir"])
        .args([target_dir(root).display().to_string()])
        .env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS)
}

/// Builds the programs; returns the object for [`OBJECT_ENV`].
pub fn build(root: &Path) -> Result<PathBuf> {
    let cmd = build_command(root);
    println!("xtask: the kernel programs: {cmd}");
    // Cargo sets RUSTC for the xtask it runs; the nested nightly build must pick its own.
    let mut command = cmd.command();
    command.env_remove("RUSTC").env_remove("RUSTC_WORKSPACE_WRAPPER");
    let status = command.current_dir(root).status()?;
    anyhow::ensure!(status.success(), "`{cmd}` failed ({status})");
    Ok(target_dir(root).join(TARGET).join("release").join(PACKAGE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_kernel_crate_with_nightly_for_the_bpf_target_in_its_own_dir() {
        let cmd = build_command(Path::new("/w"));
        assert_eq!(cmd.program, "rustup");
        assert_eq!(cmd.args[..3], ["run", "nightly", "cargo"]);
        assert!(cmd.args.windows(2).any(|w| w == ["--target", TARGET]));
        assert!(cmd.args.windows(2).any(|w| w == ["-Z", "build-std=core"]));
        assert!(cmd.args.last().unwrap().ends_with("/ebpf"));
        assert_eq!(cmd.env[0].1.split('\x1f').count(), 3);
    }
}
