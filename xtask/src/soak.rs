//! `cargo xtask soak [--minutes N] [--stream-minutes S]`: build and run the soak driver
//! (`tests/src/bin/soak.rs`) in release. It relays thousands of checksummed connections through
//! an in-process proxy, half the time with the kernel relay and half with the userspace relay,
//! checks that descriptors, memory and kernel map entries come back to their start, then runs
//! the kernel relay's byte-stream stress (concurrent bulk echoes, every byte checked), and writes
//! `bench/results/soak.md`. Root is needed for the kernel relay (without it that half is
//! skipped, and under `CI=true` the soak fails).

use std::path::Path;

use anyhow::{Result, bail};

use crate::cmd::Cmd;

/// Minutes the soak runs when not told otherwise.
pub const DEFAULT_MINUTES: u64 = 20;
/// Minutes of the byte-stream stress when not told otherwise: about 5,000 connections here.
pub const DEFAULT_STREAM_MINUTES: u64 = 10;

pub fn soak_command(minutes: u64, stream_minutes: u64) -> Cmd {
    Cmd::new("cargo").args([
        "run",
        "--release",
        "--package",
        "wsproxy-tests",
        "--bin",
        "soak",
        "--",
        "--minutes",
        &minutes.to_string(),
        "--stream-minutes",
        &stream_minutes.to_string(),
    ])
}

/// Runs the soak for `minutes` from the workspace `root`; fails when the soak found a problem
/// (the summary in `bench/results/soak.md` says which).
pub fn soak(root: &Path, minutes: u64, stream_minutes: u64) -> Result<()> {
    if minutes == 0 {
        bail!("the soak needs at least one minute");
    }
    let cmd = soak_command(minutes, stream_minutes);
    println!("xtask: {cmd}");
    let status = cmd.status_in(root)?;
    if !status.success() {
        bail!(
            "soak failed ({status}); see {}",
            root.join("bench/results/soak.md").display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soak_runs_the_release_driver_with_its_minutes() {
        let cmd = soak_command(DEFAULT_MINUTES, DEFAULT_STREAM_MINUTES);
        assert_eq!(cmd.program, "cargo");
        assert_eq!(
            cmd.args,
            [
                "run",
                "--release",
                "--package",
                "wsproxy-tests",
                "--bin",
                "soak",
                "--",
                "--minutes",
                "20",
                "--stream-minutes",
                "10"
            ]
        );
        assert!(soak(Path::new("/nonexistent"), 0, 0).is_err());
    }
}
