//! The cost of cluster limits (issue 16): handshakes per second through one wsproxy node with
//! `[cluster]` on (a real Redis on loopback; limits high enough that the script does all its
//! work, GCRA and lease, and never refuses) against off, and what it adds to the p99 handshake
//! latency. Runs alternate off and on, so that a drift of the machine touches both alike.
//!
//! One handshake is what the benchmark's `handshakes` workload does: connect, upgrade, one
//! 16-byte echo, a close handshake, the TCP close; `Plan::loops` loops at the maximum, each
//! from the next of 1,024 client addresses (127.77.x.y), so that the store sees many keys.
//! The generator runs on one thread; the proxy, Redis and the echo upstream share the rest of
//! the machine with it. After each run the node's own `wsproxy_cluster_store_seconds{op="admit"}`
//! histogram gives the store's latency as the proxy saw it, under that load.
//!
//! Standalone (`wsproxy-bench-cluster`, `bench/src/bin/`), or from the bench's plan once hooked
//! in (`cluster::run`).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Handshakes in flight at once (loops), by default: enough to saturate the machine.
pub const LOOPS: usize = 16;
/// Client addresses handshakes come from, in turn.
const CLIENTS: u32 = 1024;
/// Any one handshake must be done within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The part of each run not measured.
const WARM_UP: Duration = Duration::from_secs(1);

/// What to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The wsproxy binary (release build).
    pub wsproxy: PathBuf,
    /// Measured seconds per run.
    pub window: Duration,
    /// Runs per mode (off, on, alternating).
    pub runs: usize,
    /// Handshakes in flight at once ([`LOOPS`]; 1 for the latency of an idle machine).
    pub loops: usize,
}

/// One run's figures.
#[derive(Debug, Clone)]
pub struct Run {
    pub cluster: bool,
    pub handshakes: u64,
    pub failed: u64,
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// The proxy's admission calls to the store: count, the upper bound of the bucket holding
    /// their p50 and p99 (ms), and the calls that failed (timeouts included).
    pub store_calls: u64,
    pub store_p50_ms: f64,
    pub store_p99_ms: f64,
    pub store_errors: u64,
}

