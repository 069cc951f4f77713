//! `wsproxy-bench run`: the whole benchmark in one process.
//!
//! For each topology (loopback, veth, veth with RPS) the benchmark sets the network up, starts the
//! upstream and every contender in it, and measures each group of workloads: first one calibration
//! run per contender (its maximum rate, which sets the fixed load: a fraction of the lowest
//! maximum, the same for all), then `runs` runs, each measuring every contender's maximum and its
//! behaviour at the fixed load. Contenders are interleaved within a run, in an order that rotates
//! from run to run, so that other activity on the machine spreads over all of them. Then, unless
//! `--only` leaves it out, `services-scale` (`scale`) measures wsproxy alone with a configuration
//! of 1,000 services against one of a single service.
//!
//! The TLS workloads (`tls-*`) come after the plain ones: the plain contenders stop, and each proxy
//! starts again with a TLS listener (`contenders`), with the certificate made at the run's start
//! (`tls`); direct has no TLS form.
//!
//! The load generator is this process's main thread (pinned to CPU 0, with the upstream); every
//! proxy is pinned to CPU 1. Raw results go to `latest.json`, the report to `latest.md`.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::contenders::{self, Contender, Kind, Proc, Setup};
use crate::load::{self, Measure, Offered, Session};
use crate::plan::{Group, Plan, SCALE_ID, Shape, Workload};
use crate::results::{IdleMemory, Results, RunMeasure, TopologyResult, Versions, WorkloadResult};
use crate::stats::fmt_num;
use crate::sys::{self, GENERATOR_CPU, PROXY_CPU};
use crate::tls;
use crate::topology::{self, Net, Topology};

pub const UPSTREAM_PORT: u16 = 24000;
/// Contender `i` of `Kind::ALL` (other than direct) listens on `BASE_PORT + i`, and with TLS on
/// `TLS_BASE_PORT + i` (clear of `scale`'s ports).
pub const BASE_PORT: u16 = 24000;
pub const TLS_BASE_PORT: u16 = 24300;
/// The negotiation every TLS connection must show.
const TLS_SUITE: &str = "TLS13_AES_128_GCM_SHA256";
/// Bound of the whole run: the full plan takes about 45 minutes on a 2-CPU machine (the TLS
/// workloads about 4 minutes per topology of it).
const FULL_LIMIT_SECS: u64 = 3_600;
const QUICK_LIMIT_SECS: u64 = 600;

pub struct Options {
    pub quick: bool,
    pub wsproxy: PathBuf,
    pub out: PathBuf,
    pub only: Vec<String>,
    pub contenders: Vec<Kind>,
    pub topologies: Vec<Topology>,
    pub runs: Option<usize>,
    /// After the measured runs, one more fixed-load measurement per contender and workload under
    /// `perf record -a`, summarised into `out/profiles/`.
    pub profile: bool,
}

pub fn plan(opts: &Options) -> Plan {
    let mut p = Plan::new(opts.quick);
    if let Some(r) = opts.runs {
        p.runs = r;
    }
    if !opts.topologies.is_empty() {
        p.topologies = opts.topologies.clone();
    }
    p.keep(&opts.only);
    p
}

