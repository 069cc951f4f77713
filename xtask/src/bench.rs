//! `cargo xtask bench [--quick]`: build wsproxy and the benchmark in release, then run
//! `wsproxy-bench run`, which starts the upstream and every contender, runs every workload and
//! writes `bench/results/latest.md` with its plots; a whole run (no arguments for it) then
//! measures the fleet's cluster limits on against off (`wsproxy-bench-cluster`, with a Redis
//! server of its own) into `bench/results/cluster.md`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use crate::cargo;
use crate::cmd::Cmd;

pub fn build_command() -> Cmd {
    Cmd::new("cargo").args([
        "build",
        "--release",
        "--package",
        "wsproxy",
        "--package",
        "wsproxy-bench",
    ])
}

fn bench_binary(root: &Path) -> std::path::PathBuf {
    cargo::wsproxy_binary(root, true).with_file_name("wsproxy-bench")
}

pub fn bench_command(root: &Path, quick: bool, extra: &[String]) -> Cmd {
    let wsproxy = cargo::wsproxy_binary(root, true);
    let bench = bench_binary(root);
    let results = root.join("bench/results");
    let cmd = Cmd::new(&bench.display().to_string()).args([
        "run",
        "--wsproxy",
        &wsproxy.display().to_string(),
        "--out",
        &results.display().to_string(),
    ]);
    let cmd = if quick { cmd.args(["--quick"]) } else { cmd };
    cmd.args(extra)
}

pub fn bench(root: &Path, quick: bool, extra: &[String]) -> Result<ExitCode> {
    let build = build_command();
    println!("xtask: {build}");
    build.run_in(root)?;
    let cmd = bench_command(root, quick, extra);
    println!("xtask: {cmd}");
    let status = cmd.status_in(root)?;
    // The benchmark tears its network namespaces down itself, also on SIGINT and SIGTERM; after
    // a SIGKILL only this can.
    let cleanup = Cmd::new(&bench_binary(root).display().to_string()).args(["cleanup"]);
    if let Err(e) = cleanup.status_in(root) {
        eprintln!("xtask: {cleanup}: {e:#}");
    }
    if !status.success() {
        eprintln!("xtask: benchmark failed ({status})");
        return Ok(crate::run::exit_code(status));
    }
    if extra.is_empty() {
        let cluster = cluster_command(root, quick);
        println!("xtask: {cluster}");
        let status = cluster.status_in(root)?;
        if !status.success() {
            eprintln!("xtask: the cluster benchmark failed ({status})");
        }
        return Ok(crate::run::exit_code(status));
    }
    Ok(crate::run::exit_code(status))
}

/// Cluster limits on against off, into `bench/results/cluster.md`.
pub fn cluster_command(root: &Path, quick: bool) -> Cmd {
    let wsproxy = cargo::wsproxy_binary(root, true);
    let out = root.join("bench/results/cluster.md");
    let cmd = Cmd::new(
        &bench_binary(root)
            .with_file_name("wsproxy-bench-cluster")
            .display()
            .to_string(),
    )
    .args([
        "--wsproxy",
        &wsproxy.display().to_string(),
        "--out",
        &out.display().to_string(),
    ]);
    if quick {
        cmd.args(["--seconds", "2", "--runs", "1"])
    } else {
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_runs_the_release_binary_with_the_results_folder() {
        let cmd = bench_command(Path::new("/w"), true, &["--only".into(), "bulk".into()]);
        assert!(cmd.program.ends_with("release/wsproxy-bench"), "{}", cmd.program);
        assert_eq!(cmd.args[0], "run");
        assert!(cmd.args.contains(&"/w/bench/results".to_owned()));
        assert!(cmd.args.ends_with(&["--quick".into(), "--only".into(), "bulk".into()]));
        assert!(build_command().args.contains(&"wsproxy-bench".to_owned()));
        let cluster = cluster_command(Path::new("/w"), false);
        assert!(
            cluster.program.ends_with("release/wsproxy-bench-cluster"),
            "{}",
            cluster.program
        );
        assert!(cluster.args.contains(&"/w/bench/results/cluster.md".to_owned()));
    }
}
