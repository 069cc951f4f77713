//! `cargo xtask soak [--minutes N]`: build and run the soak driver (`tests/src/bin/soak.rs`) in
//! release. It relays thousands of checksummed connections through an in-process proxy, half the
//! time with the kernel relay and half with the userspace relay, checks that descriptors,
//! memory and kernel map entries come back to their start, and writes
//! `bench/results/soak.md`. Root is needed for the kernel relay (without it that half is
//! skipped, and under `CI=true` the soak fails).

use std::path::Path;

use anyhow::{Result, bail};

use crate::cmd::Cmd;

/// Minutes the soak runs when not told otherwise.
pub const DEFAULT_MINUTES: u64 = 20;

pub fn soak_command(minutes: u64) -> Cmd {
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
    ])
}

/// Runs the soak for `minutes` from the workspace `root`; fails when the soak found a problem
/// (the summary in `bench/results/soak.md` says which).
pub fn soak(root: &Path, minutes: u64) -> Result<()> {
    if minutes == 0 {
        bail!("the soak needs at least one minute");
    }
    let cmd = soak_command(minutes);
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
        let cmd = soak_command(DEFAULT_MINUTES);
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
                "20"
            ]
        );
        assert!(soak(Path::new("/nonexistent"), 0).is_err());
    }
}
