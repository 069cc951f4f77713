//! The kernel relay: the pair of sockets is put under the sockmap verdict, which redirects each
//! side's received bytes to the other side's egress without copying them through userspace.
//!
//! What the kernel does not do, this module does (see `docs/kernel-relay.md`):
//! - It bounds the bytes in flight per direction. The verdict redirects only within a credit of
//!   bytes and skbs; past it, it passes the bytes to this socket's receive queue, which holds the
//!   sender back by its own TCP window. A pass wakes this module, which waits until the
//!   destination's TCP has taken every redirected byte, forwards the passed bytes itself (in
//!   order: the verdict redirects nothing while a passed byte is not yet forwarded), and grants
//!   new credit.
//! - It relays FIN. At EOF on one side it waits, bounded by the drain timeout, until the other
//!   side's TCP has taken every byte from this side, then shuts that side down for writing.
//!   Closing earlier loses the bytes still queued in the kernel.
//! - It tears both sides down at once on a reset or error, and always takes the pair out of the
//!   maps before the sockets close.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use proxy_common::SockCtrl;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{End, Mode, Outcome, reset_on_close, until_end_or_idle};
use crate::config;
use crate::ebpf::{KernelPrograms, PairGuard, Side};

/// Userspace's buffer for passed bytes; allocated only while passed bytes are being forwarded.
const BUF_SIZE: usize = 64 * 1024;
/// Polling bounds while waiting for a destination to take queued bytes: no event reports that.
const POLL_MIN: Duration = Duration::from_micros(50);
const POLL_MAX: Duration = Duration::from_millis(20);
/// Checks made without a timer before the polling above starts.
const SPIN_ROUNDS: u32 = 32;

/// `TCP_CLOSE` of the kernel's TCP state machine (include/net/tcp_states.h), as in `tcpi_state`.
const TCP_CLOSE: u8 = 7;

/// Why a direction stopped early.
#[derive(Debug)]
enum Failed {
    /// Reading from the source, or the source's connection failed.
    Source(io::ErrorKind),
    /// Writing to the destination, or the destination's connection failed.
    Destination(io::ErrorKind),
    /// The destination did not take the bytes within the drain timeout.
    DrainTimeout,
    /// A map operation failed.
    Maps,
    /// The verdict met bytes it could not put in order; they must not be forwarded.
    Stream,
}

