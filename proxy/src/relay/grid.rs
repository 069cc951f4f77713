//! When a connection's periodic looks happen (the send timeout's, the idle timeout's, a parked
//! pair's, the look that parks a pair): one period on, rounded up to a grid shared by the whole
//! process, whose step is [`STEP`] (or the period, if shorter).
//!
//! Why: each look on its own clock is one wake-up of the proxy per connection and period (tokio
//! gathers timers to the millisecond, so up to a thousand a second with enough connections), for
//! a check that almost always finds nothing to do. On the grid, the looks that fall due within
//! one step are made together, in one wake-up: the proxy wakes for looks at most ten times a
//! second however many connections it holds (2,000 idle kernel-relayed connections opened over
//! 15 s: 143 context switches a second of the proxy on their own clocks, 21 on the grid), and a
//! step's batch stays the share of the connections that one step of their period holds, not all
//! of them at once. The wake-ups cost more than the proxy's own CPU: on the benchmark's VMs, a
//! CPU woken from idle a few hundred times a second (by the proxy's staggered looks, or by any
//! program that sleeps a millisecond in a loop) made the other CPU, which carries the load
//! generator and the kernel relay's work, fall behind for 150-240 ms at a time
//! (`bench/analysis.md`).

use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

/// The grid's step: looks are made on its multiples.
const STEP: Duration = Duration::from_millis(100);

/// How many looks a timeout gets over its length (the send and idle timeouts, and a parked
/// pair's looks for them): a connection is cut between 1 and 1 + 1/this of its timeout.
pub(crate) const LOOKS_PER_TIMEOUT: u32 = 4;

/// The grid's origin: the first look the process schedules.
static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();

/// When a look due `every` after `now` is made: the first point of the grid at or after it.
pub(crate) fn look_at(now: Instant, every: Duration) -> Instant {
    let origin = Instant::from_std(*ORIGIN.get_or_init(std::time::Instant::now));
    point_at_or_after(origin, now + every, every.min(STEP))
}

/// The first of the points `origin + k * step` at or after `due` (a step of at least a
/// millisecond). A `due` before the origin (a test runtime whose paused clock lags the one
/// that set it) is kept as it is.
fn point_at_or_after(origin: Instant, due: Instant, step: Duration) -> Instant {
    let step = step.max(Duration::from_millis(1));
    let Some(since) = due.checked_duration_since(origin) else {
        return due;
    };
    let steps = since.as_nanos().div_ceil(step.as_nanos());
    match u64::try_from(step.as_nanos() * steps) {
        Ok(nanos) => origin + Duration::from_nanos(nanos),
        Err(_) => due,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_due_within_one_step_are_made_together() {
        let origin = Instant::now();
        let at = |ms| origin + Duration::from_millis(ms);
        let step = Duration::from_millis(100);
        assert_eq!(point_at_or_after(origin, at(0), step), at(0));
        assert_eq!(point_at_or_after(origin, at(1), step), at(100));
        assert_eq!(point_at_or_after(origin, at(99), step), at(100));
        assert_eq!(point_at_or_after(origin, at(100), step), at(100));
        assert_eq!(point_at_or_after(origin, at(15_001), step), at(15_100));
        // Connections whose looks fall due anywhere in one step look at its end, together.
        let dues = [3, 37, 64, 99].map(|ms| at(15_000 + ms));
        assert!(dues.iter().all(|d| point_at_or_after(origin, *d, step) == at(15_100)));
    }

    #[test]
    fn a_look_is_never_early_and_at_most_one_step_late() {
        let now = Instant::now();
        for every in [1, 10, 99, 100, 250, 500, 15_000].map(Duration::from_millis) {
            let look = look_at(now, every);
            assert!(look >= now + every, "{every:?}");
            assert!(look < now + every + every.min(STEP), "{every:?}");
        }
    }

    #[test]
    fn a_due_before_the_origin_or_a_zero_step_still_gets_a_look_not_before_it() {
        let origin = Instant::now() + Duration::from_secs(10);
        let due = Instant::now();
        assert_eq!(point_at_or_after(origin, due, STEP), due);
        let ms = Duration::from_millis(1);
        assert_eq!(point_at_or_after(origin, origin + ms / 2, Duration::ZERO), origin + ms);
    }
}
