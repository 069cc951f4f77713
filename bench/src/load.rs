//! The load generator: each workload on one thread (a current-thread tokio runtime), bounded in
//! time and count, against a `ws://` target on loopback.
//!
//! Latency is measured per message: the first 8 bytes of every payload are the send time (ns since
//! the generator's start), written just before the message is handed to the socket; the echo's
//! arrival minus that time goes into an HDR histogram. CPU time is taken from `/proc/stat` over the
//! measurement window, so it is the whole machine's (proxy, kernel workers, softirq, generator and
//! upstream), not only the proxy's process.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::task::LocalSet;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::sys::{self, CpuDelta};

pub type Ws = WebSocketStream<TcpStream>;

/// Time a handshake (connect, upgrade) may take before it counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the sending window, time the last echoes get to come back.
const DRAIN: Duration = Duration::from_secs(3);

/// The generator's and upstream's WebSocket settings. `small` buffers keep 10,000 idle
/// connections cheap on the generator's side.
pub fn ws_config(small: bool) -> WebSocketConfig {
    let c = WebSocketConfig::default().max_message_size(Some(64 << 20));
    // tungstenite zero-fills its whole read buffer before every read: a small one keeps that
    // cost (on the generator's and upstream's CPU) low.
    if small {
        c.read_buffer_size(4096).write_buffer_size(0)
    } else {
        c.read_buffer_size(16 * 1024)
    }
}

fn base() -> std::time::Instant {
    static BASE: OnceLock<std::time::Instant> = OnceLock::new();
    *BASE.get_or_init(std::time::Instant::now)
}

fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

/// A payload of `size` bytes (at least 8) that starts with the current time.
fn stamped(size: usize) -> Message {
    let mut buf = vec![0x5a_u8; size.max(8)];
    buf[..8].copy_from_slice(&now_ns().to_le_bytes());
    Message::Binary(Bytes::from(buf))
}

fn latency_of(payload: &[u8]) -> Option<u64> {
    let ts = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    Some(now_ns().saturating_sub(ts).max(1))
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid histogram bounds")
}

pub async fn connect(addr: SocketAddr, path: &str, small: bool) -> Result<Ws> {
    let go = async {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let url = format!("ws://{addr}{path}");
        let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config(small))).await?;
        anyhow::Ok(ws)
    };
    timeout(HANDSHAKE_TIMEOUT, go)
        .await
        .map_err(|_| anyhow!("handshake timed out"))?
}

