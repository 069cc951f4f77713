//! `services-scale`: how wsproxy copes with a configuration of many services (1,000 services of 10
//! upstream entries each, from `services`), against the same proxy with one such service.
//!
//! - **Load time**: `wsproxy check-config` on each file, several times, interleaved; the wall
//!   time of the whole command (process start, read, parse, validate, exit).
//! - **Handshake rate**: a proxy of each file runs, both on the proxy CPU; the handshake workload
//!   (connect, upgrade, one echo, close; `clients` loops at the maximum) runs through one, then
//!   the other, in an order that alternates from run to run. Requests to the many services carry
//!   their host names in turn, so that every handshake is routed by its host among all of them.
//! - **Reload under load**: a third proxy, of the many-service file with an admin listener and
//!   info-level logs, carries `conns` connections spread over the host names, each exchanging a
//!   message every `gap_ms` that its echo must match byte for byte. The file is replaced by the
//!   next generation (every service's backups and the upstream timeout change) and the proxy gets
//!   SIGHUP; the reload time runs from the signal to the proxy's log line that the configuration
//!   was reloaded. Every connection must then complete `after_reload` more exchanges, each
//!   started after that line, and close cleanly: a connection that does not is dropped, and any
//!   drop fails the benchmark.
//!
//! Every wait is bounded: handshakes by the workload's own bounds, the reload run by deadlines.

use std::cell::{Cell, RefCell};
use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::LocalSet;

use crate::contenders::{self, Contender, Kind, Proc};
use crate::load::{self, Measure, Offered};
use crate::plan::{SCALE_ID, ScalePlan};
use crate::results::{ConfigLoad, ReloadRun, ScaleHandshakes, ScaleResult};
use crate::services::{self, Spec};
use crate::stats::{Summary, fmt_int, fmt_num};
use crate::sys;
use crate::ws::{self, Event, Frame, OP_BINARY, OP_CLOSE, Parser};

/// The proxies' ports, clear of the contenders' (`run::BASE_PORT` + 0..8) and below the
/// namespaces' ephemeral range.
const ONE_PORT: u16 = 24100;
const MANY_PORT: u16 = 24101;
const RELOAD_PORT: u16 = 24102;
const RELOAD_ADMIN_PORT: u16 = 24112;
/// An exchange (or the close) that takes longer than this fails its connection.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of the reload itself, and of each wait of a reload run.
const RELOAD_LIMIT: Duration = Duration::from_secs(30);
/// How often the proxy's log is read while the reload runs.
const LOG_POLL: Duration = Duration::from_millis(1);
/// Size of each checked message.
pub const PAYLOAD: usize = 64;
/// Connections opened at once.
const OPEN_PARALLEL: usize = 128;
/// A pair of handshake measurements during which other processes used more than this share of
/// the machine is measured again, up to `PAIR_ATTEMPTS` times in all.
pub const DISTURBED: f64 = 0.05;
const PAIR_ATTEMPTS: usize = 4;

/// The share of the machine that processes outside the benchmark used during a measurement.
fn others(m: &Measure) -> f64 {
    m.cpu.foreign_secs / m.cpu.total_secs.max(1e-9)
}

/// Where and with what the measurement runs.
pub struct Setup<'a> {
    pub topology: &'static str,
    pub plan: &'a ScalePlan,
    pub runs: usize,
    pub wsproxy: &'a Path,
    /// The wsproxy contender whose relay mode the proxies run in.
    pub kind: Kind,
    pub dir: &'a Path,
    pub upstream: SocketAddr,
    pub upstream_pid: u32,
    pub proxy_ip: IpAddr,
    pub proxy_cpu: usize,
    pub netns: Option<&'a str>,
}

/// The wsproxy contender to measure with: the default mode (`auto`) if chosen, else the first
/// wsproxy contender chosen; `None` without one.
pub fn contender(chosen: &[Kind]) -> Option<Kind> {
    if chosen.contains(&Kind::WsproxyAuto) {
        return Some(Kind::WsproxyAuto);
    }
    chosen.iter().copied().find(|k| k.wsproxy_mode().is_some())
}