pub fn run(opts: &Options) -> Result<()> {
    let t0 = Instant::now();
    let mut plan = plan(opts);
    topology::cleanup_on_signals()?;
    watchdog(if opts.quick { QUICK_LIMIT_SECS } else { FULL_LIMIT_SECS });
    sys::pin_self(GENERATOR_CPU)?;
    let nofile = sys::raise_nofile(200_000);
    // A proxy holds two descriptors per connection; where the hard limit cannot be raised (no
    // CAP_SYS_RESOURCE) the largest group opens as many connections as fit, in round thousands.
    // nginx starts closing connections that wait for their request once fewer than 1/16 of its
    // connection slots are free, so leave that much room too.
    let fit = (nofile * 15 / 16).saturating_sub(300) as usize / 2 / 1000 * 1000;
    for g in &mut plan.groups {
        if g.conns > fit {
            println!(
                "bench: RLIMIT_NOFILE is {nofile}: a group of {} connections uses {fit}",
                g.conns
            );
            // The titles name the group's size.
            let (was, now) = (crate::stats::fmt_int(g.conns), crate::stats::fmt_int(fit));
            for w in &mut g.workloads {
                w.title = w.title.replace(&was, &now);
            }
            g.conns = fit;
            plan.limited_by_nofile = Some(nofile);
        }
    }
    contenders::ensure_packages(&opts.contenders, opts.profile)?;
    fs::create_dir_all(&opts.out)?;
    let mut results = Results {
        plan: Some(plan.clone()),
        started: sys::command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine: sys::machine(),
        versions: versions(&opts.wsproxy, plan.workloads().any(|w| w.tls)),
        contenders: opts.contenders.iter().map(|k| k.name().to_owned()).collect(),
        ..Results::default()
    };
    let dir = contenders::temp_dir()?;
    // One certificate for the whole run, in its directory.
    let kit = if plan.groups.iter().any(Group::tls) {
        Some(tls::Kit::new(&dir.join("tls-certificate"))?)
    } else {
        None
    };
    for &t in &plan.topologies {
        println!("bench: topology {}: {}", t.name(), t.describe());
        match measure_topology(t, &plan, opts, &dir, kit.as_ref(), nofile, &mut results.failures) {
            Ok(r) => {
                println!("bench: topology {} done in {:.0} s", t.name(), r.secs);
                results.topologies.push(r);
            }
            Err(e) => {
                println!("bench: topology {} FAILED: {e:#}", t.name());
                results.failures.push(format!("{}: {e:#}", t.name()));
            }
        }
    }
    // The contenders' generated configurations and logs: kept only when something failed, for
    // the diagnosis (runs left one directory each in the temp dir before).
    if results.failures.is_empty() {
        let _ = fs::remove_dir_all(&dir);
    } else {
        println!("bench: contender logs kept in {}", dir.display());
    }
    results.machine.loadavg_end = sys::loadavg();
    results.total_secs = t0.elapsed().as_secs_f64();
    if plan.runs == 0 {
        // A calibration (or profiling) pass only: nothing to report, and latest.json stays.
        for f in &results.failures {
            println!("bench: failed: {f}");
        }
        println!(
            "bench: done in {:.0} s (no measured runs, no report)",
            results.total_secs
        );
        return Ok(());
    }
    crate::report::write(&mut results, &opts.out)?;
    println!(
        "bench: done in {:.0} s; report {}",
        results.total_secs,
        opts.out.join("latest.md").display()
    );
    // A reload that drops connections is a defect, not a figure: the run fails.
    let dropped: usize = results
        .topologies
        .iter()
        .filter_map(|t| t.scale.as_ref())
        .flat_map(|s| &s.reloads)
        .map(|r| r.dropped)
        .sum();
    if dropped > 0 {
        bail!("{SCALE_ID}: reloads under load dropped {dropped} connections (see the failures in the report)");
    }
    Ok(())
}

fn measure_topology(
    t: Topology,
    plan: &Plan,
    opts: &Options,
    dir: &Path,
    kit: Option<&tls::Kit>,
    nofile: u64,
    failures: &mut Vec<String>,
) -> Result<TopologyResult> {
    let start = Instant::now();
    let net = Net::up(t)?;
    net.enter_load()?;
    let measured = measure_in(&net, plan, opts, &dir.join(t.name()), kit, nofile, failures);
    // Back to where we were before tearing the namespaces down (`net` drops after this).
    net.leave()?;
    let mut r = measured?;
    r.secs = start.elapsed().as_secs_f64();
    Ok(r)
}

/// Starts `kinds` as `setup` has them, contender `i` of `Kind::ALL` on port `base + i` (direct is
/// the upstream itself); one that does not start is a failure, not the end of the run.
fn start_all(net: &Net, kinds: &[Kind], setup: &Setup, base: u16, failures: &mut Vec<String>) -> Vec<Contender> {
    let t = net.topology();
    let mut cs: Vec<Contender> = Vec::new();
    for kind in kinds {
        let addr: SocketAddr = match kind {
            Kind::Direct => setup.upstream,
            k => {
                let i = Kind::ALL.iter().position(|x| x == k).expect("listed") as u16;
                (net.proxy_ip(), base + i).into()
            }
        };
        match contenders::start(*kind, addr, setup) {
            Ok(c) => cs.push(c),
            Err(e) => {
                println!("bench: [{}] {} did not start: {e:#}", t.name(), kind.name());
                failures.push(format!("{}: {}: start: {e:#}", t.name(), kind.name()));
            }
        }
    }
    println!(
        "bench: [{}] {} contenders up{}; logs in {}",
        t.name(),
        cs.len(),
        if setup.tls.is_some() { " with TLS listeners" } else { "" },
        setup.dir.display()
    );
    cs
}

