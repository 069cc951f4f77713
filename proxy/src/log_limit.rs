//! A bound on log lines that clients cause: a refused handshake, an upstream's answer to one
//! client's request. Anyone who can connect can cause those, as often as they like; each kind
//! gets at most a fixed number of lines per second, and the next line that is written says how
//! many were left out (`suppressed`), so an operator still sees that a flood happened.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines per second of one kind.
pub struct Throttle {
    per_second: u32,
    state: Mutex<State>,
}

struct State {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl Throttle {
    pub const fn new(per_second: u32) -> Self {
        Self {
            per_second,
            state: Mutex::new(State {
                window_start: None,
                in_window: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)`: write this line, saying `n` similar ones were suppressed since the last one
    /// written; `None`: leave it out (it is counted).
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut s = crate::lock::lock(&self.state);
        if s.window_start
            .is_none_or(|w| now.saturating_duration_since(w) >= Duration::from_secs(1))
        {
            s.window_start = Some(now);
            s.in_window = 0;
        }
        if s.in_window >= self.per_second {
            s.suppressed += 1;
            return None;
        }
        s.in_window += 1;
        Some(std::mem::take(&mut s.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_limit_and_counted_in_the_next_line() {
        let t = Throttle::new(3);
        let t0 = Instant::now();
        let first: Vec<_> = (0..5).map(|_| t.admit(t0)).collect();
        assert_eq!(first, [Some(0), Some(0), Some(0), None, None]);
        assert_eq!(t.admit(t0 + Duration::from_millis(999)), None);
        // The next second: lines again, the first one carrying the count of the left-out ones.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(t.admit(later), Some(3));
        assert_eq!(t.admit(later), Some(0));
    }
}