/// Opens `n` connections, at most `parallel` handshakes at a time.
async fn connect_many(addr: SocketAddr, path: &str, n: usize, parallel: usize, small: bool) -> Result<Vec<Ws>> {
    let path = path.to_owned();
    let results: Vec<Result<Ws>> = futures_util::stream::iter(0..n)
        .map(|_| connect(addr, &path, small))
        .buffer_unordered(parallel)
        .collect()
        .await;
    let mut out = Vec::with_capacity(n);
    for r in results {
        out.push(r?);
    }
    Ok(out)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// One echo through `addr`: proves that a contender relays before it is measured.
pub fn check(addr: SocketAddr) -> Result<()> {
    runtime()?.block_on(async {
        let mut ws = connect(addr, "/echo", false).await?;
        ws.send(Message::binary(b"check".to_vec())).await?;
        let reply = timeout(Duration::from_secs(5), ws.next())
            .await
            .context("no echo within 5 s")?;
        match reply {
            Some(Ok(Message::Binary(b))) if b.as_ref() == b"check" => {}
            other => bail!("unexpected echo: {other:?}"),
        }
        let _ = ws.close(None).await;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// 1. Bulk

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct BulkResult {
    pub bytes: u64,
    pub secs: f64,
    /// Payload megabytes (10^6 bytes) per second, counted by the upstream.
    pub mb_per_s: f64,
    pub cpu: CpuDelta,
}

/// One connection, client to upstream, `size`-byte binary messages for `duration`; the upstream
/// counts what it received, and the time runs until its count comes back.
pub fn bulk(addr: SocketAddr, size: usize, duration: Duration) -> Result<BulkResult> {
    runtime()?.block_on(async {
        let mut ws = connect(addr, "/sink", false).await?;
        let payload = Bytes::from(vec![0xa5_u8; size]);
        let hard = duration + Duration::from_secs(30);
        let work = async {
            let cpu0 = sys::cpu_sample();
            let start = Instant::now();
            let end = start + duration;
            let mut sent: u64 = 0;
            while Instant::now() < end {
                ws.send(Message::Binary(payload.clone())).await?;
                sent += size as u64;
            }
            ws.send(Message::text("END")).await?;
            let count = loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => break t.as_str().parse::<u64>()?,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.into()),
                    None => bail!("upstream closed before its count"),
                }
            };
            let secs = start.elapsed().as_secs_f64();
            let cpu = sys::cpu_sample().since(&cpu0);
            if count != sent {
                bail!("upstream received {count} bytes of {sent}");
            }
            anyhow::Ok(BulkResult {
                bytes: count,
                secs,
                mb_per_s: count as f64 / secs / 1e6,
                cpu,
            })
        };
        let result = timeout(hard, work).await.map_err(|_| anyhow!("bulk run timed out"))??;
        let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
        Ok(result)
    })
}

// ---------------------------------------------------------------------------------------------
// 2. Echo at a fixed rate (open loop) and 3. closed loop

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct EchoResult {
    pub conns: usize,
    pub size: usize,
    /// Target rate, messages per second (all connections together); 0 for the closed loop.
    pub target_rate: f64,
    pub sent: u64,
    pub received: u64,
    pub secs: f64,
    /// Messages per second sent in the window.
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// Largest delay of a send behind its schedule (open loop only), in ms.
    pub max_lag_ms: f64,
    pub cpu: CpuDelta,
    /// Machine CPU per message, in microseconds.
    pub cpu_us_per_msg: f64,
}

/// Open loop: `conns` connections share one schedule of `rate` messages per second in total;
/// message k is due at `k / rate` and goes to connection `k mod conns`, whatever the answers do.
/// The pacer sleeps on a timerfd (tokio's own timer has 1 ms ticks, which would send bursts).
pub fn echo(addr: SocketAddr, conns: usize, size: usize, rate: f64, duration: Duration) -> Result<EchoResult> {
    let size = size.max(8);
    run_local(
        async move {
            let sockets = connect_many(addr, "/echo", conns, 64, false).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let hist = Rc::new(RefCell::new(histogram()));
            let received = Rc::new(RefCell::new(0u64));
            let mut sinks = Vec::with_capacity(conns);
            let mut readers = Vec::with_capacity(conns);
            for ws in sockets {
                let (tx, mut rx) = ws.split();
                sinks.push(tx);
                let (hist, received) = (hist.clone(), received.clone());
                readers.push(tokio::task::spawn_local(async move {
                    while let Some(Ok(msg)) = rx.next().await {
                        if let Message::Binary(b) = msg {
                            if let Some(ns) = latency_of(&b) {
                                let _ = hist.borrow_mut().record(ns);
                            }
                            *received.borrow_mut() += 1;
                        }
                    }
                }));
            }
            let mut pacer = Pacer::new()?;
            let cpu0 = sys::cpu_sample();
            let start = std::time::Instant::now();
            let total = (duration.as_secs_f64() * rate).floor() as u64;
            let due = |k: u64| start + Duration::from_secs_f64(k as f64 / rate);
            let mut sent = 0u64;
            let mut max_lag = Duration::ZERO;
            while sent < total {
                pacer.until(due(sent)).await?;
                let now = std::time::Instant::now();
                max_lag = max_lag.max(now.saturating_duration_since(due(sent)));
                while sent < total && due(sent) <= now {
                    let i = (sent % conns as u64) as usize;
                    sinks[i].send(stamped(size)).await?;
                    sent += 1;
                }
            }
            let window = start.elapsed();
            let cpu = sys::cpu_sample().since(&cpu0);
            // Give the last echoes time to return, then close.
            let drain_end = Instant::now() + DRAIN;
            while *received.borrow() < sent && Instant::now() < drain_end {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            for mut tx in sinks {
                let _ = timeout(Duration::from_millis(100), tx.close()).await;
            }
            for r in readers {
                r.abort();
            }
            let got = *received.borrow();
            let h = hist.borrow();
            let secs = window.as_secs_f64();
            Ok(EchoResult {
                conns,
                size,
                target_rate: rate,
                sent,
                received: got,
                secs,
                rate: sent as f64 / secs,
                p50_us: h.value_at_quantile(0.5) as f64 / 1e3,
                p99_us: h.value_at_quantile(0.99) as f64 / 1e3,
                p999_us: h.value_at_quantile(0.999) as f64 / 1e3,
                max_us: h.max() as f64 / 1e3,
                max_lag_ms: max_lag.as_secs_f64() * 1e3,
                cpu_us_per_msg: per_msg_us(&cpu, sent),
                cpu,
            })
        },
        duration,
    )
}

/// A sleep with microsecond precision: a timerfd on CLOCK_MONOTONIC, awaited through tokio.
struct Pacer {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl Pacer {
    fn new() -> Result<Pacer> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: timerfd_create returns a new fd that we own, or -1.
        let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if raw < 0 {
            bail!("timerfd_create: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a valid fd owned by nobody else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        // SAFETY: the OwnedFd is a valid timerfd that stays open as long as the AsyncFd owns it.
        let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow!("registering the timerfd: {e}"))?;
        Ok(Pacer { fd })
    }

    async fn until(&mut self, t: std::time::Instant) -> Result<()> {
        use std::os::fd::AsRawFd as _;
        let left = t.saturating_duration_since(std::time::Instant::now());
        if left < Duration::from_micros(2) {
            return Ok(());
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(left.subsec_nanos() as i32),
            },
        };
        // SAFETY: a valid timerfd and a valid itimerspec.
        if unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } != 0 {
            bail!("timerfd_settime: {}", std::io::Error::last_os_error());
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 8];
            // SAFETY: reading 8 bytes into an 8-byte buffer.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
            if n == 8 {
                return Ok(());
            }
            guard.clear_ready();
        }
    }
}