/// Both modes, `plan.runs` times each, and the summary (Markdown).
pub fn run(plan: &Plan) -> Result<(Vec<Run>, String)> {
    let work = std::env::temp_dir().join(format!("wsproxy-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let redis = Spawned::redis(&work)?;
    let upstream_port = free_port("127.0.0.1")?;
    let upstream: SocketAddr = format!("127.0.0.1:{upstream_port}").parse()?;
    let _echo = Spawned::start(
        Command::new(&plan.wsproxy).args(["echo-server", "--listen", &upstream.to_string()]),
        upstream,
        "echo upstream",
    )?;
    let mut runs = Vec::new();
    for i in 0..plan.runs * 2 {
        let cluster = i % 2 == 1;
        let r = one_run(plan, &work, upstream, cluster.then_some(redis.addr))?;
        eprintln!(
            "cluster bench: run {} cluster={}: {} handshakes ({} failed), {:.0}/s, p50 {:.0} us, p99 {:.0} us; \
             store: {} admissions, p50 <= {} ms, p99 <= {} ms, {} errors",
            i / 2 + 1,
            if cluster { "on" } else { "off" },
            r.handshakes,
            r.failed,
            r.per_second,
            r.p50_us,
            r.p99_us,
            r.store_calls,
            r.store_p50_ms,
            r.store_p99_ms,
            r.store_errors
        );
        runs.push(r);
    }
    let _ = std::fs::remove_dir_all(&work);
    let summary = summary(plan, &runs);
    Ok((runs, summary))
}

fn one_run(plan: &Plan, work: &Path, upstream: SocketAddr, redis: Option<SocketAddr>) -> Result<Run> {
    let port = free_port("127.0.0.1")?;
    let admin_port = free_port("127.0.0.1")?;
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let cluster = match redis {
        Some(r) => format!(
            "[cluster]\nurl = \"redis://{r}/\"\nrequests_per_second = 1000000.0\nburst = 1000000\nmax_connections_per_ip = 1000000\n"
        ),
        None => String::new(),
    };
    let config = format!(
        "[listen]\naddress = \"{listen}\"\ndrain_timeout = \"1s\"\n[admin]\naddress = \"127.0.0.1:{admin_port}\"\n\
         [limits]\nrequests_per_second = 1000000000.0\nburst = 1000000000\nmax_connections_per_ip = 0\n\
         [relay]\nmode = \"userspace\"\n{cluster}[upstreams]\nmain = [{{ address = \"{upstream}\" }}]\n"
    );
    let file = work.join(format!("node-{port}.toml"));
    std::fs::write(&file, config)?;
    let proxy = Spawned::start(
        Command::new(&plan.wsproxy)
            .args(["run", "--config"])
            .arg(&file)
            .env("RUST_LOG", "warn"),
        listen,
        "wsproxy",
    )?;
    let (handshakes, failed, hist, secs) = load(listen, plan.window, plan.loops)?;
    let metrics = http_get(SocketAddr::from(([127, 0, 0, 1], admin_port)), "/metrics")?;
    drop(proxy);
    let (store_calls, store_p50_ms, store_p99_ms, store_errors) = store_figures(&metrics);
    Ok(Run {
        cluster: redis.is_some(),
        handshakes,
        failed,
        per_second: handshakes as f64 / secs,
        p50_us: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1000.0,
        store_calls,
        store_p50_ms,
        store_p99_ms,
        store_errors,
    })
}

/// `loops` loops of handshakes for `window` after the warm-up: (done, failed, latency in ns,
/// measured seconds).
fn load(addr: SocketAddr, window: Duration, loops: usize) -> Result<(u64, u64, Histogram<u64>, f64)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let start = Instant::now();
        let measure_from = start + WARM_UP;
        let end = measure_from + window;
        let mut tasks = Vec::new();
        for worker in 0..loops {
            tasks.push(tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).expect("bounds");
                let (mut done, mut failed) = (0u64, 0u64);
                let mut n = worker as u32;
                while Instant::now() < end {
                    n = n.wrapping_add(loops as u32);
                    let from = IpAddr::V4(Ipv4Addr::from(0x7f4d_0000 + 1 + n % CLIENTS));
                    let t0 = Instant::now();
                    let ok = tokio::time::timeout(HANDSHAKE_TIMEOUT, one_handshake(from, addr))
                        .await
                        .is_ok_and(|r| r.is_ok());
                    if t0 < measure_from {
                        continue;
                    }
                    if ok {
                        done += 1;
                        let _ = hist.record((t0.elapsed().as_nanos() as u64).max(1_000));
                    } else {
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                (done, failed, hist)
            }));
        }
        let mut all = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
        let (mut done, mut failed) = (0, 0);
        for t in tasks {
            let (d, f, h) = t.await?;
            done += d;
            failed += f;
            all.add(h)?;
        }
        let secs = (Instant::now().min(end) - measure_from).as_secs_f64().max(1e-3);
        anyhow::Ok((done, failed, all, secs))
    })
}

/// Connect from `from`, upgrade, echo 16 bytes, close handshake, TCP close.
async fn one_handshake(from: IpAddr, to: SocketAddr) -> Result<()> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let mut s: TcpStream = socket.connect(to).await?;
    s.set_nodelay(true)?;
    let request = format!(
        "GET /echo HTTP/1.1\r\nHost: {to}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let head_end = loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed before the 101");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    if !buf.starts_with(b"HTTP/1.1 101") {
        bail!(
            "{}",
            String::from_utf8_lossy(&buf[..head_end]).lines().next().unwrap_or("")
        );
    }
    // A masked binary frame of 16 bytes (mask 0: the payload as it is), its echo (18 bytes).
    let mut frame = vec![0x82, 0x80 | 16, 0, 0, 0, 0];
    frame.extend_from_slice(&[7u8; 16]);
    s.write_all(&frame).await?;
    let mut got = buf.len() - head_end;
    while got < 18 {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed before the echo");
        }
        got += n;
    }
    // Close 1000, masked; then whatever comes until EOF (the echo server's close).
    s.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]).await?;
    while s.read(&mut chunk).await? > 0 {}
    Ok(())
}

