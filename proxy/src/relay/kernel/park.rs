//! Parked pairs (`relay.park_after`): a kernel-relayed pair that carried no byte for a while,
//! with nothing waiting in its sockets, needs nothing from userspace until a FIN, an error,
//! passed bytes or a timer. Its running relay (the two directions, the timers, their futures:
//! about 3 KB) then ends, and the connection keeps only a [`Parked`] record, which waits on the
//! same wake-ups; the verdict goes on relaying meanwhile. On a wake-up the relay runs again from
//! the record, as it does for a pair handed over by a predecessor process: read first.

use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::super::{Stop, tcp_probe, timer, timer_until};
use crate::config;
use crate::ebpf::{PairGuard, ParkedCount, Watch};

/// A kernel-relayed pair while no task runs it: what [`super::unpark`] needs to carry on.
pub struct Parked {
    pub(super) client: TcpStream,
    pub(super) upstream: TcpStream,
    pub(super) pair: PairGuard,
    pub(super) bases: [u64; 2],
    /// Bytes userspace moved in this relay (settled, passed and forwarded).
    pub(super) moved: [u64; 2],
    /// The watch's wake-ups of the two sockets, still registered.
    pub(super) wakes: [Arc<Notify>; 2],
    /// When the kernel relay took the pair.
    pub(super) started: Instant,
    /// The activity count (bytes relayed either way) the pair was parked at, and since when it
    /// has stood still.
    pub(super) quiet: u64,
    pub(super) quiet_since: tokio::time::Instant,
    pub(super) _counted: ParkedCount,
}

impl Parked {
    /// The pair `t`, whose sockets the watch wakes through `wakes`, parked with its activity
    /// count `quiet` as it stood still since `quiet.1`.
    pub(super) fn new(
        t: super::Taken,
        wakes: [Arc<Notify>; 2],
        quiet: (u64, tokio::time::Instant),
        watch: &Arc<Watch>,
    ) -> Self {
        Parked {
            client: t.client,
            upstream: t.upstream,
            pair: t.pair,
            bases: t.bases,
            moved: t.moved,
            wakes,
            started: t.started,
            quiet: quiet.0,
            quiet_since: quiet.1,
            _counted: ParkedCount::new(watch),
        }
    }

    /// Completes when the pair must run again: a wake-up of the watch (a FIN, an error, passed
    /// bytes), its lifetime's end, the shutdown drain, a handover; or, at the send and idle
    /// timeouts' check interval, bytes the verdict relayed since it parked (they may wait for a
    /// peer, and they restart the idle timeout: the running relay checks both), or the idle
    /// timeout's end.
    #[allow(clippy::manual_async_fn)] // not an `async fn`: it would keep `stop` twice
    pub fn wait<'a>(&'a self, cfg: &'a config::Relay, stop: Stop<'a>) -> impl Future<Output = ()> + 'a {
        async move {
            let moved = async {
                let Some(every) = check_interval(cfg) else {
                    return std::future::pending().await;
                };
                // At once, then at every interval: the count may have moved between the check
                // that found the pair quiet and the moment its directions stopped.
                while self.activity() == self.quiet {
                    timer(every).await;
                }
            };
            let idle = async {
                match cfg.idle_timeout {
                    Some(t) => timer_until(self.quiet_since + t).await,
                    None => std::future::pending().await,
                }
            };
            let lifetime = async {
                match stop.deadline {
                    Some(at) => timer_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.wakes[0].notified() => {}
                () = self.wakes[1].notified() => {}
                () = moved => {}
                () = idle => {}
                () = lifetime => {}
                () = stop.shutdown.cancelled() => {}
                () = stop.handover.cancelled() => {}
            }
        }
    }

    /// When the kernel relay took the pair.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Since when no byte has moved, as far as is known now: when it parked, unless the verdict
    /// has relayed bytes since (at a moment not known: now, then).
    pub(super) fn quiet_since_now(&self) -> tokio::time::Instant {
        if self.activity() == self.quiet {
            self.quiet_since
        } else {
            tokio::time::Instant::now()
        }
    }

    /// The running relay's activity count: bytes the verdict redirected and bytes userspace
    /// moved (which stand still while the pair is parked).
    fn activity(&self) -> u64 {
        let k = self.pair.counters();
        k.from_client.redirected + k.from_upstream.redirected + self.moved[0] + self.moved[1]
    }
}

/// How often a parked pair looks at its activity count: as often as the running relay's send
/// and idle timeouts look (a quarter of each); never if neither is on.
fn check_interval(cfg: &config::Relay) -> Option<Duration> {
    let send = (!cfg.send_timeout.is_zero()).then_some(cfg.send_timeout / 4);
    let idle = cfg.idle_timeout.map(|t| t / 4);
    match (send, idle) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Completes, with the count and since when it stood still, once `activity` has stood still
/// for `after` (it parks between one and two times `after` after the last byte, one timer per
/// `after`) and neither socket has bytes waiting in its send queue (a peer that does not read
/// is the running relay's to time out); never if `after` is zero. `since`: when the count last
/// moved, as far as the caller knows.
pub(super) async fn quiet(
    after: Duration,
    sockets: [&TcpStream; 2],
    activity: impl Fn() -> u64,
    mut since: tokio::time::Instant,
) -> (u64, tokio::time::Instant) {
    if after.is_zero() {
        return std::future::pending().await;
    }
    let mut last = activity();
    let mut check = timer(after);
    loop {
        check.as_mut().await;
        let now = activity();
        if now != last {
            (last, since) = (now, tokio::time::Instant::now());
        } else if since.elapsed() >= after && sockets.iter().all(|s| nothing_waiting(s)) {
            return (last, since);
        }
        check.as_mut().reset(tokio::time::Instant::now() + after);
    }
}

/// True when `s` has no byte in its send queue (unreadable counts as waiting: not parked).
fn nothing_waiting(s: &TcpStream) -> bool {
    matches!(tcp_probe::unacked(s), Ok(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_pair_checks_as_often_as_the_send_and_idle_timeouts() {
        let mut cfg = config::Relay {
            send_timeout: Duration::from_secs(60),
            ..Default::default()
        };
        assert_eq!(check_interval(&cfg), Some(Duration::from_secs(15)));
        cfg.idle_timeout = Some(Duration::from_secs(8));
        assert_eq!(check_interval(&cfg), Some(Duration::from_secs(2)));
        cfg.send_timeout = Duration::ZERO;
        assert_eq!(check_interval(&cfg), Some(Duration::from_secs(2)));
        cfg.idle_timeout = None;
        assert_eq!(check_interval(&cfg), None);
    }
}