fn measure_in(
    net: &Net,
    plan: &Plan,
    opts: &Options,
    dir: &Path,
    kit: Option<&tls::Kit>,
    nofile: u64,
    failures: &mut Vec<String>,
) -> Result<TopologyResult> {
    let t = net.topology();
    fs::create_dir_all(dir)?;
    let upstream: SocketAddr = (net.load_ip(), UPSTREAM_PORT).into();
    let self_exe = std::env::current_exe()?;
    let up = Proc::spawn(
        "upstream",
        GENERATOR_CPU,
        &self_exe,
        &["upstream".into(), "--listen".into(), upstream.to_string()],
        &[],
        &dir.join("upstream.log"),
        net.load_ns(),
    )?;
    let setup = Setup {
        dir,
        wsproxy: &opts.wsproxy,
        upstream,
        proxy_cpu: PROXY_CPU,
        nofile,
        netns: net.proxy_ns().map(str::to_owned),
        tls: None,
    };
    // Only the workloads' groups use the contenders (`services-scale` starts its own proxies);
    // the plain ones first, then, with the proxies started again with TLS listeners, the TLS ones.
    let (plain, with_tls): (Vec<&Group>, Vec<&Group>) = plan.groups.iter().partition(|g| !g.tls());
    let mut cs = if plain.is_empty() {
        Vec::new()
    } else {
        start_all(net, &opts.contenders, &setup, BASE_PORT, failures)
    };
    let mut out = TopologyResult {
        topology: t,
        description: t.describe().into(),
        workloads: Vec::new(),
        idle: BTreeMap::new(),
        scale: None,
        tls: BTreeMap::new(),
        secs: 0.0,
    };
    let mut m = Measurer {
        plan,
        topology: t,
        upstream_pid: up.pid(),
        failures,
        group_id: 0,
        profiles: opts.profile.then(|| opts.out.join("profiles")),
        tls: None,
    };
    for g in plain {
        m.group(g, &mut cs, &mut out)?;
    }
    drop(cs);
    if let (false, Some(kit)) = (with_tls.is_empty(), kit) {
        if opts.contenders.contains(&Kind::Direct) {
            println!(
                "bench: [{}] direct: no TLS form (the upstream is plain ws), not in the TLS workloads",
                t.name()
            );
        }
        let tls_dir = dir.join("tls");
        fs::create_dir_all(&tls_dir)?;
        let tls_setup = Setup {
            dir: &tls_dir,
            tls: Some(kit),
            ..setup
        };
        let kinds: Vec<Kind> = opts.contenders.iter().copied().filter(|k| *k != Kind::Direct).collect();
        let mut tcs = start_all(net, &kinds, &tls_setup, TLS_BASE_PORT, m.failures);
        for c in &tcs {
            if let Some(n) = &c.negotiated {
                println!(
                    "bench: [{}] {:<18} TLS: negotiated {} (offering every suite and group: {})",
                    t.name(),
                    c.name(),
                    n.measured,
                    n.preferred
                );
                out.tls.insert(c.name().to_owned(), n.clone());
            }
        }
        m.tls = Some(&kit.client);
        for g in with_tls {
            m.group(g, &mut tcs, &mut out)?;
        }
    }
    if let Some(sp) = &plan.scale {
        match crate::scale::contender(&opts.contenders) {
            None => println!("bench: [{}] {SCALE_ID}: no wsproxy contender chosen: skipped", t.name()),
            Some(kind) => {
                let setup = crate::scale::Setup {
                    topology: t.name(),
                    plan: sp,
                    runs: plan.runs,
                    wsproxy: &opts.wsproxy,
                    kind,
                    dir,
                    upstream,
                    upstream_pid: up.pid(),
                    proxy_ip: net.proxy_ip(),
                    proxy_cpu: PROXY_CPU,
                    netns: net.proxy_ns(),
                };
                match crate::scale::measure(&setup, m.failures) {
                    Ok(r) => out.scale = Some(r),
                    Err(e) => {
                        println!("bench: [{}] {SCALE_ID} FAILED: {e:#}", t.name());
                        m.failures.push(format!("{}: {SCALE_ID}: {e:#}", t.name()));
                    }
                }
            }
        }
    }
    drop(up);
    Ok(out)
}