fn per_msg_us(cpu: &CpuDelta, msgs: u64) -> f64 {
    if msgs == 0 {
        f64::NAN
    } else {
        cpu.ours() * 1e6 / msgs as f64
    }
}

/// Closed loop: `conns` connections, each with one message in flight: send, wait for the echo, repeat.
pub fn closed_loop(addr: SocketAddr, conns: usize, size: usize, duration: Duration) -> Result<EchoResult> {
    let size = size.max(8);
    run_local(
        async move {
            let sockets = connect_many(addr, "/echo", conns, 64, false).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let hist = Rc::new(RefCell::new(histogram()));
            let cpu0 = sys::cpu_sample();
            let start = Instant::now();
            let end = start + duration;
            let mut tasks = Vec::with_capacity(conns);
            for mut ws in sockets {
                let hist = hist.clone();
                tasks.push(tokio::task::spawn_local(async move {
                    let mut done = 0u64;
                    while Instant::now() < end {
                        if ws.send(stamped(size)).await.is_err() {
                            break;
                        }
                        let reply = loop {
                            match timeout(Duration::from_secs(5), ws.next()).await {
                                Ok(Some(Ok(Message::Binary(b)))) => break Some(b),
                                Ok(Some(Ok(_))) => continue,
                                _ => break None,
                            }
                        };
                        let Some(b) = reply else { break };
                        if let Some(ns) = latency_of(&b) {
                            let _ = hist.borrow_mut().record(ns);
                        }
                        done += 1;
                    }
                    let _ = timeout(Duration::from_millis(200), ws.close(None)).await;
                    done
                }));
            }
            let mut total = 0;
            let mut handles = tasks.into_iter();
            // The window ends for everyone at `end`; CPU is read then, the counts when all stopped.
            sleep_until(end).await;
            let cpu = sys::cpu_sample().since(&cpu0);
            for t in handles.by_ref() {
                total += t.await.unwrap_or(0);
            }
            let secs = start.elapsed().as_secs_f64().max(duration.as_secs_f64());
            let h = hist.borrow();
            Ok(EchoResult {
                conns,
                size,
                target_rate: 0.0,
                sent: total,
                received: total,
                secs,
                rate: total as f64 / secs,
                p50_us: h.value_at_quantile(0.5) as f64 / 1e3,
                p99_us: h.value_at_quantile(0.99) as f64 / 1e3,
                p999_us: h.value_at_quantile(0.999) as f64 / 1e3,
                max_us: h.max() as f64 / 1e3,
                max_lag_ms: 0.0,
                cpu_us_per_msg: per_msg_us(&cpu, total),
                cpu,
            })
        },
        duration,
    )
}

