//! Parked pairs (`relay.park_after`): a kernel-relayed pair with nothing waiting in its
//! sockets needs nothing from userspace until a FIN, an error, passed bytes, bytes waiting for
//! a peer or a timer. It is parked at once when the kernel relay takes it ([`super::start`]),
//! and at the first look (one every `park_after`, on the process's grid: `relay::grid`) that
//! finds nothing waiting once it has run again ([`quiet`]): its running relay (the two
//! directions, the timers, their futures: about 3 KB) ends, and the connection keeps only a
//! [`Parked`] record, which waits on the same wake-ups; the verdict goes on relaying meanwhile,
//! messages included. On a wake-up the relay runs again from the record, as it does for a pair
//! handed over by a predecessor process: read first.

use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::super::{Stop, grid, tcp_probe, timer_until};
use crate::config;
use crate::ebpf::{PairGuard, ParkedCount, Watch};
use crate::lock::lock;

/// A kernel-relayed pair while no task runs it: what its relay needs to carry on.
pub struct Parked {
    client: TcpStream,
    upstream: TcpStream,
    pair: PairGuard,
    bases: [u64; 2],
    /// Bytes userspace moved in this relay (settled, passed and forwarded).
    moved: [u64; 2],
    /// The watch's wake-ups of the two sockets, still registered.
    wakes: [Arc<Notify>; 2],
    /// When the kernel relay took the pair.
    started: Instant,
    /// The activity count (bytes relayed either way) as last found with nothing waiting, and
    /// since when it has stood still (as far as is known).
    quiet: std::sync::Mutex<(u64, tokio::time::Instant)>,
    _counted: ParkedCount,
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
            quiet: std::sync::Mutex::new(quiet),
            _counted: ParkedCount::new(watch),
        }
    }

    /// The pair as its relay ([`super::run`]) takes it again, once [`Parked::wait`] has
    /// completed: reading first, as the pair's directions always start.
    pub fn into_taken(self) -> super::Taken {
        // Bytes the verdict relayed while the pair was parked moved at some moment before now:
        // the idle time counts from now then.
        let quiet_since = self.quiet_since_now();
        super::Taken {
            client: self.client,
            upstream: self.upstream,
            pair: self.pair,
            bases: self.bases,
            moved: self.moved,
            started: self.started,
            wakes: Some(self.wakes),
            quiet_since,
            waiting: false,
        }
    }

    /// Completes when the pair must run again: a wake-up of the watch (a FIN, an error, passed
    /// bytes), its lifetime's end, the idle timeout's end, the shutdown drain, a handover; or
    /// bytes waiting for a peer. Those are looked for as often as the send and idle timeouts
    /// look (a quarter of each, on the process's grid), and only when the verdict has relayed
    /// bytes since the last look: a peer that takes no byte while bytes wait is the running
    /// relay's send timeout to judge. Bytes relayed with none left waiting restart the idle
    /// timeout and keep the pair parked.
    #[allow(clippy::manual_async_fn)] // not an `async fn`: it would keep `stop` twice
    pub fn wait<'a>(&'a self, cfg: &'a config::Relay, stop: Stop<'a>) -> impl Future<Output = ()> + 'a {
        async move {
            // One timer at a time, for the earliest of: the next look at the count, the idle
            // timeout's end, the lifetime's end.
            let timers = async {
                let every = check_interval(cfg);
                loop {
                    // At once, then at every look: the count may have moved between the check
                    // that found the pair quiet and the moment its directions stopped.
                    if every.is_some() && !self.still_quiet() {
                        return;
                    }
                    let now = tokio::time::Instant::now();
                    let idle_end = cfg.idle_timeout.map(|t| lock(&self.quiet).1 + t);
                    if [idle_end, stop.deadline].into_iter().flatten().any(|end| end <= now) {
                        return;
                    }
                    let next = [every.map(|e| grid::look_at(now, e)), idle_end, stop.deadline];
                    match next.into_iter().flatten().min() {
                        Some(at) => timer_until(at).await,
                        None => std::future::pending().await,
                    }
                }
            };
            tokio::select! {
                () = self.wakes[0].notified() => {}
                () = self.wakes[1].notified() => {}
                () = timers => {}
                () = stop.shutdown.cancelled() => {}
                () = stop.handover.cancelled() => {}
            }
        }
    }

    /// When the kernel relay took the pair.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Since when no byte has moved, as far as is known now: as last found, unless the verdict
    /// has relayed bytes since (at a moment not known: now, then).
    fn quiet_since_now(&self) -> tokio::time::Instant {
        let (count, since) = *lock(&self.quiet);
        if self.activity() == count {
            since
        } else {
            tokio::time::Instant::now()
        }
    }

    /// False when bytes wait in a send queue. The queues are read only when the count moved
    /// since the last look; when nothing waits, the count and now are kept as the quiet ones.
    fn still_quiet(&self) -> bool {
        let count = self.activity();
        let mut quiet = lock(&self.quiet);
        if count == quiet.0 {
            return true;
        }
        if !(nothing_waiting(&self.client) && nothing_waiting(&self.upstream)) {
            return false;
        }
        *quiet = (count, tokio::time::Instant::now());
        true
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
    let send = (!cfg.send_timeout.is_zero()).then_some(cfg.send_timeout / grid::LOOKS_PER_TIMEOUT);
    let idle = cfg.idle_timeout.map(|t| t / grid::LOOKS_PER_TIMEOUT);
    match (send, idle) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Completes, with the count and since when it last moved (as far as is known; `since`: the
/// caller's knowledge at the start), at the first look, one every `after`, that finds neither
/// socket with bytes waiting in its send queue (a peer that does not read is the running
/// relay's to time out); never if `after` is zero.
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
    // The first look once the pair has relayed for `after`, then one every `after`; on the
    // process's grid, so that the pairs look together ([`grid`]).
    let first = grid::look_at(tokio::time::Instant::now(), after);
    let mut check = timer_until(first);
    loop {
        check.as_mut().await;
        let now = activity();
        if now != last {
            (last, since) = (now, tokio::time::Instant::now());
        }
        if sockets.iter().all(|s| nothing_waiting(s)) {
            return (last, since);
        }
        check.as_mut().reset(grid::look_at(tokio::time::Instant::now(), after));
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