struct Measurer<'a> {
    plan: &'a Plan,
    topology: Topology,
    upstream_pid: u32,
    failures: &'a mut Vec<String>,
    /// Each session gets its own broadcast group at the upstream, so that connections of an
    /// earlier session still closing never receive (or count against) a later round.
    group_id: u64,
    profiles: Option<PathBuf>,
    /// The generator's TLS client, while the TLS groups run.
    tls: Option<&'a tls::Client>,
}

/// Which pass over the contenders: the calibration (maxima only) or a measured run.
#[derive(Clone, Copy)]
enum Pass {
    Calibrate,
    Run(usize),
    /// The fixed load only, under perf (kept out of the figures).
    Profile,
}

impl Measurer<'_> {
    fn group(&mut self, g: &Group, cs: &mut [Contender], out: &mut TopologyResult) -> Result<()> {
        let first = out.workloads.len();
        for w in &g.workloads {
            out.workloads.push(WorkloadResult {
                id: w.id.clone(),
                ..WorkloadResult::default()
            });
        }
        if !g.workloads.is_empty() {
            for c in cs.iter_mut() {
                self.contender(g, c, Pass::Calibrate, out, first);
            }
            for (w, r) in g.workloads.iter().zip(&mut out.workloads[first..]) {
                let slowest = r
                    .calibration
                    .iter()
                    .filter(|(_, m)| m.rate > 0.0 && m.errors == 0)
                    .min_by(|a, b| a.1.rate.total_cmp(&b.1.rate));
                if let Some((name, m)) = slowest {
                    r.offered = m.rate * self.plan.load_fraction;
                    r.offered_set_by = name.clone();
                    println!(
                        "bench: [{}] {}: slowest maximum {} {}/s ({name}) -> fixed load {} {}/s",
                        self.topology.name(),
                        w.id,
                        fmt_num(m.rate),
                        w.shape.unit(),
                        fmt_num(r.offered),
                        w.shape.unit()
                    );
                }
            }
        }
        for run in 0..self.plan.runs {
            // Rotate the order so that no contender always follows the same one.
            let n = cs.len();
            for i in 0..n {
                let c = &mut cs[(i + run) % n];
                self.contender(g, c, Pass::Run(run), out, first);
            }
        }
        if self.profiles.is_some() {
            for c in cs.iter_mut() {
                self.contender(g, c, Pass::Profile, out, first);
            }
        }
        Ok(())
    }

    fn contender(&mut self, g: &Group, c: &mut Contender, pass: Pass, out: &mut TopologyResult, first: usize) {
        let t = self.topology.name();
        if let Some(p) = c.proc.as_mut()
            && let Err(e) = p.alive()
        {
            self.failures.push(format!("{t}: {}: {e:#}", c.name()));
            return;
        }
        sys::set_roles(Some(self.upstream_pid), c.pid());
        let tag = match pass {
            Pass::Calibrate => "calibration".to_owned(),
            Pass::Run(r) => format!("run {}/{}", r + 1, self.plan.runs),
            Pass::Profile => "profile".to_owned(),
        };
        if g.conns == 0 {
            for (w, r) in g.workloads.iter().zip(&mut out.workloads[first..]) {
                self.workload(w, None, c, pass, r, &tag);
            }
            return;
        }
        let idle_before = match pass {
            Pass::Run(_) if g.idle_memory => {
                wait_quiet(c.pid());
                // The proxy's RSS from its start: allocators keep what earlier, busier sessions
                // used, so RSS right before opening would hide the connections' share.
                let mut before = sys::memory(c.pid());
                before.proxy_rss = c.rss_at_start;
                Some(before)
            }
            _ => None,
        };
        self.group_id += 1;
        let tls = if g.tls() { self.tls } else { None };
        let mut session = match Session::open(c.addr, g.conns, self.group_id, tls) {
            Ok(s) => s,
            Err(e) => {
                println!(
                    "bench: [{t}] {} connections {tag} {:<18} FAILED to open: {e:#}",
                    g.conns,
                    c.name()
                );
                self.failures.push(format!(
                    "{t}: {} connections: {}: {tag}: open: {e:#}",
                    g.conns,
                    c.name()
                ));
                return;
            }
        };
        if let (Some(before), Pass::Run(run)) = (idle_before, pass) {
            std::thread::sleep(Duration::from_secs_f64(self.plan.idle_settle_secs));
            let after = sys::memory(c.pid());
            let per = |a: u64, b: u64| (a as f64 - b as f64) / g.conns as f64;
            println!(
                "bench: [{t}] idle {tag} {:<18} {} connections: RSS +{:.0} B/conn, kernel +{:.0} B/conn, TCP buffers +{:.0} B/conn, eBPF maps {:.1} MiB",
                c.name(),
                g.conns,
                per(after.proxy_rss, before.proxy_rss),
                per(after.kernel, before.kernel),
                per(after.tcp_mem, before.tcp_mem),
                after.bpf_maps as f64 / 1048576.0
            );
            out.idle.entry(c.name().into()).or_default().push(IdleMemory {
                run,
                conns: g.conns,
                before,
                after,
            });
        }
        for (w, r) in g.workloads.iter().zip(&mut out.workloads[first..]) {
            self.workload(w, Some(&mut session), c, pass, r, &tag);
        }
    }

    fn workload(
        &mut self,
        w: &Workload,
        mut session: Option<&mut Session>,
        c: &Contender,
        pass: Pass,
        r: &mut WorkloadResult,
        tag: &str,
    ) {
        let t = self.topology.name();
        let tls = self.tls;
        let mut once = |offered: Offered, secs: f64| -> Result<Measure> {
            measure(
                w,
                c.addr,
                session.as_deref_mut(),
                tls,
                offered,
                Duration::from_secs_f64(secs),
            )
        };
        if let (Pass::Profile, Some(dir)) = (pass, &self.profiles) {
            if r.offered > 0.0 {
                let _ = fs::create_dir_all(dir);
                let file = dir.join(format!("{t}-{}-{}.txt", w.id, c.name()));
                // Sampling covers the window and the drain that follows it.
                let secs = self.plan.fixed_secs + 0.5;
                let profiled = crate::profile::start(&dir.join("perf.data"), secs).and_then(|perf| {
                    let m = once(Offered::Rate(r.offered), self.plan.fixed_secs)?;
                    let title = format!(
                        "{t}, {}, {} at {} {}/s: {}",
                        w.id,
                        c.name(),
                        fmt_num(r.offered),
                        w.shape.unit(),
                        fixed_line(&m, w.shape.unit())
                    );
                    perf.finish(&file, &title)
                });
                match profiled {
                    Ok(()) => println!("bench: [{t}] {} profile {:<18} {}", w.id, c.name(), file.display()),
                    Err(e) => self
                        .failures
                        .push(format!("{t}: {}: {}: profile: {e:#}", w.id, c.name())),
                }
            }
            return;
        }
        let max = once(Offered::Max, self.plan.max_secs);
        let fixed = match pass {
            Pass::Run(_) if r.offered > 0.0 => Some(once(Offered::Rate(r.offered), self.plan.fixed_secs)),
            _ => None,
        };
        let unit = w.shape.unit();
        let mut line = String::new();
        match &max {
            Ok(m) => line += &format!("max {} {unit}/s ({})", fmt_num(m.rate), m.busiest()),
            Err(e) => line += &format!("max FAILED: {e:#}"),
        }
        if let Some(f) = &fixed {
            match f {
                Ok(m) => line += &format!("; fixed {}", fixed_line(m, unit)),
                Err(e) => line += &format!("; fixed FAILED: {e:#}"),
            }
        }
        if let Ok(Measure { tls: Some(seen), .. }) = &max {
            line += &format!("; TLS {}", seen.describe());
            if seen.resumed > 0 {
                line += &format!(
                    ", {:.0} % resumed",
                    seen.resumed as f64 * 100.0 / seen.negotiated.values().sum::<u64>().max(1) as f64
                );
            }
        }
        println!("bench: [{t}] {} {tag} {:<18} {line}", w.id, c.name());
        let mut record = |what: &str, res: Result<Measure>| -> Option<Measure> {
            match res {
                Ok(m) => {
                    // Every TLS connection must have had the pinned suite, or the figures do not
                    // compare like with like.
                    if let Some(seen) = &m.tls
                        && let Some(other) = seen.negotiated.keys().find(|k| !k.contains(TLS_SUITE))
                    {
                        self.failures.push(format!(
                            "{t}: {}: {}: {tag} {what}: a connection negotiated {other}, not {TLS_SUITE}",
                            w.id,
                            c.name()
                        ));
                    }
                    if m.errors > 0 {
                        self.failures.push(format!(
                            "{t}: {}: {}: {tag} {what}: {} errors, first: {}",
                            w.id,
                            c.name(),
                            m.errors,
                            m.first_error.clone().unwrap_or_default()
                        ));
                    }
                    Some(m)
                }
                Err(e) => {
                    self.failures
                        .push(format!("{t}: {}: {}: {tag} {what}: {e:#}", w.id, c.name()));
                    None
                }
            }
        };
        let name = c.name().to_owned();
        match pass {
            Pass::Calibrate => {
                if let Some(m) = record("max", max) {
                    r.calibration.insert(name, m);
                }
            }
            Pass::Profile => {}
            Pass::Run(run) => {
                if let Some(m) = record("max", max) {
                    r.max.entry(name.clone()).or_default().push(RunMeasure { run, m });
                }
                if let Some(m) = fixed.and_then(|f| record("fixed", f)) {
                    r.fixed.entry(name).or_default().push(RunMeasure { run, m });
                }
            }
        }
    }
}