/// Relays `client` <-> `upstream` in the kernel. If the pair cannot be put under the verdict,
/// the sockets come back with the reason, for the userspace relay to carry.
pub async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    programs: &KernelPrograms,
    cfg: &config::Relay,
    shutdown: &CancellationToken,
) -> Result<Outcome, Declined> {
    let started = Instant::now();
    let (c2u, u2c) = (AtomicU64::new(0), AtomicU64::new(0));
    match settle(&client, &upstream, &c2u, &u2c).await {
        Ok(true) => {}
        Ok(false) => return Err(Declined::new(client, upstream, PeerClosed.into(), &c2u, &u2c)),
        // A side failed (a reset): the connection ends here. Handing it to the userspace relay
        // would be wrong: the read that failed has taken the socket's pending error, so that
        // relay would read a plain EOF and pass a FIN on instead of the reset.
        Err(end) => {
            reset_on_close(&client);
            reset_on_close(&upstream);
            return Ok(Outcome {
                mode: Mode::Kernel,
                end,
                client_to_upstream: c2u.into_inner(),
                upstream_to_client: u2c.into_inner(),
                repeated_cut: 0,
                passed: 0,
                duration: started.elapsed(),
            });
        }
    }
    // Everything userspace wrote so far (the 101, the request, settled bytes) is in the send
    // queues now; the destinations' "taken" counts start from here.
    let bases = match (taken(&client), taken(&upstream)) {
        (Ok(c), Ok(u)) => [c, u],
        (Err(e), _) | (_, Err(e)) => return Err(Declined::new(client, upstream, e.into(), &c2u, &u2c)),
    };
    let credit = window(cfg, 0);
    let pair = match programs.insert_pair(&client, &upstream, credit) {
        Ok(p) => p,
        Err(_) if fin_received(&client) || fin_received(&upstream) => {
            return Err(Declined::new(client, upstream, PeerClosed.into(), &c2u, &u2c));
        }
        Err(e) => return Err(Declined::new(client, upstream, e, &c2u, &u2c)),
    };
    // Set once this relay has shut a socket down for writing (index: the socket's side).
    let shut = [AtomicBool::new(false), AtomicBool::new(false)];
    let end = {
        let up = Direction::new([&client, &upstream], Side::Client, bases[1], &pair, cfg, &shut);
        let down = Direction::new([&upstream, &client], Side::Upstream, bases[0], &pair, cfg, &shut);
        // Activity: bytes the verdict moved plus bytes userspace forwarded.
        let activity = || {
            let k = pair.counters().unwrap_or_default();
            k.from_client.redirected + k.from_upstream.redirected + c2u.load(Relaxed) + u2c.load(Relaxed)
        };
        let both = async {
            tokio::try_join!(
                side_of(up.run(&c2u), Side::Client),
                side_of(down.run(&u2c), Side::Upstream)
            )
            .map(|_| ())
        };
        let both = super::stall::or_stalled(both, &client, &upstream, cfg.send_timeout);
        until_end_or_idle(both, cfg.idle_timeout, shutdown, activity)
            .await
            .err()
            .unwrap_or(End::Closed)
    };
    let (c2u, u2c) = (c2u.into_inner(), u2c.into_inner());
    // Out of the maps before the sockets close: no verdict may redirect into a closing socket.
    let counters = pair.remove().unwrap_or_default();
    if end != End::Closed {
        reset_on_close(&client);
        reset_on_close(&upstream);
    }
    Ok(Outcome {
        mode: Mode::Kernel,
        end,
        client_to_upstream: counters.from_client.redirected + c2u,
        upstream_to_client: counters.from_upstream.redirected + u2c,
        repeated_cut: counters.from_client.repeated + counters.from_upstream.repeated,
        passed: c2u + u2c,
        duration: started.elapsed(),
    })
}

