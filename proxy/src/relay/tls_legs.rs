//! The relay of a pair with a TLS leg (a `wss` client, a TLS upstream). The kernel refuses
//! sockets with the TLS ULP in a sockmap, and without kTLS the records are userspace's to
//! decrypt and encrypt anyway, so such a pair is copied here, with the userspace relay's
//! contract: each direction to its end, the end passed on as a close (TLS `close_notify`, then
//! a FIN), a failure on either side ending both, and the send, idle and lifetime bounds of
//! [`until_end`] on the TCP sockets underneath.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{CopyFailed, End, Mode, Outcome, Stop, copy_side, reset_on_close, until_end};
use crate::config;
use crate::stream::Stream;

/// As the userspace relay's: few system calls for bulk, allocated only while a direction runs.
const BUF_SIZE: usize = 64 * 1024;

/// The descriptor of a socket owned by a stream that outlives every use of this (the relay's
/// own streams): what the stall watch and the abort need.
struct Fd(RawFd);

impl AsFd for Fd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the relay holds both streams, hence both sockets, for as long as any `Fd`
        // exists (they are locals of `relay` dropped before the streams).
        unsafe { BorrowedFd::borrow_raw(self.0) }
    }
}

/// Relays `client` and `upstream` to the end.
pub async fn relay(client: Stream, upstream: Stream, cfg: &config::Relay, stop: Stop<'_>) -> Outcome {
    let started = Instant::now();
    let fds = [Fd(client.tcp().as_raw_fd()), Fd(upstream.tcp().as_raw_fd())];
    let (c2u, u2c) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let end = {
        let both = async {
            tokio::try_join!(
                copy_side(copy(&mut client_read, &mut upstream_write, &c2u), true),
                copy_side(copy(&mut upstream_read, &mut client_write, &u2c), false),
            )
        };
        tokio::pin!(both);
        let activity = || c2u.load(Relaxed) + u2c.load(Relaxed);
        match until_end(
            both.as_mut(),
            [&fds[0], &fds[1]],
            cfg,
            stop,
            activity,
            tokio::time::Instant::now(),
        )
        .await
        {
            Ok(_) => End::Closed,
            Err(end) => end,
        }
    };
    if end != End::Closed {
        // As the userspace relay does: an abort is passed on as one.
        reset_on_close(&fds[0]);
        reset_on_close(&fds[1]);
    }
    Outcome::copied(
        Mode::Userspace,
        end,
        (c2u.load(Relaxed), u2c.load(Relaxed)),
        started.elapsed(),
    )
}

/// Copies until the source ends, then closes the destination for writing.
async fn copy(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    count: &AtomicU64,
) -> Result<(), CopyFailed> {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(n) => n,
            // A TLS peer that closes its TCP connection without a close_notify: browsers do, and
            // WebSocket has its own close handshake inside; an end like a FIN.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(CopyFailed::Read(e)),
        };
        if n == 0 {
            return to.shutdown().await.map_err(CopyFailed::Write);
        }
        to.write_all(&buf[..n]).await.map_err(CopyFailed::Write)?;
        // A TLS stream holds records until flushed.
        to.flush().await.map_err(CopyFailed::Write)?;
        count.fetch_add(n as u64, Relaxed);
    }
}
