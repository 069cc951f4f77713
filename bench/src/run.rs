//! `wsproxy-bench run`: the whole benchmark in one process.
//!
//! The benchmark pins itself (the load generator) and the upstream to CPU 0 and every proxy to
//! CPU 1, starts all contenders once, then runs each workload `runs` times, interleaving the
//! contenders within each run so that other activity on the machine spreads over all of them.
//! Raw results go to `latest.json`, the report to `latest.md`, plots to `*.png`.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::contenders::{self, Contender, Kind, Proc, Setup};
use crate::load::{self, BulkResult, EchoResult, HandshakeResult, IdleResult};
use crate::sys::{self, Machine};

pub const GENERATOR_CPU: usize = 0;
pub const PROXY_CPU: usize = 1;
pub const UPSTREAM_PORT: u16 = 24000;
/// Contender `i` of `Kind::ALL` (other than direct) listens on `BASE_PORT + i`.
pub const BASE_PORT: u16 = 24000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub quick: bool,
    pub runs: usize,
    pub bulk_size: usize,
    pub bulk_secs: f64,
    pub echo_secs: f64,
    /// (connections, message size) of workload 2.
    pub echo_configs: Vec<(usize, usize)>,
    /// The open-loop rate is this fraction of direct's closed-loop rate.
    pub echo_load: f64,
    pub closed_conns: usize,
    pub closed_size: usize,
    pub closed_secs: f64,
    pub handshake_clients: usize,
    pub handshake_secs: f64,
    pub idle_conns: usize,
    pub idle_settle_secs: f64,
    /// Set when RLIMIT_NOFILE (this value) capped the idle connections below the plan.
    #[serde(default)]
    pub idle_limited_by: Option<u64>,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        let echo_configs = vec![
            (1, 128),
            (100, 128),
            (1000, 128),
            (1, 16384),
            (100, 16384),
            (1000, 16384),
        ];
        if quick {
            Plan {
                quick,
                runs: 2,
                bulk_size: 64 * 1024,
                bulk_secs: 1.0,
                echo_secs: 1.0,
                echo_configs,
                echo_load: 0.5,
                closed_conns: 1000,
                closed_size: 128,
                closed_secs: 1.0,
                handshake_clients: 50,
                handshake_secs: 1.0,
                idle_conns: 2000,
                idle_settle_secs: 0.5,
                idle_limited_by: None,
            }
        } else {
            Plan {
                quick,
                runs: 5,
                bulk_size: 64 * 1024,
                bulk_secs: 4.0,
                echo_secs: 3.0,
                echo_configs,
                echo_load: 0.5,
                closed_conns: 1000,
                closed_size: 128,
                closed_secs: 3.0,
                handshake_clients: 50,
                handshake_secs: 3.0,
                idle_conns: 10_000,
                idle_settle_secs: 1.5,
                idle_limited_by: None,
            }
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Versions {
    pub wsproxy: String,
    pub nginx: String,
    pub haproxy: String,
    pub rustc: String,
    pub perf_note: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EchoCell {
    pub conns: usize,
    pub size: usize,
    /// Direct's closed-loop rate (one message in flight per connection), messages per second.
    pub direct_max: f64,
    /// The open-loop rate used for every contender.
    pub rate: f64,
    pub runs: BTreeMap<String, Vec<EchoResult>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleRun {
    pub result: IdleResult,
    pub rss_at_start: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    pub plan: Option<Plan>,
    pub started: String,
    pub machine: Machine,
    pub versions: Versions,
    pub contenders: Vec<String>,
    pub bulk: BTreeMap<String, Vec<BulkResult>>,
    pub echo: Vec<EchoCell>,
    pub closed: BTreeMap<String, Vec<EchoResult>>,
    pub handshakes: BTreeMap<String, Vec<HandshakeResult>>,
    pub idle: BTreeMap<String, Vec<IdleRun>>,
    /// Runs that failed, each with its contender, workload and error.
    pub failures: Vec<String>,
    /// Wall time of each workload, seconds.
    pub timings: BTreeMap<String, f64>,
    /// Wall time of the whole run, seconds.
    pub total_secs: f64,
    /// Workloads re-run on their own (`--merge`), and when.
    #[serde(default)]
    pub reruns: Vec<String>,
}

pub const WORKLOADS: [&str; 5] = ["bulk", "echo", "closed", "handshakes", "idle"];

pub struct Options {
    pub quick: bool,
    pub wsproxy: PathBuf,
    pub out: PathBuf,
    pub only: Vec<String>,
    pub contenders: Vec<Kind>,
    pub runs: Option<usize>,
    /// Keep the other workloads' results from the previous `latest.json`.
    pub merge: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    let t0 = Instant::now();
    let plan = {
        let mut p = Plan::new(opts.quick);
        if let Some(r) = opts.runs {
            p.runs = r;
        }
        p
    };
    watchdog(if opts.quick { 600 } else { 2700 });
    sys::pin_self(GENERATOR_CPU)?;
    let nofile = sys::raise_nofile(200_000);
    // A proxy holds two descriptors per connection; where the hard limit cannot be raised (no
    // CAP_SYS_RESOURCE) the idle workload opens as many connections as fit, in round thousands.
    // nginx starts closing connections that wait for their request once fewer than 1/16 of its
    // connection slots are free, so leave that much room too.
    let fit = (nofile * 15 / 16).saturating_sub(300) as usize / 2 / 1000 * 1000;
    let mut plan = plan;
    if plan.idle_conns > fit {
        println!(
            "bench: RLIMIT_NOFILE is {nofile} (hard limit): idle workload uses {fit} connections instead of {}",
            plan.idle_conns
        );
        plan.idle_conns = fit;
        plan.idle_limited_by = Some(nofile);
    }
    ensure_packages(&opts.contenders)?;
    fs::create_dir_all(&opts.out)?;
    let json_path = opts.out.join("latest.json");
    let mut results = if opts.merge {
        let text = fs::read_to_string(&json_path).with_context(|| format!("--merge needs {}", json_path.display()))?;
        serde_json::from_str(&text).context("parsing the previous latest.json")?
    } else {
        Results::default()
    };
    results.plan = Some(plan.clone());
    let now = sys::command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let previous_timings = results.timings.clone();
    if opts.merge {
        results.reruns.push(format!("{} re-run at {now}", opts.only.join(", ")));
        let load_end = results.machine.loadavg_end.clone();
        results.machine = sys::machine();
        results.machine.loadavg_start = format!("{} (re-run: {})", load_end, results.machine.loadavg_start);
    } else {
        results.started = now;
        results.machine = sys::machine();
    }
    results.versions = versions(&opts.wsproxy);
    results.contenders = opts.contenders.iter().map(|k| k.name().to_owned()).collect();

    let dir = contenders::temp_dir()?;
    let upstream: SocketAddr = ([127, 0, 0, 1], UPSTREAM_PORT).into();
    let self_exe = std::env::current_exe()?;
    let _upstream = Proc::spawn(
        "upstream",
        GENERATOR_CPU,
        &self_exe,
        &["upstream".into(), "--listen".into(), upstream.to_string()],
        &[],
        &dir.join("upstream.log"),
    )?;
    let setup = Setup {
        dir: &dir,
        wsproxy: &opts.wsproxy,
        upstream,
        proxy_cpu: PROXY_CPU,
        nofile,
    };
    let mut cs: Vec<Contender> = Vec::new();
    for kind in &opts.contenders {
        let addr = match kind {
            Kind::Direct => upstream,
            k => {
                let i = Kind::ALL.iter().position(|x| x == k).expect("listed") as u16;
                ([127, 0, 0, 1], BASE_PORT + i).into()
            }
        };
        println!("bench: starting {} on {addr}", kind.name());
        cs.push(contenders::start(*kind, addr, &setup)?);
    }
    println!(
        "bench: {} contenders up; logs and configs in {}",
        cs.len(),
        dir.display()
    );

    let wants = |w: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == w);
    let secs = Duration::from_secs_f64;
    let mut failures = Vec::new();

    if wants("bulk") {
        let t = Instant::now();
        results.bulk.clear();
        each_run(&plan, &mut cs, "bulk", &mut failures, |c| {
            let r = load::bulk(c.addr, plan.bulk_size, secs(plan.bulk_secs))?;
            let line = format!(
                "{:.0} MB/s, {:.2} CPU s/GB (others used {:.2} CPU s)",
                r.mb_per_s,
                r.cpu.ours() / (r.bytes as f64 / 1e9),
                r.cpu.foreign_secs
            );
            results.bulk.entry(c.name().into()).or_default().push(r);
            Ok(line)
        });
        results.timings.insert("bulk".into(), t.elapsed().as_secs_f64());
    }

    if wants("echo") {
        let t = Instant::now();
        results.echo.clear();
        for &(conns, size) in &plan.echo_configs {
            let direct = cs.iter().find(|c| c.kind == Kind::Direct).map_or(upstream, |c| c.addr);
            let max = load::closed_loop(direct, conns, size, secs(plan.echo_secs))
                .with_context(|| format!("calibrating echo {conns}x{size} on direct"))?
                .rate;
            let rate = (max * plan.echo_load).max(10.0);
            println!(
                "bench: echo {conns} conns x {size} B: direct closed-loop {max:.0} msg/s -> open loop at {rate:.0} msg/s"
            );
            let mut cell = EchoCell {
                conns,
                size,
                direct_max: max,
                rate,
                runs: BTreeMap::new(),
            };
            each_run(&plan, &mut cs, &format!("echo {conns}x{size}"), &mut failures, |c| {
                let r = load::echo(c.addr, conns, size, rate, secs(plan.echo_secs))?;
                let line = echo_line(&r);
                cell.runs.entry(c.name().into()).or_default().push(r);
                Ok(line)
            });
            results.echo.push(cell);
        }
        results.timings.insert("echo".into(), t.elapsed().as_secs_f64());
    }

    if wants("closed") {
        let t = Instant::now();
        results.closed.clear();
        each_run(&plan, &mut cs, "closed", &mut failures, |c| {
            let r = load::closed_loop(c.addr, plan.closed_conns, plan.closed_size, secs(plan.closed_secs))?;
            let line = echo_line(&r);
            results.closed.entry(c.name().into()).or_default().push(r);
            Ok(line)
        });
        results.timings.insert("closed".into(), t.elapsed().as_secs_f64());
    }

    if wants("handshakes") {
        let t = Instant::now();
        results.handshakes.clear();
        each_run(&plan, &mut cs, "handshakes", &mut failures, |c| {
            let r = load::handshakes(c.addr, plan.handshake_clients, secs(plan.handshake_secs))?;
            let line = format!(
                "{:.0}/s, {} errors {}",
                r.per_sec,
                r.errors,
                r.first_error.clone().unwrap_or_default()
            );
            results.handshakes.entry(c.name().into()).or_default().push(r);
            Ok(line)
        });
        results.timings.insert("handshakes".into(), t.elapsed().as_secs_f64());
    }

    if wants("idle") {
        let t = Instant::now();
        results.idle.clear();
        each_run(&plan, &mut cs, "idle", &mut failures, |c| {
            let r = load::idle(c.addr, plan.idle_conns, secs(plan.idle_settle_secs), c.pid())?;
            let line = format!(
                "RSS {:.1} MiB (+{:.1} since start), kernel +{:.1} MiB",
                r.proxy_rss as f64 / 1048576.0,
                r.proxy_rss.saturating_sub(c.rss_at_start) as f64 / 1048576.0,
                r.kernel_delta as f64 / 1048576.0
            );
            results.idle.entry(c.name().into()).or_default().push(IdleRun {
                result: r,
                rss_at_start: c.rss_at_start,
            });
            Ok(line)
        });
        results.timings.insert("idle".into(), t.elapsed().as_secs_f64());
    }

    results.machine.loadavg_end = sys::loadavg();
    if opts.merge {
        // The whole run's wall time: the previous run's, with the re-run workloads' new times.
        let replaced: f64 = opts.only.iter().filter_map(|w| previous_timings.get(w)).sum();
        let added: f64 = opts.only.iter().filter_map(|w| results.timings.get(w)).sum();
        results.total_secs = results.total_secs - replaced + added;
    } else {
        results.total_secs = t0.elapsed().as_secs_f64();
    }
    if opts.merge {
        results
            .failures
            .retain(|f| !opts.only.iter().any(|w| f.contains(&format!(" {w}"))));
        results.failures.extend(failures);
    } else {
        results.failures = failures;
    }
    drop(cs);
    fs::write(&json_path, serde_json::to_string_pretty(&results)?)?;
    crate::report::write(&results, &opts.out)?;
    println!(
        "bench: done in {:.0} s; report {}",
        results.total_secs,
        opts.out.join("latest.md").display()
    );
    Ok(())
}

fn echo_line(r: &EchoResult) -> String {
    format!(
        "{:.0} msg/s, p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, {:.1} CPU us/msg, lost {}, lag {:.1} ms",
        r.rate,
        r.p50_us,
        r.p99_us,
        r.p999_us,
        r.cpu_us_per_msg,
        r.sent.saturating_sub(r.received),
        r.max_lag_ms
    )
}

/// Runs `measure` for every contender, `plan.runs` times, contenders interleaved within each run.
/// A failed run is recorded and the benchmark goes on; a contender whose process died fails hard.
fn each_run(
    plan: &Plan,
    cs: &mut [Contender],
    workload: &str,
    failures: &mut Vec<String>,
    mut measure: impl FnMut(&Contender) -> Result<String>,
) {
    for run in 0..plan.runs {
        for c in cs.iter_mut() {
            if let Some(p) = c.proc.as_mut()
                && let Err(e) = p.alive()
            {
                failures.push(format!("{}: {workload}: {e}", c.kind.name()));
                continue;
            }
            match measure(c) {
                Ok(line) => println!(
                    "bench: {workload} run {}/{} {:<18} {line}",
                    run + 1,
                    plan.runs,
                    c.name()
                ),
                Err(e) => {
                    println!(
                        "bench: {workload} run {}/{} {:<18} FAILED: {e:#}",
                        run + 1,
                        plan.runs,
                        c.name()
                    );
                    failures.push(format!("{}: {workload} run {}: {e:#}", c.name(), run + 1));
                }
            }
        }
    }
}

/// Ends the whole process (children die with it) if the benchmark overruns its bound.
fn watchdog(limit_secs: u64) {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(limit_secs));
        eprintln!("bench: still running after {limit_secs} s: giving up");
        std::process::exit(3);
    });
}