/// A connection the kernel relay did not take: the sockets, untouched but for the bytes
/// [`settle`] already moved (counted here), for the userspace relay to carry on.
pub struct Declined {
    pub client: TcpStream,
    pub upstream: TcpStream,
    pub reason: anyhow::Error,
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

impl Declined {
    fn new(client: TcpStream, upstream: TcpStream, reason: anyhow::Error, c2u: &AtomicU64, u2c: &AtomicU64) -> Self {
        let (client_to_upstream, upstream_to_client) = (c2u.load(Relaxed), u2c.load(Relaxed));
        Declined {
            client,
            upstream,
            reason,
            client_to_upstream,
            upstream_to_client,
        }
    }
}

/// A side closed before the pair could be put under the verdict (the socket map takes only
/// established sockets); the userspace relay carries such a connection to its end.
#[derive(Debug, thiserror::Error)]
#[error("a side closed before the kernel relay could take the connection")]
pub struct PeerClosed;

/// Reads what both sockets have queued, writing it to the other side. The verdict path takes
/// whole skbs from a receive queue (`tcp_read_skb`), so an skb that userspace has read in part
/// (the handshake reads in chunks) would be relayed again from its start. A read shorter than
/// the buffer emptied the queue, so no skb is left in part; bytes that arrive after it come in
/// whole skbs, which the kick after insertion relays. `Ok(false)`: a side reached EOF; `Err`:
/// a side failed, as the end of the connection.
async fn settle(client: &TcpStream, upstream: &TcpStream, c2u: &AtomicU64, u2c: &AtomicU64) -> Result<bool, End> {
    let mut buf = vec![0; BUF_SIZE];
    let on = |side: Side, e: io::Error| failed_on(side, e.kind());
    for (src, dst, count, from) in [
        (client, upstream, c2u, Side::Client),
        (upstream, client, u2c, Side::Upstream),
    ] {
        loop {
            match src.try_read(&mut buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    write_all(dst, &buf[..n]).await.map_err(|e| on(from.other(), e))?;
                    count.fetch_add(n as u64, Relaxed);
                    if n < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(on(from, e)),
            }
        }
    }
    Ok(true)
}

async fn write_all(dst: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        dst.writable().await?;
        match dst.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How the connection ends when `side`'s socket failed.
fn failed_on(side: Side, kind: io::ErrorKind) -> End {
    match side {
        Side::Client => End::ClientError(kind),
        Side::Upstream => End::UpstreamError(kind),
    }
}

/// Maps a direction's failure onto the side that caused it.
async fn side_of(run: impl Future<Output = Result<(), Failed>>, from: Side) -> Result<(), End> {
    run.await.map_err(|f| match f {
        Failed::Source(k) => failed_on(from, k),
        Failed::Destination(k) => failed_on(from.other(), k),
        Failed::DrainTimeout => End::DrainTimeout,
        Failed::Maps => End::Internal,
        Failed::Stream => End::StreamFault,
    })
}

/// One direction: bytes that arrive on `src` and leave on `dst`.
struct Direction<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    /// The side `src` is on.
    side: Side,
    /// `taken(dst)` when the pair was inserted.
    dst_base: u64,
    pair: &'a PairGuard,
    cfg: &'a config::Relay,
    /// When `src`'s peer was first seen to have sent its FIN: the drain timeout runs from there.
    fin_seen: OnceLock<Instant>,
    /// Per side: this relay has shut that socket down for writing.
    shut: &'a [AtomicBool; 2],
}

impl<'a> Direction<'a> {
    /// `[src, dst]`: bytes arrive on the first and leave on the second.
    fn new(
        [src, dst]: [&'a TcpStream; 2],
        side: Side,
        dst_base: u64,
        pair: &'a PairGuard,
        cfg: &'a config::Relay,
        shut: &'a [AtomicBool; 2],
    ) -> Self {
        Direction {
            src,
            dst,
            side,
            dst_base,
            pair,
            cfg,
            fin_seen: OnceLock::new(),
            shut,
        }
    }

    /// Runs until EOF on `src` has been passed on as a FIN on `dst`. `forwarded` counts the
    /// passed bytes written to `dst` by userspace.
    async fn run(self, forwarded_total: &AtomicU64) -> Result<(), Failed> {
        let mut buf: Vec<u8> = Vec::new();
        let mut forwarded = 0u64;
        let mut at_eof = false;
        loop {
            // Readable means: passed bytes, EOF, an error, or (rarely) a wake-up for redirected
            // bytes that leaves nothing to read.
            if !at_eof {
                self.src.readable().await.map_err(|e| Failed::Source(e.kind()))?;
            }
            if buf.is_empty() {
                buf = vec![0; BUF_SIZE];
            }
            let r = self.src.try_read(&mut buf);
            tracing::trace!(side = ?self.side, result = ?r.as_ref().map_err(|e| e.kind()), "kernel relay: source readable");
            match r {
                // Passed bytes can still wait in the kernel (a backlog the socket's receive
                // buffer had no room for) when EOF is already readable: they come first.
                // No readiness event reports them: poll until they are readable.
                Ok(0) if self.pair.state(self.side).map_err(|_| Failed::Maps)?.passed > forwarded => {
                    if self.drain_expired() {
                        return Err(Failed::DrainTimeout);
                    }
                    at_eof = true;
                    tokio::time::sleep(POLL_MAX).await;
                }
                Ok(0) => return self.finish(forwarded).await,
                Ok(n) => {
                    let state = self.pair.state(self.side).map_err(|_| Failed::Maps)?;
                    if state.broken > 0 {
                        // The verdict counts a broken skb before its bytes become readable.
                        tracing::warn!(side = ?self.side, "kernel relay: bytes out of sequence, cutting the pair");
                        return Err(Failed::Stream);
                    }
                    let p = state.passed;
                    if p < forwarded + n as u64 {
                        tracing::warn!(side = ?self.side, n, passed = p, forwarded, "kernel relay: read bytes the verdict has not seen (order no longer guaranteed)");
                    }
                    self.forward(&buf[..n], forwarded).await?;
                    forwarded += n as u64;
                    forwarded_total.fetch_add(n as u64, Relaxed);
                    self.grant(forwarded)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => buf = Vec::new(),
                Err(e) => return Err(Failed::Source(e.kind())),
            }
        }
    }

    /// Writes passed bytes to `dst` once `dst` has taken every byte that precedes them.
    async fn forward(&self, bytes: &[u8], forwarded: u64) -> Result<(), Failed> {
        // While a passed byte is not forwarded the verdict redirects nothing, so `redirected`
        // is final for the bytes that precede these.
        let state = self.pair.state(self.side).map_err(|_| Failed::Maps)?;
        self.wait_taken(state.redirected + forwarded).await?;
        let mut rest = bytes;
        while !rest.is_empty() {
            self.alive()?;
            if self.drain_expired() {
                return Err(Failed::DrainTimeout);
            }
            tokio::select! {
                r = self.dst.writable() => r.map_err(|e| Failed::Destination(e.kind()))?,
                // A slow reader may keep `dst` unwritable for long: still notice a failing `src`.
                _ = tokio::time::sleep(POLL_MAX) => continue,
            }
            match self.dst.try_write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Failed::Destination(e.kind())),
            }
        }
        Ok(())
    }