impl Setup<'_> {
    fn spec(&self, services: usize, port: u16, admin: Option<u16>, generation: u32) -> Spec {
        Spec {
            services,
            upstreams_per_service: self.plan.upstreams_per_service,
            listen: (self.proxy_ip, port).into(),
            upstream: self.upstream,
            admin: admin.map(|p| (self.proxy_ip, p).into()),
            mode: self.kind.wsproxy_mode().expect("a wsproxy contender"),
            generation,
        }
    }

    /// Starts wsproxy on `file` as the contenders run, and waits until one echo goes through it
    /// with `host`.
    fn start(&self, name: &str, file: &Path, addr: SocketAddr, host: &str, log_level: &str) -> Result<Proc> {
        let log = self.dir.join(format!("{name}.log"));
        let args = vec!["run".into(), "--config".into(), file.display().to_string()];
        let proc = Proc::spawn(
            name,
            self.proxy_cpu,
            self.wsproxy,
            &args,
            &[("RUST_LOG", log_level)],
            &log,
            self.netns,
        )?;
        let mut c = Contender {
            kind: self.kind,
            addr,
            proc: Some(proc),
            rss_at_start: 0,
            negotiated: None,
        };
        contenders::wait_listening(&mut c, &log)?;
        let proc = c.proc.take().expect("started above");
        block_on(Duration::from_secs(20), async {
            let (mut s, early) = ws::connect_as(addr, Some(host), "/echo", EXCHANGE_TIMEOUT).await?;
            let mut conn = Checked::new(early);
            conn.exchange(&mut s, 0, 0).await
        })
        .with_context(|| format!("{name}: an echo through it for {host} failed (log: {})", log.display()))?;
        Ok(proc)
    }
}

