//! When `relay.mode = "auto"` moves a connection from the userspace relay to the kernel relay.
//!
//! Putting a pair under the kernel relay costs a few map updates and system calls at the start
//! and at the end; it pays back per message (the kernel relay moves a small message for a
//! fraction of the userspace relay's CPU), not per byte (for bulk transfers it is no cheaper on
//! the measured machines: `docs/kernel-relay.md`). So a connection starts in userspace and
//! moves once it shows message traffic: a run of reads that are small on average. The run is
//! judged on its own, not the connection's whole past, so a connection that began with a bulk
//! transfer still moves once it turns to messages. Short connections and bulk transfers never
//! pay for the maps.

use crate::config;

/// The promotion rule of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Reads (about one message each, both directions) in a run.
    pub after_reads: u64,
    /// Largest average read of a run that still counts as message traffic.
    pub max_average_read: u64,
}

/// The current run of reads of one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Run {
    reads: u64,
    bytes: u64,
}

impl Policy {
    pub fn new(cfg: &config::Relay) -> Self {
        Policy {
            after_reads: cfg.promote_after_reads,
            max_average_read: cfg.promote_max_average_read,
        }
    }

    /// Adds a read of `n` bytes to `run`; true once the connection should move. A full run
    /// whose average read is too large starts a new one.
    pub fn observe(&self, run: &mut Run, n: u64) -> bool {
        run.reads += 1;
        run.bytes = run.bytes.saturating_add(n);
        self.due(run)
    }

    /// True when `run` shows message traffic (also for a run of no reads when `after_reads`
    /// is 0: move at the first chance).
    pub fn due(&self, run: &mut Run) -> bool {
        if run.reads < self.after_reads {
            return false;
        }
        if run.bytes <= run.reads.saturating_mul(self.max_average_read) {
            return true;
        }
        *run = Run::default();
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy {
        after_reads: 8,
        max_average_read: 16 * 1024,
    };

    fn feed(p: &Policy, run: &mut Run, reads: impl IntoIterator<Item = u64>) -> Option<usize> {
        reads.into_iter().position(|n| p.observe(run, n))
    }

    #[test]
    fn messages_move_after_a_run_of_reads() {
        let mut run = Run::default();
        assert_eq!(feed(&P, &mut run, [128; 20]), Some(7), "the 8th read");
    }

    #[test]
    fn a_short_connection_never_moves() {
        let mut run = Run::default();
        assert_eq!(feed(&P, &mut run, [128; 7]), None);
    }

    #[test]
    fn bulk_stays() {
        let mut run = Run::default();
        assert_eq!(feed(&P, &mut run, [64 * 1024; 1000]), None);
        // Exactly at the average moves; one byte over does not.
        let mut run = Run::default();
        assert_eq!(feed(&P, &mut run, [16 * 1024; 8]), Some(7));
        let mut run = Run::default();
        assert_eq!(feed(&P, &mut run, [16 * 1024 + 1; 8]), None);
    }

    #[test]
    fn bulk_then_messages_moves_one_run_after_the_bulk() {
        let mut run = Run::default();
        // 100 bulk reads: runs of 8 that never qualify, the last one cut short at 4 reads.
        assert_eq!(feed(&P, &mut run, [64 * 1024; 100]), None);
        // The rest of that run is small, but its bulk reads weigh it down: it does not move...
        assert_eq!(feed(&P, &mut run, [128; 4]), None);
        // ...the next run, all messages, does.
        assert_eq!(feed(&P, &mut run, [128; 8]), Some(7));
    }

    #[test]
    fn a_few_large_reads_in_a_run_of_messages_are_allowed() {
        // 2 x 60 KiB + 6 x 100 B: average about 15 KiB.
        let mut run = Run::default();
        assert_eq!(
            feed(&P, &mut run, [60 * 1024, 100, 100, 60 * 1024, 100, 100, 100, 100]),
            Some(7)
        );
    }

    #[test]
    fn zero_reads_moves_at_the_first_chance() {
        let p = Policy { after_reads: 0, ..P };
        assert!(p.due(&mut Run::default()));
    }

    #[test]
    fn no_overflow() {
        let p = Policy {
            after_reads: 1,
            max_average_read: u64::MAX,
        };
        let mut run = Run::default();
        assert!(p.observe(&mut run, u64::MAX));
    }
}
