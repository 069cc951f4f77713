//! Soak driver: `soak [--minutes N] [--concurrency C] [--out FILE]` (`cargo xtask soak`).
//!
//! Runs the proxy in this process (`wsproxy::Server`, so that its relay totals and kernel map
//! entries can be read) in front of a raw echo upstream, first with the kernel relay, then with
//! the userspace relay, half of the time each. In each mode, C workers open connections from
//! changing loopback addresses (127.16.x.y), relay a patterned stream of random length (1 B to
//! 1 MiB) both ways, check every byte that comes back, and close; some connections are reset
//! by the client mid-stream, some by the upstream. After a warm-up the workers pause, and once
//! nothing is relayed the baseline is taken: this process's descriptors, resident memory (after
//! `malloc_trim`, so that memory the allocator keeps for reuse does not count) and the kernel
//! map entries. At the end of the mode the same figures must be back within the tolerances
//! below, every relay closed, and no byte wrong. The summary goes to `bench/results/soak.md`
//! (or FILE); the exit status is 1 when any check failed.
//!
//! Tolerances: descriptors back to the baseline ± 2; resident memory (trimmed) at most 16 MiB
//! above it; kernel map entries and open relays 0; no corrupted byte; no failed connection.
//!
//! Then the kernel relay's byte-stream stress (`wsproxy_tests::bulk_kit`, the long version of
//! `tests/tests/kernel_stream.rs`) runs for `--stream-minutes`: 32 concurrent bulk echoes of
//! about 8 MB each in chunks of random size, with a tiny in-flight credit so that the verdict
//! moves between redirecting and passing all the time. Every echoed byte is checked; a wrong or
//! failed connection, or one that left the kernel relay, fails the soak.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use wsproxy_tests::bulk_kit::{StreamRun, kernel_stream};
use wsproxy_tests::hardening_kit::{RawEcho, fd_count, mib, raise_nofile, vm_rss};
use wsproxy_tests::relay_kit::{Rng, StreamEnd, poll_until, read_pattern, write_pattern};
use wsproxy_tests::{Proxy, client_ip, try_upgrade};

const FD_TOLERANCE: usize = 2;
const RSS_TOLERANCE: u64 = 16 << 20;
/// Any single connection (handshake, transfer, close) must be done within this.
const CONN_LIMIT: Duration = Duration::from_secs(60);
/// Longest stream relayed by one connection.
const MAX_LEN: u64 = 1 << 20;

struct Args {
    minutes: u64,
    stream_minutes: u64,
    concurrency: usize,
    out: PathBuf,
}

fn args() -> Result<Args, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let mut a = Args {
        minutes: 20,
        stream_minutes: 10,
        concurrency: 64,
        out: root.join("bench/results/soak.md"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--minutes" => a.minutes = value()?.parse().map_err(|e| format!("--minutes: {e}"))?,
            "--stream-minutes" => {
                a.stream_minutes = value()?.parse().map_err(|e| format!("--stream-minutes: {e}"))?;
            }
            "--concurrency" => a.concurrency = value()?.parse().map_err(|e| format!("--concurrency: {e}"))?,
            "--out" => a.out = PathBuf::from(value()?),
            "-h" | "--help" => {
                return Err("usage: soak [--minutes N (20)] [--stream-minutes S (10, 0: none)] [--concurrency C (64)] [--out FILE]".into());
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.minutes == 0 || a.concurrency == 0 {
        return Err("--minutes and --concurrency must be at least 1".into());
    }
    Ok(a)
}

// ---- one connection ----

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Stream both ways, FIN, every byte back and an EOF.
    Clean,
    /// The client resets after a part of the stream came back.
    ClientReset,
    /// The upstream resets after its first read; the client must see a correct prefix, then the
    /// end (a reset, or an EOF).
    UpstreamReset,
}

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    clean: AtomicU64,
    client_resets: AtomicU64,
    upstream_resets: AtomicU64,
    bytes_verified: AtomicU64,
    mismatches: AtomicU64,
    failures: AtomicU64,
    /// The first few failure descriptions.
    notes: std::sync::Mutex<Vec<String>>,
}

impl Stats {
    fn fail(&self, what: String) {
        self.failures.fetch_add(1, Relaxed);
        let mut n = self.notes.lock().unwrap();
        if n.len() < 10 {
            n.push(what);
        }
    }
}