/// One measurement of workload `w` through `addr`, on `session`'s open connections (every
/// workload but the handshakes needs them); the handshakes of a TLS workload with `tls`.
pub fn measure(
    w: &Workload,
    addr: SocketAddr,
    session: Option<&mut Session>,
    tls: Option<&tls::Client>,
    offered: Offered,
    window: Duration,
) -> Result<Measure> {
    match (w.shape, session) {
        (Shape::Handshakes { clients, resume }, _) if w.tls => {
            let Some(t) = tls else {
                anyhow::bail!("{}: a TLS workload needs the run's certificate", w.id)
            };
            // A resuming client starts each measurement from an empty store.
            let client = if resume { t.resuming() } else { t.clone() };
            load::handshakes_with(addr, &[], Some(client), clients, offered, window)
        }
        (Shape::Handshakes { clients, .. }, _) => load::handshakes(addr, clients, offered, window),
        (Shape::Sink { size }, Some(s)) => s.sink(size, offered, window),
        (Shape::Echo { active, size }, Some(s)) => s.echo(active, size, offered, window),
        (Shape::Broadcast { size }, Some(s)) => s.broadcast(size, offered, window),
        (_, None) => anyhow::bail!("{}: needs open connections", w.id),
    }
}

/// `wsproxy-bench measure`: one workload of the full plan against any target, by hand (with its
/// group's connections opened first).
pub fn measure_alone(
    addr: SocketAddr,
    id: &str,
    tls: Option<&tls::Client>,
    offered: Offered,
    window: Duration,
) -> Result<Measure> {
    let plan = Plan::new(false);
    let (g, w) = plan
        .groups
        .iter()
        .find_map(|g| g.workloads.iter().find(|w| w.id == id).map(|w| (g, w)))
        .ok_or_else(|| {
            // `idle` and `services-scale` are parts of `run` only.
            let ids: Vec<&str> = plan.workloads().map(|w| w.id.as_str()).collect();
            anyhow::anyhow!("unknown workload {id:?}: one of {ids:?}")
        })?;
    let tls = match (w.tls, tls) {
        // The generator trusts only the certificate it is given.
        (true, None) => bail!("{id}: a TLS workload needs --tls-certificate (the target's certificate)"),
        (true, Some(t)) => Some(t),
        (false, _) => None,
    };
    let mut session = (g.conns > 0)
        .then(|| Session::open(addr, g.conns, 1, tls))
        .transpose()?;
    measure(w, addr, session.as_mut(), tls, offered, window)
}

