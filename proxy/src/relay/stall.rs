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
/// timeout, on the process's grid (`super::grid`), so a pair is cut between 1 and 1.25 times the
/// timeout (and at most a grid step) after its peer's last acknowledgement. `activity` counts
/// the bytes relayed: while it stands still after a check found nothing waiting, the checks are
/// skipped ([`Quiet`]).
pub(crate) async fn watch<S: AsFd>(client: &S, upstream: &S, timeout: Duration, activity: impl Fn() -> u64) -> End {
    if timeout.is_zero() {
        return std::future::pending().await;
    }
    let mut peers = [Peer::new(client), Peer::new(upstream)];
    let mut quiet = Quiet::new(activity());
    loop {
        super::timer_until(super::grid::look_at(
            Instant::now(),
            timeout / super::grid::LOOKS_PER_TIMEOUT,
        ))
        .await;
        let moved = activity();
        if quiet.skip(moved) {
            continue;
        }
        let now = Instant::now();
        let mut waiting = false;
        for p in &mut peers {
            if p.stalled_for(now) >= timeout {
                return End::SendTimeout;
            }
            waiting |= p.since.is_some();
        }
        quiet.checked(moved, waiting);
    }
}

/// When a check can be skipped. Bytes come to wait in a send queue only by being relayed, which
/// the activity count counts (the verdict when it redirects, userspace when it has written). A
/// check that found nothing waiting, made a whole check interval after the count last moved (so
/// that bytes the verdict counted have reached the send queue), stays true as long as the count
/// stands still: an idle connection's checks then cost no system call.
#[derive(Debug)]
struct Quiet {
    /// The count at the previous check.
    last: u64,
    /// The count a check found quiet at; checks are skipped while the count is this.
    at: Option<u64>,
}

impl Quiet {
    fn new(activity: u64) -> Self {
        Quiet {
            last: activity,
            at: None,
        }
    }

    /// Whether the check due with the count at `activity` can be skipped.
    fn skip(&mut self, activity: u64) -> bool {
        if self.at == Some(activity) {
            return true;
        }
        self.at = None;
        false
    }

    /// A check made with the count at `activity` found bytes `waiting` (or none).
    fn checked(&mut self, activity: u64, waiting: bool) {
        self.at = (!waiting && activity == self.last).then_some(activity);
        self.last = activity;
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

#[cfg(test)]
mod tests {
    use super::Quiet;

    #[test]
    fn checks_are_skipped_only_after_a_quiet_check_a_whole_interval_after_the_last_byte() {
        let mut q = Quiet::new(100);
        // Bytes counted since the start: checked, and not trusted yet even if nothing waits
        // (bytes the verdict counted may not have reached the send queue).
        assert!(!q.skip(150));
        q.checked(150, false);
        // The count stood still for a whole interval and nothing waits: quiet from here.
        assert!(!q.skip(150));
        q.checked(150, false);
        assert!(q.skip(150));
        assert!(q.skip(150));
        // A byte relayed: checked again, and again only trusted after a still interval.
        assert!(!q.skip(151));
        q.checked(151, false);
        assert!(!q.skip(151));
        q.checked(151, false);
        assert!(q.skip(151));
    }

    #[test]
    fn bytes_waiting_keep_every_check() {
        let mut q = Quiet::new(0);
        for _ in 0..5 {
            assert!(!q.skip(10));
            q.checked(10, true);
        }
        // Once nothing waits any more (the peer took them), quiet again.
        assert!(!q.skip(10));
        q.checked(10, false);
        assert!(q.skip(10));
    }
}
