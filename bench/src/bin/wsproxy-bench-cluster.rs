//! `wsproxy-bench-cluster [--wsproxy PATH] [--seconds S] [--runs N] [--loops L] [--out FILE]`:
//! handshakes/s and p99 through one wsproxy node with cluster limits on (Redis on loopback)
//! against off (`bench/src/cluster.rs`). Prints each run and a Markdown summary (also to FILE).

#[path = "../cluster.rs"]
mod cluster;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "wsproxy-bench-cluster",
    about = "Handshakes/s with cluster limits on against off"
)]
struct Cli {
    /// The wsproxy binary (release build)
    #[arg(long, default_value = "target/release/wsproxy")]
    wsproxy: PathBuf,
    /// Measured seconds per run
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Runs per mode (off and on alternate)
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Handshakes in flight at once (1: the latency of an idle machine)
    #[arg(long, default_value_t = cluster::LOOPS)]
    loops: usize,
    /// Also write the summary here
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let plan = cluster::Plan {
        wsproxy: cli.wsproxy,
        window: Duration::from_secs(cli.seconds),
        runs: cli.runs.max(1),
        loops: cli.loops.max(1),
    };
    let (_, summary) = cluster::run(&plan)?;
    println!("{summary}");
    if let Some(out) = cli.out {
        std::fs::write(out, &summary)?;
    }
    Ok(())
}
