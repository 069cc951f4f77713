//! One direction of a kernel-relayed pair: what userspace does while the verdict moves the
//! bytes. It waits (off the reactor: the watch wakes it on a FIN, an error, or bytes passed to
//! it); on a wake-up it reads what the verdict passed, forwards it in order and reports it; at
//! EOF it waits for the destination to take every byte and passes the FIN on. Its decisions are
//! [`step::next`]; this module performs them.

use std::io::{self, Read as _, Write as _};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::Failed;
use super::step::{self, Action, Failure, Phase, Read, Seen};
use crate::config;
use crate::ebpf::{PairGuard, Side};
use crate::relay::tcp_probe::{fin_received, is_closed, pending_error, taken};

/// Userspace's buffer for passed bytes; allocated only while passed bytes are being forwarded.
const BUF_SIZE: usize = 64 * 1024;
/// Polling bounds while waiting for a destination to take queued bytes: no event reports that.
const POLL_MIN: Duration = Duration::from_micros(50);
const POLL_MAX: Duration = Duration::from_millis(20);
/// Checks made without a timer before the polling above starts.
const SPIN_ROUNDS: u32 = 32;

/// One direction: bytes that arrive on `src` and leave on `dst`.
pub(super) struct Direction<'a> {
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
    /// Notified on a FIN, an error or passed bytes on `src`.
    wake: &'a Notify,
    /// Cancelled when the pair is to move to a successor process: the direction stops at its
    /// next wait while it relays (nothing in userspace's hands, no FIN seen).
    handover: &'a tokio_util::sync::CancellationToken,
    /// Passed bytes this direction's relay forwarded before (a pair taken over or resumed).
    forwarded_before: u64,
}

/// How a direction left off.
pub(super) enum Ran {
    /// EOF passed on as a FIN.
    Done,
    /// Stopped for a handover (the passed bytes it forwarded are reported in its slot).
    Paused,
}

impl From<Failure> for Failed {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Source(kind) => Failed::Source(kind),
            Failure::DrainTimeout => Failed::DrainTimeout,
            Failure::Stream => Failed::Stream,
        }
    }
}

