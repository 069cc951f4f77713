//! When a connection's periodic looks happen (the send timeout's, the idle timeout's, a parked
//! pair's, the look that parks a pair): on a grid shared by the whole process, one per period.
//!
//! Why: each look on its own clock is one wake-up of the proxy per connection and period (tokio
//! gathers timers to the millisecond, so up to a thousand a second with enough connections),
//! for a check that almost always finds nothing to do. On the grid, every connection that looks
//! with the same period looks at the same instants: one wake-up per period for all of them
//! (2,000 idle kernel-relayed connections opened over 15 s: 143 context switches a second of the
//! proxy before, 2.5 on the grid). The wake-ups cost more than the proxy's own CPU: on the
//! benchmark's VMs, a CPU woken from idle a few hundred times a second (by the proxy's staggered
//! looks, or by any program that sleeps a millisecond in a loop) made the other CPU, which
//! carries the load generator and the kernel relay's work, fall behind for 150-240 ms at a time
//! (`bench/analysis.md`).

use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

/// The grid's origin: the first look the process schedules.
static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();

/// The first instant after `t` on the grid of period `every` (at least a millisecond).
pub(crate) fn next_after(t: Instant, every: Duration) -> Instant {
    let origin = Instant::from_std(*ORIGIN.get_or_init(std::time::Instant::now));
    point_after(origin, t, every)
}

/// The first instant after `t` of the points `origin + k * every`. A `t` before the origin (a
/// test runtime whose paused clock lags the one that set it) gets a look one period on.
fn point_after(origin: Instant, t: Instant, every: Duration) -> Instant {
    let every = every.max(Duration::from_millis(1));
    let Some(since) = t.checked_duration_since(origin) else {
        return t + every;
    };
    let periods = since.as_nanos() / every.as_nanos() + 1;
    match u64::try_from(every.as_nanos() * periods) {
        Ok(nanos) => origin + Duration::from_nanos(nanos),
        Err(_) => t + every,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_fall_on_the_grid_strictly_after_the_instant() {
        let origin = Instant::now();
        let every = Duration::from_millis(500);
        let at = |ms| origin + Duration::from_millis(ms);
        assert_eq!(point_after(origin, origin, every), at(500));
        assert_eq!(point_after(origin, at(1), every), at(500));
        assert_eq!(point_after(origin, at(499), every), at(500));
        // On a point: the next one, never the same instant (a loop that looks again at once
        // would spin).
        assert_eq!(point_after(origin, at(500), every), at(1000));
        assert_eq!(point_after(origin, at(12_345), every), at(12_500));
    }

    #[test]
    fn connections_with_the_same_period_look_together() {
        let origin = Instant::now();
        let every = Duration::from_secs(15);
        // Connections that started at different times share their looks from the first on.
        let starts = [3, 700, 9_999, 14_999].map(|ms| origin + Duration::from_millis(ms));
        let firsts: Vec<_> = starts.iter().map(|s| point_after(origin, *s, every)).collect();
        assert!(firsts.iter().all(|f| *f == origin + every));
        assert_eq!(point_after(origin, firsts[0], every), origin + 2 * every);
    }

    #[test]
    fn an_instant_before_the_origin_or_a_zero_period_still_gets_a_later_look() {
        let origin = Instant::now() + Duration::from_secs(10);
        let t = Instant::now();
        assert_eq!(
            point_after(origin, t, Duration::from_secs(1)),
            t + Duration::from_secs(1)
        );
        assert_eq!(
            point_after(origin, origin, Duration::ZERO),
            origin + Duration::from_millis(1)
        );
    }
}