async fn connect(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

async fn one(addr: SocketAddr, from: IpAddr, id: u64, kind: Kind, len: u64, stats: &Stats) -> Result<(), String> {
    let mut s = connect(from, addr).await.map_err(|e| format!("connect: {e}"))?;
    let path = match kind {
        Kind::UpstreamReset => format!("/reset/{id}"),
        _ => format!("/soak/{id}"),
    };
    try_upgrade(&mut s, &path).await?;
    let seed = id.wrapping_mul(0x9e37_79b9);
    match kind {
        Kind::Clean => {
            let (mut rd, mut wr) = s.split();
            let write = async {
                write_pattern(&mut wr, seed, len, 64 * 1024).await?;
                wr.shutdown().await
            };
            let (w, r) = tokio::join!(write, read_pattern(&mut rd, seed, len, None));
            stats.bytes_verified.fetch_add(r.len, Relaxed);
            if let StreamEnd::Mismatch { at, .. } = &r.end {
                stats.mismatches.fetch_add(1, Relaxed);
                return Err(format!("byte {at} of {len} differs"));
            }
            w.map_err(|e| format!("write: {e}"))?;
            if r.len != len || r.end != StreamEnd::Eof {
                return Err(format!("clean stream of {len}: got {r:?}"));
            }
            stats.clean.fetch_add(1, Relaxed);
        }
        Kind::ClientReset => {
            let part = (len / 2).max(1);
            {
                let (mut rd, mut wr) = s.split();
                let (w, r) = tokio::join!(
                    write_pattern(&mut wr, seed, part, 64 * 1024),
                    read_pattern(&mut rd, seed, part, Some(part))
                );
                stats.bytes_verified.fetch_add(r.len, Relaxed);
                if let StreamEnd::Mismatch { at, .. } = &r.end {
                    stats.mismatches.fetch_add(1, Relaxed);
                    return Err(format!("byte {at} of {part} differs"));
                }
                w.map_err(|e| format!("write: {e}"))?;
                if r.end != StreamEnd::Stopped {
                    return Err(format!("first half of {len}: got {r:?}"));
                }
            }
            wsproxy_tests::relay_kit::reset(s);
            stats.client_resets.fetch_add(1, Relaxed);
        }
        Kind::UpstreamReset => {
            let (mut rd, mut wr) = s.split();
            // The upstream resets after its first read; writes may fail, that is the point.
            let write = async {
                let _ = write_pattern(&mut wr, seed, len, 64 * 1024).await;
            };
            let ((), r) = tokio::join!(write, read_pattern(&mut rd, seed, len, None));
            stats.bytes_verified.fetch_add(r.len, Relaxed);
            match &r.end {
                StreamEnd::Mismatch { at, .. } => {
                    stats.mismatches.fetch_add(1, Relaxed);
                    return Err(format!("byte {at} differs before the upstream's reset"));
                }
                StreamEnd::Eof | StreamEnd::Error(_) => {}
                _ => return Err(format!("after the upstream's reset: {r:?}")),
            }
            stats.upstream_resets.fetch_add(1, Relaxed);
        }
    }
    Ok(())
}

/// Runs `concurrency` workers until `stop` is set; returns when all have finished their current
/// connection.
async fn workers(addr: SocketAddr, concurrency: usize, stats: Arc<Stats>, next: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let (stats, next, stop) = (Arc::clone(&stats), Arc::clone(&next), Arc::clone(&stop));
        set.spawn(async move {
            let mut rng = Rng::new(w as u64 + 1);
            while !stop.load(Relaxed) {
                let id = next.fetch_add(1, Relaxed);
                let from = client_ip(1 + (id % 50_000) as u32);
                let kind = match rng.below(100) {
                    0..85 => Kind::Clean,
                    85..95 => Kind::ClientReset,
                    _ => Kind::UpstreamReset,
                };
                // Log-uniform length: as many short streams as long ones.
                let scale = 1u64 << rng.below(21);
                let len = (scale + rng.below(scale)).clamp(1, MAX_LEN);
                stats.connections.fetch_add(1, Relaxed);
                match tokio::time::timeout(CONN_LIMIT, one(addr, from, id, kind, len, &stats)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => stats.fail(format!("connection {id} from {from}: {e}")),
                    Err(_) => stats.fail(format!("connection {id} from {from}: not done within {CONN_LIMIT:?}")),
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
}

// ---- the figures ----

#[derive(Clone, Copy, Debug)]
struct Figures {
    fds: usize,
    /// Resident memory after `malloc_trim`.
    rss: u64,
    maps: Option<(usize, usize, usize)>,
    open: [u64; 2],
}

fn trimmed_rss() -> u64 {
    // SAFETY: malloc_trim only returns free memory of the allocator to the system.
    unsafe { libc::malloc_trim(0) };
    vm_rss()
}

/// Waits (bounded) until nothing is relayed, then takes the figures.
async fn settle(server: &wsproxy::Server) -> (Figures, bool) {
    let idle = poll_until(Duration::from_secs(30), || {
        let t = server.totals();
        (t.open == [0, 0] && server.kernel_map_entries().is_none_or(|e| e == (0, 0, 0))).then_some(())
    })
    .await
    .is_some();
    let f = Figures {
        fds: fd_count(),
        rss: trimmed_rss(),
        maps: server.kernel_map_entries(),
        open: server.totals().open,
    };
    (f, idle)
}

struct Sample {
    at: Duration,
    connections: u64,
    rss: u64,
    fds: usize,
    open: [u64; 2],
    maps: Option<(usize, usize, usize)>,
}

struct ModeReport {
    mode: &'static str,
    skipped: Option<String>,
    secs: f64,
    connections: u64,
    clean: u64,
    client_resets: u64,
    upstream_resets: u64,
    bytes_verified: u64,
    mismatches: u64,
    failures: u64,
    notes: Vec<String>,
    totals: Option<wsproxy::relay::TotalsSnapshot>,
    start: Option<Figures>,
    end: Option<Figures>,
    idle_at_end: bool,
    samples: Vec<Sample>,
    problems: Vec<String>,
}

impl ModeReport {
    fn skipped(mode: &'static str, why: String) -> ModeReport {
        ModeReport {
            mode,
            skipped: Some(why),
            secs: 0.0,
            connections: 0,
            clean: 0,
            client_resets: 0,
            upstream_resets: 0,
            bytes_verified: 0,
            mismatches: 0,
            failures: 0,
            notes: vec![],
            totals: None,
            start: None,
            end: None,
            idle_at_end: true,
            samples: vec![],
            problems: vec![],
        }
    }
}

async fn soak_mode(mode: &'static str, run: Duration, concurrency: usize) -> ModeReport {
    let upstream = RawEcho::start().await;
    let text = format!(
        "[listen]\ndrain_timeout = \"5s\"\n\
         [limits]\nrequests_per_second = 1000000.0\nburst = 1000000\nmax_connections_per_ip = 0\n\
         [relay]\nmode = \"{mode}\"\n\
         [upstreams]\nmain = [{{ address = \"{}\" }}]\ntimeout = \"10s\"\n",
        upstream.addr
    );
    let proxy = match Proxy::try_start(&text) {
        Ok(p) => p,
        Err(e) => return ModeReport::skipped(mode, format!("{e:#}")),
    };
    if mode == "kernel" && !proxy.server.kernel_relay() {
        return ModeReport::skipped(mode, "started without the kernel relay".into());
    }
    let server = proxy.server.clone();
    let next = Arc::new(AtomicU64::new(0));

    // Warm-up: a tenth of the time (5 s to 60 s), then the baseline with nothing relayed.
    let warm = (run / 10).clamp(Duration::from_secs(5), Duration::from_secs(60));
    let stop = Arc::new(AtomicBool::new(false));
    let warm_stats = Arc::new(Stats::default());
    let w = tokio::spawn(workers(
        proxy.addr,
        concurrency,
        Arc::clone(&warm_stats),
        Arc::clone(&next),
        Arc::clone(&stop),
    ));
    tokio::time::sleep(warm).await;
    stop.store(true, Relaxed);
    w.await.unwrap();
    let (start, idle_at_start) = settle(&server).await;
    let totals_start = server.totals();

    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let w = tokio::spawn(workers(
        proxy.addr,
        concurrency,
        Arc::clone(&stats),
        Arc::clone(&next),
        Arc::clone(&stop),
    ));
    let mut samples = Vec::new();
    let every = (run / 12).max(Duration::from_secs(5));
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    while began.elapsed() + every <= run {
        tick.tick().await;
        samples.push(Sample {
            at: began.elapsed(),
            connections: stats.connections.load(Relaxed),
            rss: vm_rss(),
            fds: fd_count(),
            open: server.totals().open,
            maps: server.kernel_map_entries(),
        });
    }
    tokio::time::sleep(run.saturating_sub(began.elapsed())).await;
    stop.store(true, Relaxed);
    w.await.unwrap();
    let secs = began.elapsed().as_secs_f64();
    let (end, idle_at_end) = settle(&server).await;
    let totals = server.totals();
    proxy.stop_within(Duration::from_secs(30)).await;
    drop(upstream);

    let mut problems = Vec::new();
    if !idle_at_start {
        problems.push(format!(
            "relays still open after the warm-up: {:?} {:?}",
            start.open, start.maps
        ));
    }
    if !idle_at_end || end.open != [0, 0] {
        problems.push(format!("relays still open at the end: {:?}", end.open));
    }
    if end.maps.is_some_and(|m| m != (0, 0, 0)) || end.maps != start.maps {
        problems.push(format!(
            "kernel map entries {:?} at the end, {:?} at the start",
            end.maps, start.maps
        ));
    }
    if end.fds.abs_diff(start.fds) > FD_TOLERANCE {
        problems.push(format!(
            "descriptors {} at the end, {} at the start",
            end.fds, start.fds
        ));
    }
    if end.rss > start.rss + RSS_TOLERANCE {
        problems.push(format!(
            "RSS {:.1} MiB at the end, {:.1} MiB at the start",
            mib(end.rss),
            mib(start.rss)
        ));
    }
    let s = &stats;
    let (mismatches, failures) = (s.mismatches.load(Relaxed), s.failures.load(Relaxed));
    let warm_failures = warm_stats.failures.load(Relaxed) + warm_stats.mismatches.load(Relaxed);
    if mismatches > 0 || failures > 0 || warm_failures > 0 {
        problems.push(format!(
            "{mismatches} corrupted streams, {failures} failed connections ({warm_failures} in the warm-up)"
        ));
    }
    let ended = totals.ended.iter().sum::<u64>() - totals_start.ended.iter().sum::<u64>();
    let done = s.connections.load(Relaxed);
    if ended != done {
        problems.push(format!("{done} connections relayed, {ended} relay ends counted"));
    }
    let mut notes = s.notes.lock().unwrap().clone();
    notes.extend(warm_stats.notes.lock().unwrap().iter().map(|n| format!("warm-up: {n}")));
    ModeReport {
        mode,
        skipped: None,
        secs,
        connections: done,
        clean: s.clean.load(Relaxed),
        client_resets: s.client_resets.load(Relaxed),
        upstream_resets: s.upstream_resets.load(Relaxed),
        bytes_verified: s.bytes_verified.load(Relaxed),
        mismatches,
        failures,
        notes,
        totals: Some(subtract(totals, totals_start)),
        start: Some(start),
        end: Some(end),
        idle_at_end,
        samples,
        problems,
    }
}

fn subtract(a: wsproxy::relay::TotalsSnapshot, b: wsproxy::relay::TotalsSnapshot) -> wsproxy::relay::TotalsSnapshot {
    let d = |x: [u64; 2], y: [u64; 2]| [x[0] - y[0], x[1] - y[1]];
    wsproxy::relay::TotalsSnapshot {
        open: a.open,
        ended: d(a.ended, b.ended),
        client_to_upstream: d(a.client_to_upstream, b.client_to_upstream),
        upstream_to_client: d(a.upstream_to_client, b.upstream_to_client),
        fallbacks: a.fallbacks - b.fallbacks,
        fallbacks_peer_closed: a.fallbacks_peer_closed - b.fallbacks_peer_closed,
        promotions: a.promotions - b.promotions,
        drain_timeouts: a.drain_timeouts - b.drain_timeouts,
        repeated_cut: a.repeated_cut - b.repeated_cut,
        passed: a.passed - b.passed,
        stream_faults: a.stream_faults - b.stream_faults,
    }
}

fn maps(m: Option<(usize, usize, usize)>) -> String {
    m.map_or("-".into(), |(a, b, c)| format!("{a}/{b}/{c}"))
}

/// The byte-stream stress, or why it did not run.
type StreamResult = Option<Result<StreamRun, String>>;

/// Runs the kernel relay's byte-stream stress for `minutes` (none when 0).
async fn soak_stream(minutes: u64) -> StreamResult {
    if minutes == 0 {
        return None;
    }
    eprintln!("soak: kernel relay byte-stream stress for {minutes} min");
    // The count bound is far beyond what fits in the time: the deadline ends the run.
    let r = kernel_stream(u64::MAX, Duration::from_secs(minutes * 60), 0x50a4).await;
    match &r {
        Ok(run) => eprintln!(
            "soak: byte-stream stress: {} connections, {} problems",
            run.report.connections,
            run.problems().len()
        ),
        Err(why) => eprintln!("soak: byte-stream stress skipped: {why}"),
    }
    Some(r)
}

fn stream_section(o: &mut String, minutes: u64, stream: &StreamResult) {
    let Some(stream) = stream else { return };
    let _ = writeln!(
        o,
        "\n## Kernel relay byte stream\n\n`--stream-minutes {minutes}`: 32 connections at once through the kernel \
         relay with a tiny in-flight credit (64 KiB, 16 skbs), so that the verdict moves between redirecting and \
         passing all the time; each connection writes about 8 MB (±25 %) of its own random stream in chunks of \
         1 B, 7 B, 1,000 B, 64 KiB or 512 KiB, half-closes, and checks every echoed byte and the EOF.\n"
    );
    match stream {
        Err(why) => {
            let _ = writeln!(o, "Skipped: {why}");
        }
        Ok(run) => {
            let (r, t) = (&run.report, &run.totals);
            let _ = writeln!(
                o,
                "| verdict | time | connections | ok | wrong | failed | checked | repeated bytes cut | stream faults | \
                 relay ends (kernel/userspace) |\n|---|---|---|---|---|---|---|---|---|---|"
            );
            let _ = writeln!(
                o,
                "| {} | {:.0} s | {} | {} | {} | {} | {:.1} GB | {} | {} | {} / {} |",
                if run.problems().is_empty() { "pass" } else { "FAIL" },
                run.secs,
                r.connections,
                r.ok,
                r.wrong,
                r.failed,
                r.bytes_checked as f64 / 1e9,
                t.repeated_cut,
                t.stream_faults,
                t.ended[0],
                t.ended[1]
            );
            for n in &r.notes {
                let _ = writeln!(o, "- {n}");
            }
        }
    }
}

fn report(args: &Args, reports: &[ModeReport], stream: &StreamResult, started: &str) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# Soak\n");
    let _ = writeln!(
        o,
        "`cargo xtask soak --minutes {}` (driver: `tests/src/bin/soak.rs`), started {started}; the proxy in-process \
         (`wsproxy::Server`) in front of a raw echo upstream, {} workers per relay mode, half the time per mode. \
         Each connection comes from a changing loopback address (127.16.x.y), relays a patterned stream of 1 B to \
         1 MiB both ways and checks every byte; 85 % close cleanly, 10 % are reset by the client mid-stream, 5 % by \
         the upstream. Figures are of the whole process (proxy, driver and upstream together); resident memory is \
         taken after `malloc_trim(0)`, with nothing relayed, after a warm-up and at the end.\n",
        args.minutes, args.concurrency
    );
    let _ = writeln!(
        o,
        "Tolerances: descriptors ± {FD_TOLERANCE}, resident memory + {} MiB, kernel map entries and open relays 0, \
         no corrupted byte, no failed connection.\n",
        RSS_TOLERANCE >> 20
    );
    let _ = writeln!(
        o,
        "| relay | verdict | time | connections | per s | clean / client reset / upstream reset | verified | \
         corrupted | failed | relay ends (kernel/userspace) | fallbacks | drain timeouts |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in reports {
        if let Some(why) = &r.skipped {
            let _ = writeln!(o, "| {} | skipped: {why} | | | | | | | | | | |", r.mode);
            continue;
        }
        let t = r.totals.unwrap();
        let _ = writeln!(
            o,
            "| {} | {} | {:.0} s | {} | {:.0} | {} / {} / {} | {:.1} GiB | {} | {} | {} / {} | {} | {} |",
            r.mode,
            if r.problems.is_empty() { "pass" } else { "FAIL" },
            r.secs,
            r.connections,
            r.connections as f64 / r.secs,
            r.clean,
            r.client_resets,
            r.upstream_resets,
            r.bytes_verified as f64 / f64::from(1 << 30),
            r.mismatches,
            r.failures,
            t.ended[0],
            t.ended[1],
            t.fallbacks,
            t.drain_timeouts
        );
    }
    let _ = writeln!(
        o,
        "\n| relay | descriptors start → end | RSS (trimmed) start → end | kernel map entries (sockets/index/slots) \
         start → end | open relays at the end |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|");
    for r in reports {
        let (Some(s), Some(e)) = (r.start, r.end) else { continue };
        let _ = writeln!(
            o,
            "| {} | {} → {} | {:.1} → {:.1} MiB ({:+.1}) | {} → {} | {:?}{} |",
            r.mode,
            s.fds,
            e.fds,
            mib(s.rss),
            mib(e.rss),
            (e.rss as f64 - s.rss as f64) / f64::from(1 << 20),
            maps(s.maps),
            maps(e.maps),
            e.open,
            if r.idle_at_end { "" } else { " (not idle)" }
        );
    }
    for r in reports.iter().filter(|r| !r.samples.is_empty()) {
        let _ = writeln!(o, "\n### {} relay: samples while running\n", r.mode);
        let _ = writeln!(
            o,
            "| time | connections | VmRSS (untrimmed) | descriptors | open relays (k/u) | map entries |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|");
        for s in &r.samples {
            let _ = writeln!(
                o,
                "| {:.0} s | {} | {:.1} MiB | {} | {} / {} | {} |",
                s.at.as_secs_f64(),
                s.connections,
                mib(s.rss),
                s.fds,
                s.open[0],
                s.open[1],
                maps(s.maps)
            );
        }
    }
    stream_section(&mut o, args.stream_minutes, stream);
    let mut problems: Vec<String> = reports
        .iter()
        .flat_map(|r| r.problems.iter().map(move |p| format!("{}: {p}", r.mode)))
        .collect();
    if let Some(Ok(run)) = stream {
        problems.extend(run.problems().into_iter().map(|p| format!("byte stream: {p}")));
    }
    let notes: Vec<String> = reports
        .iter()
        .flat_map(|r| r.notes.iter().map(move |p| format!("{}: {p}", r.mode)))
        .collect();
    let _ = writeln!(o, "\n## Verdict\n");
    if problems.is_empty() {
        let _ = writeln!(
            o,
            "Pass: every figure back within its tolerance, no corrupted byte, no failed connection."
        );
    } else {
        for p in &problems {
            let _ = writeln!(o, "- FAIL {p}");
        }
    }
    for n in &notes {
        let _ = writeln!(o, "- note: {n}");
    }
    o
}

fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let nofile = raise_nofile(65_536);
    if (nofile as usize) < 4 * args.concurrency + 256 {
        eprintln!(
            "soak: RLIMIT_NOFILE {nofile} is too low for {} workers",
            args.concurrency
        );
        return std::process::ExitCode::from(2);
    }
    let started = now_utc();
    let half = Duration::from_secs(args.minutes * 60 / 2);
    let mut reports = Vec::new();
    for mode in ["kernel", "userspace"] {
        eprintln!(
            "soak: {mode} relay for {} s, {} workers",
            half.as_secs(),
            args.concurrency
        );
        let r = soak_mode(mode, half, args.concurrency).await;
        if let Some(why) = &r.skipped {
            eprintln!("soak: {mode} relay skipped: {why}");
        } else {
            eprintln!(
                "soak: {mode} relay: {} connections, {} problems",
                r.connections,
                r.problems.len()
            );
        }
        reports.push(r);
    }
    let stream = soak_stream(args.stream_minutes).await;
    let text = report(&args, &reports, &stream, &started);
    if let Some(dir) = args.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&args.out, &text) {
        eprintln!("soak: cannot write {}: {e}", args.out.display());
    }
    print!("{text}");
    eprintln!("soak: summary in {}", args.out.display());
    // Without the kernel relay the soak covers one mode only: a failure under CI.
    let skipped_in_ci = std::env::var("CI").as_deref() == Ok("true")
        && (reports.iter().any(|r| r.skipped.is_some()) || matches!(stream, Some(Err(_))));
    let stream_failed = matches!(&stream, Some(Ok(run)) if !run.problems().is_empty());
    if reports.iter().any(|r| !r.problems.is_empty()) || stream_failed || skipped_in_ci {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