/// The whole measurement in the current topology.
pub fn measure(s: &Setup, failures: &mut Vec<String>) -> Result<ScaleResult> {
    let p = s.plan;
    let t = s.topology;
    let n = p.services;
    let write = |name: &str, spec: &Spec| -> Result<(PathBuf, u64)> {
        let file = s.dir.join(name);
        let text = services::config(spec);
        fs::write(&file, &text).with_context(|| format!("writing {}", file.display()))?;
        Ok((file, text.len() as u64))
    };
    let (one_file, one_bytes) = write("services-1.toml", &s.spec(1, ONE_PORT, None, 0))?;
    let (many_file, many_bytes) = write(&format!("services-{n}.toml"), &s.spec(n, MANY_PORT, None, 0))?;
    let mut out = ScaleResult {
        contender: s.kind.name().to_owned(),
        services: n,
        upstreams_per_service: p.upstreams_per_service,
        load: vec![
            ConfigLoad {
                services: 1,
                upstreams: p.upstreams_per_service,
                bytes: one_bytes,
                secs: Vec::new(),
            },
            ConfigLoad {
                services: n,
                upstreams: n * p.upstreams_per_service,
                bytes: many_bytes,
                secs: Vec::new(),
            },
        ],
        ..ScaleResult::default()
    };

    // Load time: interleaved, the order alternating, so that both see the same machine.
    for i in 0..p.load_runs {
        for k in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
            let file = if k == 0 { &one_file } else { &many_file };
            out.load[k].secs.push(check_config(s.wsproxy, s.proxy_cpu, file)?);
        }
    }
    for l in &out.load {
        let sum = Summary::of(&l.secs).expect("at least one run");
        println!(
            "bench: [{t}] {SCALE_ID} check-config {}, {} upstreams ({} KB): {} ms [{}–{}]",
            services_label(l.services),
            fmt_int(l.upstreams),
            fmt_num(l.bytes as f64 / 1e3),
            fmt_num(sum.median * 1e3),
            fmt_num(sum.min * 1e3),
            fmt_num(sum.max * 1e3)
        );
    }

    // Handshakes side by side.
    let one_addr: SocketAddr = (s.proxy_ip, ONE_PORT).into();
    let many_addr: SocketAddr = (s.proxy_ip, MANY_PORT).into();
    let one_hosts = vec![services::host(0)];
    let many_hosts: Vec<String> = (0..n).map(services::host).collect();
    {
        let one = s.start("wsproxy-services-1", &one_file, one_addr, &one_hosts[0], "warn")?;
        let many = s.start(
            &format!("wsproxy-services-{n}"),
            &many_file,
            many_addr,
            &many_hosts[n - 1],
            "warn",
        )?;
        // Routing by host is in force: a host no service names is refused.
        let unknown = block_on(Duration::from_secs(20), async {
            anyhow::Ok(ws::connect_as(many_addr, Some("unknown.bench"), "/echo", EXCHANGE_TIMEOUT).await)
        })?;
        match unknown {
            Err(e) if format!("{e:#}").contains(" 421") => {}
            other => bail!("a handshake for a host no service names: expected 421, got {other:?}"),
        }
        let window = Duration::from_secs_f64(p.window_secs);
        for run in 0..s.runs {
            let tag = format!("run {}/{}", run + 1, s.runs);
            for attempt in 1..=PAIR_ATTEMPTS {
                let mut got: [Option<Measure>; 2] = [None, None];
                for k in if run % 2 == 0 { [0, 1] } else { [1, 0] } {
                    let (proc, addr, hosts, label) = if k == 0 {
                        (&one, one_addr, &one_hosts, services_label(1))
                    } else {
                        (&many, many_addr, &many_hosts, services_label(n))
                    };
                    sys::set_roles(Some(s.upstream_pid), Some(proc.pid()));
                    match load::handshakes_as(addr, hosts, p.clients, Offered::Max, window) {
                        Ok(m) => {
                            println!(
                                "bench: [{t}] {SCALE_ID} {tag} handshakes, {label:<14} max {} handshake/s ({}), proxy CPU {} us/handshake, {} errors, others {:.0} % of the machine",
                                fmt_num(m.rate),
                                m.busiest(),
                                fmt_num(m.cpu.proxy_secs * 1e6 / m.done.max(1) as f64),
                                m.errors,
                                others(&m) * 100.0
                            );
                            if m.errors > 0 {
                                failures.push(format!(
                                    "{t}: {SCALE_ID}: {tag}: handshakes, {label}: {} errors, first: {}",
                                    m.errors,
                                    m.first_error.clone().unwrap_or_default()
                                ));
                            }
                            got[k] = Some(m);
                        }
                        Err(e) => failures.push(format!("{t}: {SCALE_ID}: {tag}: handshakes, {label}: {e:#}")),
                    }
                }
                let [Some(one), Some(many)] = got else { break };
                // Two proxies measured one after the other are compared only if the rest of the
                // machine left them alike: a pair during which other processes took a share of
                // the machine is measured again (a bounded number of times).
                let disturbed = others(&one).max(others(&many)) > DISTURBED;
                if disturbed && attempt < PAIR_ATTEMPTS {
                    println!(
                        "bench: [{t}] {SCALE_ID} {tag} disturbed (other processes over {:.0} % of the machine): measured again",
                        DISTURBED * 100.0
                    );
                    continue;
                }
                out.handshakes.push(ScaleHandshakes {
                    run,
                    one,
                    many,
                    attempts: attempt,
                    disturbed,
                });
                break;
            }
        }
        sys::set_roles(Some(s.upstream_pid), None);
    }

    // Reload under load, one per run, each to the next generation of the file.
    let reload_file = s.dir.join(format!("services-{n}-reload.toml"));
    fs::write(
        &reload_file,
        services::config(&s.spec(n, RELOAD_PORT, Some(RELOAD_ADMIN_PORT), 0)),
    )?;
    let reload_addr: SocketAddr = (s.proxy_ip, RELOAD_PORT).into();
    let admin: SocketAddr = (s.proxy_ip, RELOAD_ADMIN_PORT).into();
    let name = format!("wsproxy-services-{n}-reload");
    // The reload's log line is at info level; so is a line per connection opened and closed,
    // which this proxy sees few of.
    let proxy = s.start(&name, &reload_file, reload_addr, &many_hosts[0], "info")?;
    let log = s.dir.join(format!("{name}.log"));
    let hosts: Vec<String> = (0..p.conns).map(|k| many_hosts[k % n].clone()).collect();
    for run in 0..s.runs {
        let tag = format!("run {}/{}", run + 1, s.runs);
        fs::write(
            &reload_file,
            services::config(&s.spec(n, RELOAD_PORT, Some(RELOAD_ADMIN_PORT), run as u32 + 1)),
        )?;
        match reload_run(run, reload_addr, &hosts, &proxy, &log, p) {
            Ok(r) => {
                println!(
                    "bench: [{t}] {SCALE_ID} {tag} reload under load: {} ms (SIGHUP to the log line), {} connections, {} exchanges verified, at least {} each after the reload, {} dropped",
                    fmt_num(r.reload_secs * 1e3),
                    fmt_int(r.conns),
                    fmt_int(r.exchanges as usize),
                    r.min_after_reload,
                    r.dropped
                );
                if r.dropped > 0 {
                    println!(
                        "bench: [{t}] {SCALE_ID} {tag} **FAILED**: the reload dropped {} of {} connections; first: {}",
                        r.dropped,
                        r.conns,
                        r.first_error.clone().unwrap_or_default()
                    );
                    failures.push(format!(
                        "{t}: {SCALE_ID}: {tag}: the reload dropped {} of {} connections, first: {}",
                        r.dropped,
                        r.conns,
                        r.first_error.clone().unwrap_or_default()
                    ));
                }
                out.reloads.push(r);
            }
            Err(e) => {
                println!("bench: [{t}] {SCALE_ID} {tag} reload under load FAILED: {e:#}");
                failures.push(format!("{t}: {SCALE_ID}: {tag}: reload under load: {e:#}"));
            }
        }
    }
    // The proxy's own count agrees: every reload succeeded, none was refused.
    if s.runs > 0 {
        let metrics = block_on(Duration::from_secs(20), scrape(admin))?;
        let ok = metric(&metrics, "wsproxy_config_reloads_total{result=\"ok\"}");
        let refused = metric(&metrics, "wsproxy_config_reloads_total{result=\"error\"}");
        if ok != Some(s.runs as f64) || refused.is_some_and(|e| e > 0.0) {
            failures.push(format!(
                "{t}: {SCALE_ID}: the proxy counted {ok:?} reloads and {refused:?} refused in {} reload runs",
                s.runs
            ));
        }
    }
    drop(proxy);
    Ok(out)
}

