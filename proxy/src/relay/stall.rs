//! The send timeout (`relay.send_timeout`): a peer that takes no byte for that long while bytes
//! wait for it ends the pair, whichever relay carries it.
//!
//! "Waiting" and "taken" are read from the proxy's socket towards the peer, the one place both
//! relays share: bytes wait while its send queue is not empty (`SIOCOUTQ`; a relay that holds
//! bytes back holds them only because that queue is full), and the peer took some when the
//! socket's acknowledged count (`tcpi_bytes_acked`) moved. An idle connection has an empty send
//! queue, so it is never stalled; a slow reader's acknowledgements keep its connection open.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use tokio::time::Instant;

use super::{End, tcp_probe};

/// Completes with [`End::SendTimeout`] once the client or the upstream has taken no byte for
/// `timeout` while bytes waited for it; never if `timeout` is zero. Checked four times per
/// timeout, so a pair is cut between 1 and 1.25 times the timeout after its peer's last
/// acknowledgement.
pub(crate) async fn watch<S: AsFd>(client: &S, upstream: &S, timeout: Duration) -> End {
    if timeout.is_zero() {
        return std::future::pending().await;
    }
    let mut peers = [Peer::new(client), Peer::new(upstream)];
    loop {
        super::timer(timeout / 4).await;
        let now = Instant::now();
        if peers.iter_mut().any(|p| p.stalled_for(now) >= timeout) {
            return End::SendTimeout;
        }
    }
}

/// What was last seen of the proxy's socket towards one peer.
struct Peer<'a> {
    socket: BorrowedFd<'a>,
    acked: u64,
    /// Since when bytes have waited with no acknowledgement; `None`: nothing waits.
    since: Option<Instant>,
}

impl<'a> Peer<'a> {
    fn new(socket: &'a impl AsFd) -> Self {
        let socket = socket.as_fd();
        Peer {
            socket,
            acked: 0,
            since: None,
        }
    }

    /// How long bytes have waited without progress, as of this check. A socket that cannot be
    /// read out counts as not stalled: a failed connection is the relay's own end to find.
    fn stalled_for(&mut self, now: Instant) -> Duration {
        let Ok((acked, queued)) = tcp_probe::acked_and_unacked(&self.socket) else {
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
