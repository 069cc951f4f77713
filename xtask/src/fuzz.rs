//! `cargo xtask fuzz [--seconds N] [TARGET...]`: runs the libFuzzer targets of `fuzz/` (request
//! head, upstream response head, configuration) for a bounded time each, starting from the
//! committed seeds. Installs cargo-fuzz when it is missing. Fails on the first crash, hang or
//! leak, leaving the reproducer under `fuzz/artifacts/`.

use std::path::Path;

use anyhow::{Context as _, Result, bail};

use crate::cmd::Cmd;

pub const TARGETS: [&str; 4] = ["request_head", "response_head", "config", "proxy_header"];

/// The libFuzzer run of one target: bounded in time, memory and input size, in a scratch
/// corpus seeded from `fuzz/seeds/TARGET` so the committed seeds stay as they are.
pub fn run_command(target: &str, corpus: &Path, seeds: &Path, seconds: u64) -> Cmd {
    Cmd::new("cargo")
        .args(["+nightly", "fuzz", "run", target])
        .args([corpus.to_string_lossy(), seeds.to_string_lossy()])
        .args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-rss_limit_mb=2048",
            "-max_len=65536",
            "-timeout=10",
        ])
        // The fuzz targets exercise the userspace parsers; the kernel relay's object is not needed.
        .env("AYA_BUILD_SKIP", "1")
}

pub fn fuzz(root: &Path, seconds: u64, targets: &[String]) -> Result<()> {
    ensure_cargo_fuzz(root)?;
    let chosen: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("unknown fuzz target {t:?}; targets: {}", TARGETS.join(", "));
            }
        }
        targets.iter().map(String::as_str).collect()
    };
    let dir = root.join("fuzz");
    for target in chosen {
        let corpus = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let seeds = dir.join("seeds").join(target);
        println!("xtask: fuzzing {target} for {seconds} s");
        run_command(target, &corpus, &seeds, seconds).run_in(&dir)?;
    }
    println!("xtask: fuzz: no crash, hang or leak");
    Ok(())
}

fn ensure_cargo_fuzz(root: &Path) -> Result<()> {
    let installed = std::process::Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        println!("xtask: cargo-fuzz: installing");
        Cmd::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .run_in(root)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_bounded_and_seeded() {
        let c = run_command("config", Path::new("/c"), Path::new("/s"), 60);
        let line = c.to_string();
        assert!(line.contains("fuzz run config /c /s"), "{line}");
        assert!(
            line.contains("-max_total_time=60") && line.contains("-rss_limit_mb=2048"),
            "{line}"
        );
    }
}