impl<'a> Direction<'a> {
    /// `[src, dst]`: bytes arrive on the first and leave on the second.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        [src, dst]: [&'a TcpStream; 2],
        side: Side,
        dst_base: u64,
        forwarded_before: u64,
        pair: &'a PairGuard,
        cfg: &'a config::Relay,
        shut: &'a [AtomicBool; 2],
        wake: &'a Notify,
        handover: &'a tokio_util::sync::CancellationToken,
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
            wake,
            handover,
            forwarded_before,
        }
    }

    /// Runs until EOF on `src` has been passed on as a FIN on `dst`. `forwarded_total` counts
    /// the passed bytes written to `dst` by userspace.
    #[allow(clippy::manual_async_fn)] // the body's comment says why
    pub(super) fn run(self, forwarded_total: &AtomicU64) -> impl Future<Output = Result<Ran, Failed>> {
        // Not an `async fn`: its future would keep `self` twice, as the argument and as the
        // body's own binding, for the pair's whole life.
        async move {
            // Empty while the kernel relays: an idle or kernel-relayed direction holds no buffer.
            let mut buf: Vec<u8> = Vec::new();
            let mut forwarded = self.forwarded_before;
            let mut phase = Phase::Relaying;
            // Read first: bytes may have been passed before the watch knew the socket.
            let mut wait = false;
            loop {
                if phase == Phase::Done {
                    return Ok(Ran::Done);
                }
                if wait {
                    // A handover takes the pair only here: relaying, every passed byte forwarded.
                    // Whatever wakes the direction meanwhile (passed bytes, a FIN) the successor
                    // finds by reading first, as this loop does.
                    tokio::select! {
                        () = self.wake.notified() => {}
                        () = self.handover.cancelled(), if phase == Phase::Relaying => {
                            return Ok(Ran::Paused);
                        }
                    }
                }
                if buf.is_empty() {
                    buf = vec![0; BUF_SIZE];
                }
                let read = match (&*self.src).read(&mut buf) {
                    Ok(0) => Read::Eof,
                    Ok(n) => Read::Bytes(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Read::Nothing,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => Read::Failed(e.kind()),
                };
                let seen = match read {
                    Read::Failed(_) => Seen::default(),
                    Read::Bytes(_) | Read::Nothing => self.seen(forwarded, false),
                    Read::Eof => self.seen(forwarded, true),
                };
                let (next, action) = step::next(phase, read, seen);
                tracing::trace!(side = ?self.side, ?phase, ?read, ?action, "kernel relay: step");
                phase = next;
                // Only a read that found nothing waits for a wake-up: after bytes, more may be there.
                wait = action == Action::Wait;
                match action {
                    Action::Wait => buf = Vec::new(),
                    Action::Forward(n) => {
                        if seen.passed < forwarded + n as u64 {
                            tracing::warn!(side = ?self.side, n, passed = seen.passed, forwarded, "kernel relay: read bytes the verdict has not seen (order no longer guaranteed)");
                        }
                        // Boxed, like the FIN below: rarely needed, so the waiting direction (the
                        // state an idle kernel-relayed connection keeps) does not carry them.
                        Box::pin(self.forward(&buf[..n], forwarded)).await?;
                        forwarded += n as u64;
                        forwarded_total.fetch_add(n as u64, Relaxed);
                        self.pair.report_forwarded(self.side, forwarded);
                    }
                    Action::PauseAndRead => crate::relay::timer(POLL_MIN).await,
                    Action::PassFin => Box::pin(self.pass_fin(forwarded)).await?,
                    Action::Fail(f) => {
                        if f == Failure::Stream {
                            tracing::warn!(side = ?self.side, "kernel relay: bytes out of sequence, cutting the pair");
                        }
                        return Err(f.into());
                    }
                }
            }
        }
    }

    /// What a decision needs besides the read: the verdict's counters (shared memory, no
    /// system call) and, at EOF only (the only read on which [`step::next`] looks at them), the
    /// source's TCP state.
    fn seen(&self, forwarded: u64, at_eof: bool) -> Seen {
        let counters = self.pair.side(self.side);
        Seen {
            passed: counters.passed,
            forwarded,
            broken: counters.broken > 0,
            source_reset: at_eof && self.source_reset(),
            drain_expired: at_eof && self.drain_expired(),
        }
    }

    /// True when `src` is closed although this relay never shut it down: a reset, whose pending
    /// error may have been taken already (the kernel's send of redirected bytes into the reset
    /// socket reads it), so that a read finds only EOF.
    fn source_reset(&self) -> bool {
        !self.shut[self.side as usize].load(Relaxed) && is_closed(self.src)
    }

    /// Writes passed bytes to `dst` once `dst` has taken every byte that precedes them.
    async fn forward(&self, bytes: &[u8], forwarded: u64) -> Result<(), Failed> {
        // While a passed byte is not forwarded the verdict redirects nothing, so `redirected`
        // is final for the bytes that precede these.
        self.wait_taken(self.pair.side(self.side).redirected + forwarded)
            .await?;
        let mut rest = bytes;
        // `dst` is off the reactor: it is registered for writability only while a write waits.
        let mut writable: Option<AsyncFd<BorrowedFd<'_>>> = None;
        while !rest.is_empty() {
            match (&*self.dst).write(rest) {
                Ok(n) => {
                    rest = &rest[n..];
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failed::Destination(e.kind())),
            }
            self.alive()?;
            if self.drain_expired() {
                return Err(Failed::DrainTimeout);
            }
            let w = match &mut writable {
                Some(w) => w,
                None => {
                    // SAFETY: the fd stays open while registered: `dst` outlives this call,
                    // and the registration is dropped at its end.
                    let fd = unsafe { AsyncFd::register_with_interest(self.dst.as_fd(), Interest::WRITABLE) }
                        .map_err(|e| Failed::Destination(io::Error::from(e).kind()))?;
                    writable.insert(fd)
                }
            };
            tokio::select! {
                r = w.writable() => r.map_err(|e| Failed::Destination(e.kind()))?.clear_ready(),
                // A slow reader may keep `dst` unwritable for long: still notice a failing `src`.
                _ = tokio::time::sleep(POLL_MAX) => {}
            }
        }
        Ok(())
    }

    /// EOF on `src`: once `dst` has taken every byte from `src`, pass the FIN on.
    async fn pass_fin(&self, forwarded: u64) -> Result<(), Failed> {
        let redirected = self.pair.side(self.side).redirected;
        tracing::trace!(side = ?self.side, redirected, forwarded, "kernel relay: EOF, draining before FIN");
        self.wait_taken(redirected + forwarded).await?;
        // A reset may have arrived while waiting; it must reach the other side as one.
        if self.source_reset() {
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