fn fixed_line(m: &Measure, unit: &str) -> String {
    let lat = m.latency.as_ref().map_or_else(String::new, |l| {
        format!(", p50 {:.0} p99 {:.0} p99.9 {:.0} us", l.p50_us, l.p99_us, l.p999_us)
    });
    let per = if m.done > 0 {
        m.cpu.ours() * 1e6 / m.done as f64
    } else {
        f64::NAN
    };
    // And the busiest CPU: a p99 is read against the idle time the fixed load left there (the
    // kernel relay's work runs on the sender's CPU, the generator's, without receive steering).
    format!(
        "{} of {} {unit}/s{lat}, {} CPU us/{unit} (proxy {}, kernel {}), lost {}, lag {:.1} ms, {}",
        fmt_num(m.rate),
        fmt_num(m.offered),
        fmt_num(per),
        fmt_num(m.cpu.proxy_secs * 1e6 / m.done.max(1) as f64),
        fmt_num(m.cpu.kernel_secs * 1e6 / m.done.max(1) as f64),
        m.lost,
        m.max_lag_ms,
        m.busiest()
    )
}

/// Waits (up to 5 s) until the sockets of earlier sessions are gone from the proxy's network
/// namespace, so that idle memory is measured from a quiet start.
fn wait_quiet(proxy: Option<u32>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = sys::memory(proxy).tcp_inuse;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let now = sys::memory(proxy).tcp_inuse;
        if now == last && now < 200 {
            return;
        }
        last = now;
    }
}

