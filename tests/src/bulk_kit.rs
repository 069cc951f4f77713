//! Concurrent checksummed bulk echo: the stress that reproduced the kernel relay's duplicated
//! segment (the kernel handing the verdict a partly old skb; `docs/kernel-relay.md`).
//! [`kernel_stream`] runs it through the kernel relay with a tiny in-flight credit, so that the
//! verdict passes bytes to userspace all the time: the path the duplicate followed. The tests run
//! it briefly (`tests/tests/kernel_stream.rs`), the soak for minutes (`cargo xtask soak`).
//!
//! Each connection writes `len` bytes of its own pattern stream in chunks of random size (1 B,
//! 7 B, 1,000 B, 64 KiB, 512 KiB), so that segments of every size meet credit exhaustion, passes
//! and re-grants at every offset; meanwhile it reads the echo and checks every byte; then it
//! half-closes and expects exactly `len` bytes and an EOF. `concurrency` connections run at once,
//! until `connections` were made or `deadline` passed (every loop is bounded by both).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

use crate::hardening_kit::RawEcho;
use crate::relay_kit::{Received, Rng, StreamEnd, pattern, read_pattern};
use crate::{Proxy, client_ip, config, try_upgrade};

/// The relay section of the stress: the kernel relay, with a credit so small that the verdict
/// passes bytes to userspace many times per connection.
pub const TINY_CREDIT: &str = "[relay]\nmode = \"kernel\"\nmax_in_flight_bytes = 65536\nmax_in_flight_skbs = 16\n";

/// What [`kernel_stream`] saw: the clients' view and the proxy's relay totals.
#[derive(Debug)]
pub struct StreamRun {
    pub report: BulkReport,
    pub totals: wsproxy::relay::TotalsSnapshot,
    pub secs: f64,
}

impl StreamRun {
    /// Everything that went wrong, one line each (empty: the run was clean).
    pub fn problems(&self) -> Vec<String> {
        let (r, t) = (&self.report, &self.totals);
        let mut p = Vec::new();
        if r.wrong > 0 {
            p.push(format!("{} streams with a wrong byte", r.wrong));
        }
        if r.failed > 0 {
            p.push(format!("{} connections failed", r.failed));
        }
        if t.ended[1] > 0 {
            p.push(format!("{} connections left the kernel relay", t.ended[1]));
        }
        if t.stream_faults > 0 {
            p.push(format!("{} connections ended with a stream fault", t.stream_faults));
        }
        p
    }
}

/// Runs the stress: 32 connections at once through an in-process proxy on the kernel relay with
/// [`TINY_CREDIT`] to a raw echo upstream, each writing about 8 MB, until `connections` were made
/// or `deadline` passed. `Err`: the kernel relay cannot be loaded here (the reason).
pub async fn kernel_stream(connections: u64, deadline: Duration, seed: u64) -> Result<StreamRun, String> {
    let echo = RawEcho::start().await;
    let proxy = Proxy::try_start(&config(&[echo.addr], &[], TINY_CREDIT)).map_err(|e| format!("{e:#}"))?;
    if !proxy.server.kernel_relay() {
        return Err("the proxy started without the kernel relay".into());
    }
    let run = Bulk {
        concurrency: 32,
        connections,
        len: 8 << 20,
        deadline,
        per_connection: Duration::from_secs(60),
        seed,
    };
    let started = Instant::now();
    let report = bulk_echo(proxy.addr, run).await;
    let secs = started.elapsed().as_secs_f64();
    let totals = proxy.server.totals();
    proxy.stop_within(Duration::from_secs(60)).await;
    Ok(StreamRun { report, totals, secs })
}

/// Chunk sizes a writer picks from.
const CHUNKS: [usize; 5] = [1, 7, 1_000, 64 * 1024, 512 * 1024];
/// First client address used (127.16.x.y, see [`client_ip`]); connections cycle over `ADDRS`.
const FIRST_ADDR: u32 = 0x1_0000;
const ADDRS: u32 = 4_096;

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct Bulk {
    /// Connections open at once.
    pub concurrency: usize,
    /// Most connections in all.
    pub connections: u64,
    /// Bytes each connection writes (each gets a length within +-25 % of it).
    pub len: u64,
    /// No new connection starts after this; running ones must end within `per_connection`.
    pub deadline: Duration,
    /// Longest one connection may take.
    pub per_connection: Duration,
    /// Seed of the sizes and streams (the same seed drives the same run).
    pub seed: u64,
}

/// What a run saw.
#[derive(Debug, Default)]
pub struct BulkReport {
    pub connections: u64,
    pub ok: u64,
    pub bytes_checked: u64,
    /// Streams that came back with a wrong byte, too many bytes or too few before the EOF.
    pub wrong: u64,
    /// Connections that failed otherwise (handshake, reset, timeout).
    pub failed: u64,
    /// The first few problems, described.
    pub notes: Vec<String>,
}