fn services_label(n: usize) -> String {
    if n == 1 {
        "1 service".into()
    } else {
        format!("{} services", fmt_int(n))
    }
}

/// Wall time of `wsproxy check-config FILE` on the proxy CPU; fails unless the file is valid.
fn check_config(wsproxy: &Path, cpu: usize, file: &Path) -> Result<f64> {
    let start = Instant::now();
    let out = Command::new("taskset")
        .arg("-c")
        .arg(cpu.to_string())
        .arg(wsproxy)
        .arg("check-config")
        .arg(file)
        .output()
        .context("running wsproxy check-config")?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "wsproxy check-config {}: {} {}",
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(secs)
}

fn block_on<T>(limit: Duration, f: impl Future<Output = Result<T>>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    LocalSet::new().block_on(&rt, async {
        tokio::time::timeout(limit, f)
            .await
            .map_err(|_| anyhow!("not done within {limit:?}"))?
    })
}

/// The message `seq` of connection `conn`: its numbers, then bytes that follow from them.
fn payload(conn: usize, seq: u64) -> [u8; PAYLOAD] {
    let mut p = [0u8; PAYLOAD];
    p[..8].copy_from_slice(&(conn as u64).to_le_bytes());
    p[8..16].copy_from_slice(&seq.to_le_bytes());
    // splitmix64
    let mut x = ((conn as u64) << 32) ^ seq;
    for chunk in p[16..].chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes()[..chunk.len()]);
    }
    p
}

