//! `wsproxy-bench`: the benchmark of wsproxy against nginx, HAProxy, Caddy and a direct
//! connection, in three network topologies.
//!
//! `run` does everything (`cargo xtask bench` calls it); `upstream` and `measure` are its parts,
//! for trying one measurement by hand against any `ws://` address.

mod contenders;
mod figures;
mod load;
mod plan;
mod plot;
mod profile;
mod report;
mod results;
mod run;
mod scale;
mod services;
mod stats;
mod sys;
mod tls;
mod topology;
mod upstream;
mod ws;

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
    /// The whole benchmark: per topology, start the upstream and every contender, run every workload, write the report
    Run {
        /// Smoke run: 1 run, short windows, 1,000 connections in the largest group (< 5 min)
        #[arg(long)]
        quick: bool,
        /// The wsproxy binary (release build)
        #[arg(long, default_value = "target/release/wsproxy")]
        wsproxy: PathBuf,
        /// Where latest.md, latest.json and the plots go
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Only these workloads (ids as in the report, e.g. bulk,closed,idle,services-scale,tls-bulk), comma-separated
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Only these contenders (direct, wsproxy-kernel, wsproxy-userspace, wsproxy-auto, nginx, haproxy, haproxy-splice, caddy)
        #[arg(long, value_delimiter = ',')]
        contenders: Vec<String>,
        /// Only these topologies (loopback, veth, veth-rps), comma-separated
        #[arg(long, value_delimiter = ',')]
        topologies: Vec<String>,
        /// Measured runs per workload (default: 5, quick: 1)
        #[arg(long)]
        runs: Option<usize>,
        /// After the runs, profile one fixed-load measurement per contender and workload with
        /// `perf record -a -g` into OUT/profiles/ (best with --runs 0 and its own --out)
        #[arg(long)]
        profile: bool,
    },
    /// Remove network namespaces an interrupted run may have left (`wspb-*`); idempotent
    Cleanup,
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
    /// One workload of the plan (`--workload`, ids as in the report) against TARGET: at the
    /// maximum, or at `--rate` units per second; prints the measurement as JSON
    Measure {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        workload: String,
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        /// The TLS workloads (`tls-*`): the certificate (PEM) TARGET's TLS listener has, which
        /// the generator then trusts alone
        #[arg(long)]
        tls_certificate: Option<PathBuf>,
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
            topologies,
            runs,
            profile,
        } => {
            let ids = run::known_ids(quick);
            for w in &only {
                if !ids.contains(w) {
                    bail!("unknown workload {w:?}: one of {ids:?}");
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
            let mut tops = Vec::new();
            for t in &topologies {
                tops.push(
                    topology::Topology::from_name(t)
                        .ok_or_else(|| anyhow::anyhow!("unknown topology {t:?}: loopback, veth or veth-rps"))?,
                );
            }
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
                topologies: tops,
                runs,
                profile,
            })
        }
        Cmd::Cleanup => topology::cleanup(),
        Cmd::Report { out } => {
            let text = std::fs::read_to_string(out.join("latest.json"))?;
            let mut results: results::Results = serde_json::from_str(&text)?;
            report::write(&mut results, &out)
        }
        Cmd::Upstream { listen } => {
            sys::raise_nofile(200_000);
            upstream::run(listen)
        }
        Cmd::Measure {
            target,
            workload,
            rate,
            secs: s,
            tls_certificate,
        } => {
            sys::raise_nofile(200_000);
            let offered = rate.map_or(load::Offered::Max, load::Offered::Rate);
            let tls = tls_certificate.map(|f| tls::Client::from_pem_file(&f)).transpose()?;
            print(run::measure_alone(target, &workload, tls.as_ref(), offered, secs(s)))
        }
    }
}