/// From the proxy's exposition: its admission calls to the store (count, p50 and p99 bucket
/// bounds in ms, failed calls).
fn store_figures(metrics: &str) -> (u64, f64, f64, u64) {
    let mut buckets: Vec<(f64, u64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("wsproxy_cluster_store_seconds_bucket{le=\""))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\",op=\"admit\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0, |b| b.1);
    let at = |q: f64| {
        buckets
            .iter()
            .find(|(_, c)| *c as f64 >= q * total as f64)
            .map_or(0.0, |(le, _)| le * 1000.0)
    };
    let errors = metrics
        .lines()
        .filter(|l| l.starts_with("wsproxy_cluster_store_errors_total{op=\"admit\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64;
    (total, at(0.5), at(0.99), errors)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// The Markdown summary: each mode's handshakes/s and p99 (median, min-max), the ratio, the
/// added p99, and the store's latency as the proxy saw it.
pub fn summary(plan: &Plan, runs: &[Run]) -> String {
    let of = |on: bool, f: fn(&Run) -> f64| runs.iter().filter(|r| r.cluster == on).map(f).collect::<Vec<_>>();
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.0}-{hi:.0}")
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Cluster limits, one node, Redis on loopback: {} runs per mode of {:?} (alternating), {} handshake loops from {CLIENTS} client addresses.\n",
        plan.runs, plan.window, plan.loops
    );
    let _ = writeln!(
        out,
        "| cluster | handshakes/s (median, range) | p50 us | p99 us (median, range) | store admit p99 (bucket bound) | store errors |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for on in [false, true] {
        let hs = of(on, |r| r.per_second);
        let p99 = of(on, |r| r.p99_us);
        let _ = writeln!(
            out,
            "| {} | {:.0} ({}) | {:.0} | {:.0} ({}) | {} | {} |",
            if on { "on" } else { "off" },
            median(hs.clone()),
            range(&hs),
            median(of(on, |r| r.p50_us)),
            median(p99.clone()),
            range(&p99),
            if on {
                format!("<= {} ms", median(of(on, |r| r.store_p99_ms)))
            } else {
                "-".into()
            },
            runs.iter()
                .filter(|r| r.cluster == on)
                .map(|r| r.store_errors)
                .sum::<u64>(),
        );
    }
    let ratio = median(of(true, |r| r.per_second)) / median(of(false, |r| r.per_second)).max(1e-9);
    let added = median(of(true, |r| r.p99_us)) - median(of(false, |r| r.p99_us));
    let _ = writeln!(
        out,
        "\nOn/off: {ratio:.2}x handshakes/s (goal: at least 0.8x); added p99 {added:.0} us."
    );
    out
}

/// A child process, killed (and waited for) when dropped.
struct Spawned {
    child: Child,
    addr: SocketAddr,
}

impl Spawned {
    /// Starts `cmd` and waits (10 s at most) until `addr` accepts connections.
    fn start(cmd: &mut Command, addr: SocketAddr, what: &str) -> Result<Spawned> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let mut s = Spawned { child, addr };
        let started = Instant::now();
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            if let Some(status) = s.child.try_wait()? {
                bail!("{what} exited ({status})");
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("{what} did not listen on {addr} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(s)
    }

    fn redis(work: &Path) -> Result<Spawned> {
        let ip = "127.0.0.61";
        let port = free_port(ip)?;
        let dir = work.join("redis");
        std::fs::create_dir_all(&dir)?;
        Self::start(
            Command::new("redis-server")
                .args([
                    "--bind",
                    ip,
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(&dir),
            format!("{ip}:{port}").parse()?,
            "redis-server (Debian's redis-server, installed by `cargo xtask setup`)",
        )
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port(ip: &str) -> Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// A plain HTTP/1.0 GET; the body.
fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}