/// One connection's side of the checked exchanges.
struct Checked {
    parser: Parser,
    /// Bytes read but not yet parsed (what came with the 101).
    early: Vec<u8>,
    buf: Vec<u8>,
}

impl Checked {
    fn new(early: Vec<u8>) -> Checked {
        Checked {
            parser: Parser::default(),
            early,
            buf: vec![0; 4096],
        }
    }

    /// Reads until a whole frame of opcode `want` has come; returns its payload. A close frame
    /// (unless that is what is wanted) or EOF before it is an error.
    async fn frame(&mut self, s: &mut TcpStream, want: u8) -> Result<Vec<u8>> {
        let mut first = 0u8;
        let mut payload = Vec::new();
        let mut done = None;
        loop {
            let mut data = if self.early.is_empty() {
                let n = s.read(&mut self.buf).await?;
                if n == 0 {
                    bail!("closed by the far end");
                }
                self.buf[..n].to_vec()
            } else {
                std::mem::take(&mut self.early)
            };
            self.parser.feed(&mut data, &mut |e| match e {
                Event::Start { first: f, .. } => {
                    first = f;
                    payload.clear();
                }
                Event::Payload(p) => payload.extend_from_slice(p),
                Event::End => {
                    let op = Event::opcode(first);
                    if done.is_none() && (op == want || op == OP_CLOSE) {
                        done = Some((op, std::mem::take(&mut payload)));
                    }
                }
            })?;
            match done.take() {
                Some((op, p)) if op == want => return Ok(p),
                Some(_) => bail!("a close frame from the far end"),
                None => {}
            }
        }
    }

    /// Sends message `seq` and checks that its echo is the same, byte for byte.
    async fn exchange(&mut self, s: &mut TcpStream, conn: usize, seq: u64) -> Result<()> {
        let sent = payload(conn, seq);
        s.write_all(Frame::new(OP_BINARY, &sent, true).bytes()).await?;
        let echo = self.frame(s, OP_BINARY).await?;
        if echo != sent {
            bail!("message {seq}: the echo differs from what was sent");
        }
        Ok(())
    }

    /// The closing handshake: our close frame, the far end's, then its FIN.
    async fn close(&mut self, s: &mut TcpStream) -> Result<()> {
        s.write_all(Frame::new(OP_CLOSE, &1000u16.to_be_bytes(), true).bytes())
            .await?;
        self.frame(s, OP_CLOSE).await?;
        let mut rest = [0u8; 64];
        while s.read(&mut rest).await? > 0 {}
        Ok(())
    }
}

#[derive(Debug, Clone, Default)]
struct ConnStat {
    done: u64,
    /// Exchanges started after the reload was done.
    after: u64,
    error: Option<String>,
    ended: bool,
}

struct Shared {
    /// The reload is done (its log line was read): exchanges started from now on count as after it.
    reloaded: Cell<bool>,
    /// Connections close at their next turn.
    stop: Cell<bool>,
    conns: RefCell<Vec<ConnStat>>,
    progress: Notify,
}

impl Shared {
    /// Waits until `cond` holds for every connection that has not failed, or `limit` passes;
    /// returns whether it holds.
    async fn every(&self, limit: Duration, cond: impl Fn(&ConnStat) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let progress = self.progress.notified();
            if self.conns.borrow().iter().all(|c| c.error.is_some() || cond(c)) {
                return true;
            }
            if tokio::time::timeout_at(deadline, progress).await.is_err() {
                return false;
            }
        }
    }
}

