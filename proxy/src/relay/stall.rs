//! The send timeout (`relay.send_timeout`): a peer that takes no byte for that long while bytes
//! wait for it ends the pair, whichever relay carries it.
//!
//! "Waiting" and "taken" are read from the proxy's socket towards the peer, the one place both
//! relays share: bytes wait while its send queue is not empty (`SIOCOUTQ`; a relay that holds
//! bytes back holds them only because that queue is full), and the peer took some when the
//! socket's acknowledged count (`tcpi_bytes_acked`) moved. An idle connection has an empty send
//! queue, so it is never stalled; a slow reader's acknowledgements keep its connection open.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::End;

/// Completes with [`End::SendTimeout`] once the client or the upstream has taken no byte for
/// `timeout` while bytes waited for it; never if `timeout` is zero. Checked four times per
/// timeout, so a pair is cut between 1 and 1.25 times the timeout after its peer's last
/// acknowledgement.
pub(crate) async fn watch(client: &TcpStream, upstream: &TcpStream, timeout: Duration) -> End {
    if timeout.is_zero() {
        return std::future::pending().await;
    }
    let mut peers = [Peer::new(client), Peer::new(upstream)];
    loop {
        tokio::time::sleep(timeout / 4).await;
        let now = Instant::now();
        if peers.iter_mut().any(|p| p.stalled_for(now) >= timeout) {
            return End::SendTimeout;
        }
    }
}

/// What was last seen of the proxy's socket towards one peer.
struct Peer<'a> {
    socket: &'a TcpStream,
    acked: u64,
    /// Since when bytes have waited with no acknowledgement; `None`: nothing waits.
    since: Option<Instant>,
}

impl<'a> Peer<'a> {
    fn new(socket: &'a TcpStream) -> Self {
        Peer {
            socket,
            acked: 0,
            since: None,
        }
    }

    /// How long bytes have waited without progress, as of this check. A socket that cannot be
    /// read out counts as not stalled: a failed connection is the relay's own end to find.
    fn stalled_for(&mut self, now: Instant) -> Duration {
        let Ok((acked, queued)) = acked_and_queued(self.socket) else {
            self.since = None;
            return Duration::ZERO;
        };
        if queued == 0 {
            self.since = None;
        } else if self.since.is_none() || acked != self.acked {
            self.since = Some(now);
        }
        self.acked = acked;
        self.since.map_or(Duration::ZERO, |t| now - t)
    }
}

/// Bytes the peer has acknowledged since the connection started (`tcpi_bytes_acked`), and bytes
/// in the send queue not yet acknowledged (`SIOCOUTQ`).
fn acked_and_queued(s: &impl AsFd) -> io::Result<(u64, u64)> {
    let fd = s.as_fd().as_raw_fd();
    // SAFETY: tcp_info is plain old data; zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid fd and an out-buffer of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut outq: libc::c_int = 0;
    // SAFETY: a valid socket fd and an out-pointer to a c_int, as SIOCOUTQ expects.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut outq) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info.tcpi_bytes_acked, outq.max(0) as u64))
}

/// Runs `relay` to its end, or until [`watch`] finds a stalled peer.
pub(crate) async fn or_stalled<T>(
    relay: impl Future<Output = Result<T, End>>,
    client: &TcpStream,
    upstream: &TcpStream,
    timeout: Duration,
) -> Result<T, End> {
    tokio::select! {
        r = relay => r,
        end = watch(client, upstream, timeout) => Err(end),
    }
}
