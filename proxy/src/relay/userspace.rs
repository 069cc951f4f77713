//! The userspace relay: both directions copied by tokio, with half-close.
//!
//! A direction blocked on its destination (a peer that does not read) does not look at its
//! source, and a direction waiting for its source does not write to its destination: neither
//! would see that socket fail. So a watcher, beside the copies, waits for an error on either
//! socket and ends both directions at once.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{End, Mode, Outcome, reset_on_close, stall, until_end_or_idle};
use crate::config;

/// Large enough that a bulk transfer costs few system calls. Allocated only while bytes are
/// flowing, so that an idle connection holds no buffer.
const BUF_SIZE: usize = 64 * 1024;

/// Which side a copy error came from.
enum Failed {
    Read(io::Error),
    Write(io::Error),
}

pub async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    cfg: &config::Relay,
    shutdown: &CancellationToken,
) -> Outcome {
    let started = Instant::now();
    let (c2u, u2c) = (AtomicU64::new(0), AtomicU64::new(0));
    let end = {
        let up = copy(&client, &upstream, &c2u);
        let down = copy(&upstream, &client, &u2c);
        // The first error ends both directions: try_join drops the other copy at once.
        let copies = async { tokio::try_join!(up_side(up, true), up_side(down, false)).map(|_| ()) };
        let both = async {
            tokio::select! {
                r = copies => r,
                end = failed(&client, &upstream) => Err(end),
            }
        };
        let both = stall::or_stalled(both, &client, &upstream, cfg.send_timeout);
        until_end_or_idle(both, cfg.idle_timeout, shutdown, || {
            c2u.load(Relaxed) + u2c.load(Relaxed)
        })
        .await
    };
    if end != End::Closed {
        // Pass the abort on: a reset tells the surviving peer the stream did not end cleanly, and
        // discards whatever it would otherwise still try to deliver.
        reset_on_close(&client);
        reset_on_close(&upstream);
    }
    Outcome {
        mode: Mode::Userspace,
        end,
        client_to_upstream: c2u.into_inner(),
        upstream_to_client: u2c.into_inner(),
        repeated_cut: 0,
        duration: started.elapsed(),
    }
}

/// Completes once either socket has an error (a reset, a keepalive timeout), with the end of the
/// side that failed. A FIN is no error: the bytes still to be delivered either way are.
async fn failed(client: &TcpStream, upstream: &TcpStream) -> End {
    let kind = |s: &TcpStream| {
        // The error itself, if no copy has consumed it meanwhile (a read or write that returns it
        // clears it); then the reset that is the usual cause.
        s.take_error()
            .ok()
            .flatten()
            .map_or(io::ErrorKind::ConnectionReset, |e| e.kind())
    };
    tokio::select! {
        r = client.ready(Interest::ERROR) => End::ClientError(r.err().map_or_else(|| kind(client), |e| e.kind())),
        r = upstream.ready(Interest::ERROR) => End::UpstreamError(r.err().map_or_else(|| kind(upstream), |e| e.kind())),
    }
}

/// Maps a direction's failure onto the side that caused it.
async fn up_side(copy: impl Future<Output = Result<(), Failed>>, client_to_upstream: bool) -> Result<(), End> {
    copy.await.map_err(|f| match (f, client_to_upstream) {
        (Failed::Read(e), true) | (Failed::Write(e), false) => End::ClientError(e.kind()),
        (Failed::Read(e), false) | (Failed::Write(e), true) => End::UpstreamError(e.kind()),
    })
}

/// Copies until EOF, then shuts the destination down for writing (passes the FIN on).
async fn copy(from: &TcpStream, to: &TcpStream, count: &AtomicU64) -> Result<(), Failed> {
    loop {
        from.readable().await.map_err(Failed::Read)?;
        let mut buf = vec![0u8; BUF_SIZE];
        loop {
            match from.try_read(&mut buf) {
                Ok(0) => {
                    return nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write)
                        .map_err(|e| Failed::Write(e.into()));
                }
                Ok(n) => {
                    write_all(to, &buf[..n]).await.map_err(Failed::Write)?;
                    count.fetch_add(n as u64, Relaxed);
                }
                // Drained: drop the buffer while waiting for more.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(Failed::Read(e)),
            }
        }
    }
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
