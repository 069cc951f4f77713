//! `cargo xtask <task>`: the developer and CI entry points of the wsproxy workspace.

mod bench;
mod cargo;
mod cluster;
mod cmd;
mod ebpf;
mod fuzz;
mod run;
mod setup;
mod soak;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Set up, build, run, test and benchmark wsproxy"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: nightly rust-src, LLVM 22 dev packages, bpf-linker (idempotent)
    Setup {
        /// Print what would be installed, install nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Set up if needed, then build the proxy (and its eBPF programs)
    Build {
        /// Build with the release profile
        #[arg(long)]
        release: bool,
    },
    /// Set up if needed, build, then run the proxy on config/wsproxy.toml with two echo upstreams
    Run {
        /// Build and run with the release profile
        #[arg(long)]
        release: bool,
    },
    /// Set up if needed, build, then run a fleet: Redis on 127.0.0.1:6390, three proxies on
    /// 127.0.0.11-13:8080 sharing cluster limits in it, two echo upstreams
    Cluster {
        /// Build and run with the release profile
        #[arg(long)]
        release: bool,
    },
    /// Set up if needed, build in release, then benchmark wsproxy against nginx, HAProxy, Caddy
    /// and direct in three topologies (bench/results/latest.md, latest.json); as root
    Bench {
        /// Smoke run: fewer runs and shorter windows (under 5 minutes)
        #[arg(long)]
        quick: bool,
        /// Passed on to `wsproxy-bench run` (e.g. `-- --topologies veth --only bulk,closed`)
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Soak: thousands of checksummed connections opening, relaying and closing in both relay
    /// modes, then memory, descriptors and kernel map entries checked against their start, then
    /// the kernel relay's byte-stream stress (summary in bench/results/soak.md); as root
    Soak {
        /// Minutes of opening and closing (half per relay mode)
        #[arg(long, default_value_t = soak::DEFAULT_MINUTES)]
        minutes: u64,
        /// Minutes of the kernel relay's byte-stream stress after them (0: none)
        #[arg(long, default_value_t = soak::DEFAULT_STREAM_MINUTES)]
        stream_minutes: u64,
    },
    /// Run the fuzz targets (request head, response head, configuration) for a bounded time
    /// each; installs cargo-fuzz if missing
    Fuzz {
        /// Seconds per target
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (default: all)
        targets: Vec<String>,
    },
    /// Set up if needed, then run every test of the workspace (privileged ones read env CI)
    Test {
        /// Passed on to `cargo test` (e.g. `-- handshake -- --nocapture`)
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match dispatch(Cli::parse().task) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(task: Task) -> Result<ExitCode> {
    let root = cargo::workspace_root();
    match task {
        Task::Setup { dry_run } => setup::setup(&root, dry_run)?,
        Task::Build { release } => {
            prepare(&root)?;
            cargo::build(&root, release)?;
        }
        Task::Run { release } => {
            prepare(&root)?;
            cargo::build(&root, release)?;
            return run::run(&root, &cargo::wsproxy_binary(&root, release));
        }
        Task::Cluster { release } => {
            prepare(&root)?;
            cargo::build(&root, release)?;
            return cluster::cluster(&root, &cargo::wsproxy_binary(&root, release));
        }
        Task::Bench { quick, args } => {
            prepare(&root)?;
            return bench::bench(&root, quick, &args);
        }
        Task::Soak {
            minutes,
            stream_minutes,
        } => {
            prepare(&root)?;
            soak::soak(&root, minutes, stream_minutes)?;
        }
        Task::Fuzz { seconds, targets } => {
            prepare(&root)?;
            fuzz::fuzz(&root, seconds, &targets)?;
        }
        Task::Test { args } => {
            prepare(&root)?;
            return cargo::test(&root, &args);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What every task but `setup` needs first: the prerequisites, then the kernel programs, built
/// with their progress on the terminal and handed to every cargo build this task starts.
fn prepare(root: &std::path::Path) -> Result<()> {
    setup::ensure(root)?;
    let object = ebpf::build(root)?;
    // SAFETY: xtask is single-threaded here; no other thread reads the environment.
    unsafe { std::env::set_var(ebpf::OBJECT_ENV, object) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_passes_everything_after_the_separator() {
        let cli = Cli::try_parse_from(["xtask", "test", "--", "handshake", "--", "--nocapture"]).unwrap();
        let Task::Test { args } = cli.task else {
            panic!("not test")
        };
        assert_eq!(args, ["handshake", "--", "--nocapture"]);
    }
}