    /// Tells the verdict how many passed bytes have been forwarded: once that catches up with
    /// what it passed, it may redirect again (the window itself it renews on its own).
    fn grant(&self, forwarded: u64) -> Result<(), Failed> {
        self.pair
            .set_ctrl(self.side, window(self.cfg, forwarded))
            .map_err(|_| Failed::Maps)
    }

    /// EOF on `src`: once `dst` has taken every byte from `src`, pass the FIN on.
    async fn finish(&self, forwarded: u64) -> Result<(), Failed> {
        let state = self.pair.state(self.side).map_err(|_| Failed::Maps)?;
        if state.broken > 0 {
            return Err(Failed::Stream);
        }
        tracing::trace!(side = ?self.side, redirected = state.redirected, forwarded, "kernel relay: EOF, draining before FIN");
        self.wait_taken(state.redirected + forwarded).await?;
        // EOF is also what a reset source reads once its pending error has been taken, and the
        // kernel takes it when it redirects the other direction's bytes into the reset socket
        // (the failed send reads `sk_err`). A source we have not shut down ends in TCP_CLOSE
        // only by a reset (after a FIN it waits in CLOSE_WAIT for our own), and a reset must
        // reach the other side as one, never as a clean FIN.
        if !self.shut[self.side as usize].load(Relaxed) && is_closed(self.src) {
            return Err(Failed::Source(io::ErrorKind::ConnectionReset));
        }
        nix::sys::socket::shutdown(self.dst.as_raw_fd(), nix::sys::socket::Shutdown::Write)
            .map_err(|e| Failed::Destination(io::Error::from(e).kind()))?;
        self.shut[self.side.other() as usize].store(true, Relaxed);
        Ok(())
    }