/// One connection: an exchange every `gap` (the first after `stagger`) until told to stop, then
/// the closing handshake. Any failure ends it and is recorded.
async fn conn_loop(mut s: TcpStream, early: Vec<u8>, k: usize, shared: Rc<Shared>, gap: Duration, stagger: Duration) {
    let mut c = Checked::new(early);
    let mut next = tokio::time::Instant::now() + stagger;
    let mut seq = 0;
    let failed = loop {
        // The pace of the load, not a wait for a condition.
        tokio::time::sleep_until(next).await;
        next += gap;
        if shared.stop.get() {
            break match tokio::time::timeout(EXCHANGE_TIMEOUT, c.close(&mut s)).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("connection {k}: closing: {e:#}")),
                Err(_) => Some(format!("connection {k}: no close within {EXCHANGE_TIMEOUT:?}")),
            };
        }
        let after = shared.reloaded.get();
        match tokio::time::timeout(EXCHANGE_TIMEOUT, c.exchange(&mut s, k, seq)).await {
            Ok(Ok(())) => {
                let mut conns = shared.conns.borrow_mut();
                conns[k].done += 1;
                conns[k].after += u64::from(after);
            }
            Ok(Err(e)) => break Some(format!("connection {k}: {e:#}")),
            Err(_) => {
                break Some(format!(
                    "connection {k}: message {seq}: no echo within {EXCHANGE_TIMEOUT:?}"
                ));
            }
        }
        shared.progress.notify_waiters();
        seq += 1;
    };
    let mut conns = shared.conns.borrow_mut();
    conns[k].error = failed;
    conns[k].ended = true;
    drop(conns);
    shared.progress.notify_waiters();
}

/// Opens the connections, lets them exchange, reloads, lets them exchange again, closes them.
fn reload_run(
    run: usize,
    addr: SocketAddr,
    hosts: &[String],
    proxy: &Proc,
    log: &Path,
    p: &ScalePlan,
) -> Result<ReloadRun> {
    let n = hosts.len();
    let gap = Duration::from_millis(p.gap_ms);
    let shared = Rc::new(Shared {
        reloaded: Cell::new(false),
        stop: Cell::new(false),
        conns: RefCell::new(vec![ConnStat::default(); n]),
        progress: Notify::new(),
    });
    let limit = Duration::from_secs(120) + RELOAD_LIMIT * 4;
    let (reload_secs, poll_secs) = block_on(limit, async {
        let opened: Vec<Result<(TcpStream, Vec<u8>)>> = futures_util::stream::iter(hosts)
            .map(|h| ws::connect_as(addr, Some(h.as_str()), "/echo", EXCHANGE_TIMEOUT))
            .buffered(OPEN_PARALLEL)
            .collect()
            .await;
        let mut tasks = Vec::with_capacity(n);
        for (k, r) in opened.into_iter().enumerate() {
            let (s, early) = r.with_context(|| format!("opening connection {k} for {}", hosts[k]))?;
            // Spread over the first gap, so that the load is even, not in bursts.
            let stagger = gap.mul_f64(k as f64 / n as f64);
            tasks.push(tokio::task::spawn_local(conn_loop(
                s,
                early,
                k,
                shared.clone(),
                gap,
                stagger,
            )));
        }
        if !shared.every(RELOAD_LIMIT, |c| c.done >= 2).await {
            bail!("the connections did not complete 2 exchanges each within {RELOAD_LIMIT:?}");
        }
        let (secs, poll) = sighup_and_wait(proxy, log).await?;
        shared.reloaded.set(true);
        let after = p.after_reload;
        let _ = shared.every(RELOAD_LIMIT, |c| c.after >= after).await;
        shared.stop.set(true);
        // Each ends within its turn and one exchange and the close (`conn_loop`); one that has
        // not by then is counted as dropped.
        let _ = tokio::time::timeout(gap * 2 + EXCHANGE_TIMEOUT * 2, futures_util::future::join_all(tasks)).await;
        Ok((secs, poll))
    })?;
    let conns = shared.conns.borrow();
    let failed = |c: &&ConnStat| c.error.is_some() || !c.ended || c.after < p.after_reload;
    Ok(ReloadRun {
        run,
        conns: n,
        reload_secs,
        poll_secs,
        exchanges: conns.iter().map(|c| c.done).sum(),
        min_after_reload: conns.iter().map(|c| c.after).min().unwrap_or(0),
        dropped: conns.iter().filter(failed).count(),
        first_error: conns.iter().find_map(|c| c.error.clone()).or_else(|| {
            conns
                .iter()
                .position(|c| c.after < p.after_reload)
                .map(|k| format!("connection {k}: {} exchanges after the reload", conns[k].after))
        }),
    })
}

