//! `wsproxy-bench`: the benchmark of wsproxy against nginx, HAProxy and a direct connection.
//!
//! `run` does everything (`cargo xtask bench` calls it); the other subcommands are its parts, for
//! trying one measurement by hand against any `ws://` address on loopback.

mod contenders;
mod load;
mod plot;
mod report;
mod run;
mod stats;
mod sys;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::contenders::Kind;

#[derive(Parser)]
#[command(
    name = "wsproxy-bench",
    about = "Benchmark wsproxy against nginx, HAProxy and a direct connection"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole benchmark: start the upstream and every contender, run every workload, write the report
    Run {
        /// Smoke run: fewer runs, shorter windows, fewer idle connections (< 5 min)
        #[arg(long)]
        quick: bool,
        /// The wsproxy binary (release build)
        #[arg(long, default_value = "target/release/wsproxy")]
        wsproxy: PathBuf,
        /// Where latest.md, latest.json and the plots go
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Only these workloads (bulk, echo, closed, handshakes, idle), comma-separated
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Only these contenders (direct, wsproxy-kernel, wsproxy-userspace, nginx, haproxy, haproxy-splice)
        #[arg(long, value_delimiter = ',')]
        contenders: Vec<String>,
        /// Runs per measurement (default: 5, quick: 2)
        #[arg(long)]
        runs: Option<usize>,
        /// Keep the other workloads' results from the previous latest.json (to re-run one workload)
        #[arg(long)]
        merge: bool,
    },
    /// Rewrite latest.md and the plots from latest.json (e.g. after editing bench/analysis.md)
    Report {
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// The WebSocket upstream: /echo echoes, /sink counts bytes and answers "END" with the count
    Upstream {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// One connection sending SIZE-byte messages to TARGET/sink for SECS
    Bulk {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 65536)]
        size: usize,
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
    },
    /// Open-loop echo at RATE messages per second over CONNS connections
    Echo {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, default_value_t = 128)]
        size: usize,
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
    },
    /// Closed-loop echo: CONNS connections with one message in flight each
    ClosedLoop {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        #[arg(long, default_value_t = 128)]
        size: usize,
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
    },
    /// Handshakes per second: CLIENTS loops of connect, upgrade, one echo, close
    Handshakes {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 50)]
        clients: usize,
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
    },
    /// Open CONNS idle connections; with --pid, report that process's RSS
    Idle {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 10000)]
        conns: usize,
        #[arg(long)]
        pid: Option<u32>,
    },
}

fn print<T: Serialize>(r: Result<T>) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(&r?)?);
    Ok(())
}

fn main() -> Result<()> {
    let secs = Duration::from_secs_f64;
    match Cli::parse().cmd {
        Cmd::Run {
            quick,
            wsproxy,
            out,
            only,
            contenders,
            runs,
            merge,
        } => {
            for w in &only {
                if !run::WORKLOADS.contains(&w.as_str()) {
                    bail!("unknown workload {w:?}: one of {:?}", run::WORKLOADS);
                }
            }
            let kinds = if contenders.is_empty() {
                Kind::ALL.to_vec()
            } else {
                let mut ks = Vec::new();
                for c in &contenders {
                    ks.push(Kind::from_name(c).ok_or_else(|| anyhow::anyhow!("unknown contender {c:?}"))?);
                }
                ks
            };
            let wsproxy = std::fs::canonicalize(&wsproxy).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e} (build it: cargo build --release -p wsproxy)",
                    wsproxy.display()
                )
            })?;
            run::run(&run::Options {
                quick,
                wsproxy,
                out,
                only,
                contenders: kinds,
                runs,
                merge,
            })
        }
        Cmd::Report { out } => {
            let text = std::fs::read_to_string(out.join("latest.json"))?;
            let results: run::Results = serde_json::from_str(&text)?;
            report::write(&results, &out)
        }
        Cmd::Upstream { listen } => {
            sys::raise_nofile(200_000);
            upstream::run(listen)
        }
        Cmd::Bulk { target, size, secs: s } => print(load::bulk(target, size, secs(s))),
        Cmd::Echo {
            target,
            rate,
            conns,
            size,
            secs: s,
        } => {
            sys::raise_nofile(200_000);
            print(load::echo(target, conns, size, rate, secs(s)))
        }
        Cmd::ClosedLoop {
            target,
            conns,
            size,
            secs: s,
        } => {
            sys::raise_nofile(200_000);
            print(load::closed_loop(target, conns, size, secs(s)))
        }
        Cmd::Handshakes {
            target,
            clients,
            secs: s,
        } => print(load::handshakes(target, clients, secs(s))),
        Cmd::Idle { target, conns, pid } => {
            sys::raise_nofile(200_000);
            print(load::idle(target, conns, Duration::from_secs(1), pid))
        }
    }
}