/// Ends the whole process (children die with it) if the benchmark overruns its bound.
fn watchdog(limit_secs: u64) {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(limit_secs));
        eprintln!("bench: still running after {limit_secs} s: giving up");
        let _ = topology::cleanup();
        std::process::exit(3);
    });
}

fn versions(wsproxy: &Path, tls: bool) -> Versions {
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
            "--",
            ".",
            // The results a run replaces are no change to what is measured.
            ":!bench/results",
        ])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    let ws = sys::command_line(&wsproxy.display().to_string(), &["--version"]);
    Versions {
        wsproxy: format!(
            "{ws} (git {rev}{})",
            if dirty { ", with uncommitted changes" } else { "" }
        ),
        nginx: contenders::version(Kind::Nginx),
        haproxy: contenders::version(Kind::Haproxy),
        caddy: contenders::version(Kind::Caddy),
        rustc: sys::command_line("rustc", &["--version"]),
        tls: if tls { tls_libraries() } else { String::new() },
    }
}

/// Each proxy's TLS library, as the proxies report them.
fn tls_libraries() -> String {
    let or = |o: Option<String>| o.unwrap_or_else(|| "unknown".into());
    format!(
        "wsproxy and the generator: rustls 0.23 with *ring*; nginx: {}; HAProxy: {}; Caddy: Go's crypto/tls, {}",
        or(sys::command_find("nginx", &["-V"], "built with")),
        or(sys::command_find("haproxy", &["-vv"], "Running on OpenSSL")),
        or(sys::command_find("caddy", &["build-info"], "go1")).replace('\t', " ")
    )
}

/// Lets a caller check that a plan's workload ids exist (for `--only`).
pub fn known_ids(quick: bool) -> Vec<String> {
    Plan::new(quick).ids()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_narrow_the_plan() {
        let opts = Options {
            quick: true,
            wsproxy: PathBuf::new(),
            out: PathBuf::new(),
            only: vec!["bulk".into()],
            contenders: vec![],
            topologies: vec![Topology::Veth],
            runs: Some(3),
            profile: false,
        };
        let p = plan(&opts);
        assert_eq!(p.runs, 3);
        assert_eq!(p.topologies, vec![Topology::Veth]);
        assert_eq!(p.workloads().map(|w| w.id.as_str()).collect::<Vec<_>>(), vec!["bulk"]);
    }
}