/// Sends SIGHUP and reads the log (every `LOG_POLL`) until the proxy says the configuration
/// was reloaded; returns the time from the signal to the read that found it, and the time
/// since the read before it (the resolution).
async fn sighup_and_wait(proxy: &Proc, log: &Path) -> Result<(f64, f64)> {
    let mut f = fs::File::open(log).with_context(|| format!("opening {}", log.display()))?;
    let mut offset = f.seek(SeekFrom::End(0))?;
    let mut seen = String::new();
    let start = Instant::now();
    // SAFETY: the pid names our own child, which has not been reaped.
    if unsafe { libc::kill(proxy.pid().cast_signed(), libc::SIGHUP) } != 0 {
        bail!("SIGHUP: {}", std::io::Error::last_os_error());
    }
    let mut last_read = start;
    loop {
        let now = Instant::now();
        f.seek(SeekFrom::Start(offset))?;
        let mut more = String::new();
        offset += f.read_to_string(&mut more)? as u64;
        seen.push_str(&more);
        if seen.contains("configuration reloaded") {
            return Ok((
                now.duration_since(start).as_secs_f64(),
                now.duration_since(last_read).as_secs_f64(),
            ));
        }
        if let Some(line) = seen.lines().find(|l| l.contains("reload refused")) {
            bail!("the proxy refused the reload: {line}");
        }
        if now.duration_since(start) > RELOAD_LIMIT {
            bail!("no reload in the log {} within {RELOAD_LIMIT:?}", log.display());
        }
        last_read = now;
        tokio::time::sleep(LOG_POLL).await;
    }
}

/// The admin listener's `/metrics`.
async fn scrape(admin: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect(admin)
        .await
        .context("connecting to the admin listener")?;
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).await?;
    let text = String::from_utf8_lossy(&body).into_owned();
    if !text.starts_with("HTTP/1.1 200") {
        bail!("GET /metrics: {}", text.lines().next().unwrap_or(""));
    }
    Ok(text)
}

/// The value of the series written exactly as `series` in a Prometheus text exposition.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_differ_by_connection_and_message() {
        assert_ne!(payload(1, 0), payload(0, 1));
        assert_ne!(payload(0, 0), payload(0, 1));
        assert_eq!(payload(7, 9), payload(7, 9));
        assert_eq!(u64::from_le_bytes(payload(7, 9)[8..16].try_into().unwrap()), 9);
    }

    #[test]
    fn the_mode_is_auto_when_chosen_else_the_first_wsproxy() {
        assert_eq!(contender(&Kind::ALL), Some(Kind::WsproxyAuto));
        assert_eq!(
            contender(&[Kind::Nginx, Kind::WsproxyUserspace, Kind::WsproxyKernel]),
            Some(Kind::WsproxyUserspace)
        );
        assert_eq!(contender(&[Kind::Direct, Kind::Haproxy]), None);
    }

    #[test]
    fn a_series_is_read_from_the_exposition() {
        let text = "# TYPE wsproxy_config_reloads counter\nwsproxy_config_reloads_total{result=\"ok\"} 3\n\
                    wsproxy_config_reloads_total{result=\"error\"} 0\n";
        assert_eq!(metric(text, "wsproxy_config_reloads_total{result=\"ok\"}"), Some(3.0));
        assert_eq!(
            metric(text, "wsproxy_config_reloads_total{result=\"error\"}"),
            Some(0.0)
        );
        assert_eq!(metric(text, "wsproxy_open_connections"), None);
    }
}