#[derive(Default)]
struct Tally {
    connections: AtomicU64,
    ok: AtomicU64,
    bytes: AtomicU64,
    wrong: AtomicU64,
    failed: AtomicU64,
    notes: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn note(&self, what: String) {
        let mut n = self.notes.lock().unwrap();
        if n.len() < 20 {
            n.push(what);
        }
    }
}

/// Runs the stress against a proxy at `proxy` whose upstream echoes every byte until the FIN.
pub async fn bulk_echo(proxy: SocketAddr, run: Bulk) -> BulkReport {
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..run.concurrency)
        .map(|_| {
            let (tally, next) = (Arc::clone(&tally), Arc::clone(&next));
            tokio::spawn(async move {
                loop {
                    let id = next.fetch_add(1, Relaxed);
                    if id >= run.connections || started.elapsed() >= run.deadline {
                        return;
                    }
                    tally.connections.fetch_add(1, Relaxed);
                    let mut rng = Rng::new(run.seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    let len = rng.range(run.len * 3 / 4, run.len * 5 / 4 + 1);
                    let from = client_ip(FIRST_ADDR + (id % u64::from(ADDRS)) as u32);
                    let one = one(proxy, from, id, len, rng);
                    match tokio::time::timeout(run.per_connection, one).await {
                        Ok(Ok(n)) => {
                            tally.ok.fetch_add(1, Relaxed);
                            tally.bytes.fetch_add(n, Relaxed);
                        }
                        Ok(Err(Problem::Wrong(what))) => {
                            tally.wrong.fetch_add(1, Relaxed);
                            tally.note(format!("connection {id} ({len} bytes): {what}"));
                        }
                        Ok(Err(Problem::Failed(what))) => {
                            tally.failed.fetch_add(1, Relaxed);
                            tally.note(format!("connection {id} ({len} bytes): {what}"));
                        }
                        Err(_) => {
                            tally.failed.fetch_add(1, Relaxed);
                            tally.note(format!(
                                "connection {id} ({len} bytes): not done within {:?}",
                                run.per_connection
                            ));
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("a bulk worker panicked");
    }
    let t = Arc::try_unwrap(tally).unwrap_or_else(|_| unreachable!("every worker has ended"));
    BulkReport {
        connections: t.connections.into_inner(),
        ok: t.ok.into_inner(),
        bytes_checked: t.bytes.into_inner(),
        wrong: t.wrong.into_inner(),
        failed: t.failed.into_inner(),
        notes: t.notes.into_inner().unwrap(),
    }
}

enum Problem {
    /// The echoed stream differs from what was sent.
    Wrong(String),
    /// The connection failed before the stream could be judged.
    Failed(String),
}

/// One connection: handshake, write and check the echo, half-close, expect EOF. `Ok`: the bytes
/// checked.
async fn one(proxy: SocketAddr, from: IpAddr, id: u64, len: u64, mut rng: Rng) -> Result<u64, Problem> {
    let failed = |what: &str, e: std::io::Error| Problem::Failed(format!("{what}: {e}"));
    let socket = TcpSocket::new_v4().map_err(|e| failed("socket", e))?;
    socket.bind(SocketAddr::new(from, 0)).map_err(|e| failed("bind", e))?;
    let mut s = socket.connect(proxy).await.map_err(|e| failed("connect", e))?;
    try_upgrade(&mut s, &format!("/bulk/{id}"))
        .await
        .map_err(Problem::Failed)?;
    let seed = id.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let (mut rd, mut wr) = s.split();
    let write = async {
        let mut sent = 0u64;
        while sent < len {
            let size = CHUNKS[rng.below(CHUNKS.len() as u64) as usize];
            let piece = pattern(seed, sent, size.min((len - sent) as usize));
            wr.write_all(piece).await?;
            sent += piece.len() as u64;
        }
        wr.shutdown().await
    };
    // The limit is above `len`, so that a stream that came back too long says so.
    let (w, r) = tokio::join!(write, read_pattern(&mut rd, seed, len + (1 << 20), None));
    judge(len, &r)?;
    w.map_err(|e| failed("write", e))?;
    Ok(r.len)
}

fn judge(len: u64, r: &Received) -> Result<(), Problem> {
    match &r.end {
        StreamEnd::Eof if r.len == len => Ok(()),
        StreamEnd::Eof if r.len > len => Err(Problem::Wrong(format!("{} bytes too many, then EOF", r.len - len))),
        StreamEnd::Eof => Err(Problem::Wrong(format!("EOF after {} of {len} bytes", r.len))),
        StreamEnd::Mismatch { at, from, bytes } => Err(Problem::Wrong(format!(
            "byte {at} differs: the bytes there belong at {from:?} ({:02x?})",
            &bytes[..bytes.len().min(8)]
        ))),
        StreamEnd::Overflow => Err(Problem::Wrong(format!("more than {} bytes came back", len + (1 << 20)))),
        StreamEnd::Error(k) => Err(Problem::Failed(format!("read failed after {} bytes: {k:?}", r.len))),
        StreamEnd::Stopped => unreachable!("no stop point was set"),
    }
}