fn run_local<F, T>(fut: F, duration: Duration) -> Result<T>
where
    F: Future<Output = Result<T>> + 'static,
{
    let hard = duration + Duration::from_secs(60);
    let local = LocalSet::new();
    runtime()?.block_on(local.run_until(async move {
        timeout(hard, fut)
            .await
            .map_err(|_| anyhow!("run timed out after {hard:?}"))?
    }))
}

// ---------------------------------------------------------------------------------------------
// 4. Handshakes

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct HandshakeResult {
    pub completed: u64,
    pub errors: u64,
    pub secs: f64,
    pub per_sec: f64,
    pub cpu: CpuDelta,
    pub cpu_us_per_handshake: f64,
    pub first_error: Option<String>,
}

/// `clients` concurrent loops of: connect, upgrade, one 16-byte echo, close (both close frames,
/// then the TCP close), for `duration`.
pub fn handshakes(addr: SocketAddr, clients: usize, duration: Duration) -> Result<HandshakeResult> {
    #[derive(Default)]
    struct Count {
        ok: u64,
        err: u64,
        first_error: Option<String>,
    }
    run_local(
        async move {
            let count = Rc::new(RefCell::new(Count::default()));
            let cpu0 = sys::cpu_sample();
            let start = Instant::now();
            let end = start + duration;
            let mut tasks = Vec::new();
            for _ in 0..clients {
                let count = count.clone();
                tasks.push(tokio::task::spawn_local(async move {
                    while Instant::now() < end {
                        let one = async {
                            let mut ws = connect(addr, "/echo", true).await?;
                            ws.send(Message::binary(vec![7u8; 16])).await?;
                            match ws.next().await {
                                Some(Ok(Message::Binary(b))) if b.len() == 16 => {}
                                other => bail!("bad echo: {other:?}"),
                            }
                            ws.close(None).await?;
                            while let Some(Ok(_)) = ws.next().await {}
                            anyhow::Ok(())
                        };
                        match timeout(Duration::from_secs(10), one).await {
                            Ok(Ok(())) => count.borrow_mut().ok += 1,
                            Ok(Err(e)) => {
                                {
                                    let mut c = count.borrow_mut();
                                    c.err += 1;
                                    c.first_error.get_or_insert_with(|| format!("{e:#}"));
                                }
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            Err(_) => {
                                let mut c = count.borrow_mut();
                                c.err += 1;
                                c.first_error.get_or_insert_with(|| "timed out".into());
                            }
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            let cpu = sys::cpu_sample().since(&cpu0);
            let secs = start.elapsed().as_secs_f64();
            let c = count.borrow();
            Ok(HandshakeResult {
                completed: c.ok,
                errors: c.err,
                secs,
                per_sec: c.ok as f64 / secs,
                cpu_us_per_handshake: per_msg_us(&cpu, c.ok),
                cpu,
                first_error: c.first_error.clone(),
            })
        },
        duration,
    )
}

// ---------------------------------------------------------------------------------------------
// 5. Idle memory

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct IdleResult {
    pub conns: usize,
    /// The proxy's RSS with every connection open (bytes); 0 for direct.
    pub proxy_rss: u64,
    /// Kernel memory (slab, kernel stacks, page tables) with the connections open minus before.
    pub kernel_delta: i64,
}

/// Opens `conns` connections through `addr`, leaves them idle for `settle`, then reads the proxy's
/// RSS and the kernel's memory, and closes them all.
pub fn idle(addr: SocketAddr, conns: usize, settle: Duration, proxy_pid: Option<u32>) -> Result<IdleResult> {
    let rt = runtime()?;
    let hard = settle * 2 + Duration::from_secs(120);
    rt.block_on(async {
        timeout(hard, async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let before = sys::kernel_memory();
            let sockets = connect_many(addr, "/echo", conns, 128, true).await?;
            tokio::time::sleep(settle).await;
            let kernel_delta = sys::kernel_memory() as i64 - before as i64;
            let proxy_rss = match proxy_pid {
                Some(pid) => sys::rss(pid)?,
                None => 0,
            };
            drop(sockets);
            // Let every contender take the closes down before the next measurement.
            tokio::time::sleep(Duration::from_secs(2)).await;
            anyhow::Ok(IdleResult {
                conns,
                proxy_rss,
                kernel_delta,
            })
        })
        .await
        .map_err(|_| anyhow!("idle run timed out"))?
    })
}