    /// Waits until `dst`'s TCP has taken `bytes` since insertion, polling (no event reports
    /// it) with a growing interval; fails if either side's connection fails meanwhile, or if
    /// `src` has closed and the drain timeout has passed since.
    async fn wait_taken(&self, bytes: u64) -> Result<(), Failed> {
        let (mut interval, mut spins) = (POLL_MIN, 0);
        loop {
            let now = taken(self.dst).map_err(|e| Failed::Destination(e.kind()))?;
            if now.wrapping_sub(self.dst_base) >= bytes {
                return Ok(());
            }
            self.alive()?;
            if self.drain_expired() {
                return Err(Failed::DrainTimeout);
            }
            // The destination usually takes the last redirected bytes within microseconds, far
            // below the timer's millisecond: first give the kernel's worker a few turns.
            if spins < SPIN_ROUNDS {
                spins += 1;
                tokio::task::yield_now().await;
                continue;
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(POLL_MAX);
        }
    }

    /// True once `src`'s peer has closed and the drain timeout has passed since it was first
    /// seen. Whatever `src` still has queued is then held up by a `dst` that does not read.
    fn drain_expired(&self) -> bool {
        if self.fin_seen.get().is_none() && fin_received(self.src) {
            let _ = self.fin_seen.set(Instant::now());
        }
        self.fin_seen
            .get()
            .is_some_and(|t| t.elapsed() >= self.cfg.drain_timeout)
    }

    /// Fails when `src` has a pending error (a reset), or `dst` can no longer take bytes.
    /// A closed `src` is no failure: it may have ended in order, after the bytes being handled.
    fn alive(&self) -> Result<(), Failed> {
        if let Some(e) = pending_error(self.src) {
            return Err(Failed::Source(e.kind()));
        }
        if let Some(e) = pending_error(self.dst) {
            return Err(Failed::Destination(e.kind()));
        }
        if is_closed(self.dst) {
            return Err(Failed::Destination(io::ErrorKind::ConnectionReset));
        }
        Ok(())
    }
}

/// The verdict's bound on bytes in flight per direction (see [`SockCtrl`]), with `forwarded`
/// passed bytes written by userspace.
fn window(cfg: &config::Relay, forwarded: u64) -> SockCtrl {
    SockCtrl {
        forwarded,
        window_bytes: cfg.max_in_flight_bytes,
        window_skbs: cfg.max_in_flight_skbs,
    }
}

/// Bytes this socket's TCP has taken for sending since it was created: acknowledged bytes plus
/// bytes still in its send queue (`tcpi_bytes_acked` + `SIOCOUTQ`).
pub fn taken(s: &impl AsFd) -> io::Result<u64> {
    let info = tcp_info(s)?;
    let mut outq: libc::c_int = 0;
    // SAFETY: a valid socket fd and an out-pointer to a c_int, as SIOCOUTQ expects.
    if unsafe { libc::ioctl(s.as_fd().as_raw_fd(), libc::TIOCOUTQ, &raw mut outq) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked + outq.max(0) as u64)
}

/// The socket's pending error (SO_ERROR), such as ECONNRESET after a reset.
fn pending_error(s: &impl AsFd) -> Option<io::Error> {
    match nix::sys::socket::getsockopt(&s.as_fd(), nix::sys::socket::sockopt::SocketError) {
        Ok(0) => None,
        Ok(errno) => Some(io::Error::from_raw_os_error(errno)),
        Err(e) => Some(e.into()),
    }
}

/// True once the peer's FIN has arrived (TCP states after it, see include/net/tcp_states.h).
fn fin_received(s: &impl AsFd) -> bool {
    const TIME_WAIT: u8 = 6;
    const CLOSE_WAIT: u8 = 8;
    const LAST_ACK: u8 = 9;
    const CLOSING: u8 = 11;
    tcp_info(s).map_or(true, |i| {
        matches!(i.tcpi_state, TIME_WAIT | TCP_CLOSE | CLOSE_WAIT | LAST_ACK | CLOSING)
    })
}

/// True once the connection is gone (reset, or fully closed).
fn is_closed(s: &impl AsFd) -> bool {
    tcp_info(s).map_or(true, |i| i.tcpi_state == TCP_CLOSE)
}

/// The socket's `TCP_INFO`.
pub fn tcp_info(s: &impl AsFd) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid fd and an out-buffer of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            s.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}