/// Installs nginx and HAProxy (Debian packages) and a TrueType font for the plots if missing.
fn ensure_packages(kinds: &[Kind]) -> Result<()> {
    let mut missing = Vec::new();
    let have = |p: &str| {
        std::process::Command::new("which")
            .arg(p)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if kinds.contains(&Kind::Nginx) && !have("nginx") {
        missing.push("nginx-light");
    }
    if kinds.iter().any(|k| matches!(k, Kind::Haproxy | Kind::HaproxySplice)) && !have("haproxy") {
        missing.push("haproxy");
    }
    if !crate::plot::FONT_PATHS.iter().any(|p| Path::new(p).exists()) {
        missing.push("fonts-dejavu-core");
    }
    if missing.is_empty() {
        return Ok(());
    }
    println!("bench: installing {}", missing.join(" "));
    let install = |update: bool| -> Result<bool> {
        if update {
            std::process::Command::new("apt-get").arg("update").status()?;
        }
        let status = std::process::Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?;
        Ok(status.success())
    };
    if !install(false)? && !install(true)? {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

fn versions(wsproxy: &Path) -> Versions {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("."));
    let rev = sys::command_line(
        "git",
        &["-C", &root.display().to_string(), "rev-parse", "--short", "HEAD"],
    );
    let dirty = std::process::Command::new("git")
        .args([
            "-C",
            &root.display().to_string(),
            "status",
            "--porcelain",
            "--untracked-files=no",
        ])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    let ws = sys::command_line(&wsproxy.display().to_string(), &["--version"]);
    Versions {
        wsproxy: format!(
            "{ws} (git {rev}{})",
            if dirty { ", with uncommitted changes" } else { "" }
        ),
        nginx: sys::command_line("nginx", &["-v"]),
        haproxy: sys::command_line("haproxy", &["-v"]),
        rustc: sys::command_line("rustc", &["--version"]),
        perf_note: String::new(),
    }
}
