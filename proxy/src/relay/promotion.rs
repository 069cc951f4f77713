//! When `relay.mode = "auto"` moves a connection from the userspace relay to the kernel relay.
//!
//! Putting a pair under the kernel relay costs a few map updates and system calls at the start
//! and at the end; it pays back per message (the kernel relay moves a small message for a
//! fraction of the userspace relay's CPU), not per byte (for bulk transfers it is no cheaper on
//! the measured machines: `docs/kernel-relay.md`). So a connection starts in userspace and
//! moves once it has shown message traffic: enough reads, small on average. Short connections
//! and bulk transfers never pay for the maps.

use crate::config;

/// The promotion rule of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Reads (about one message each) carried before a move.
    pub after_reads: u64,
    /// Largest average read that still counts as message traffic.
    pub max_average_read: u64,
}

impl Policy {
    pub fn new(cfg: &config::Relay) -> Self {
        Policy {
            after_reads: cfg.promote_after_reads,
            max_average_read: cfg.promote_max_average_read,
        }
    }

    /// True once a connection that has carried `bytes` in `reads` reads (both directions)
    /// should move to the kernel relay.
    pub fn due(&self, reads: u64, bytes: u64) -> bool {
        reads >= self.after_reads && bytes <= reads.saturating_mul(self.max_average_read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy {
        after_reads: 8,
        max_average_read: 16 * 1024,
    };

    #[test]
    fn messages_move_once_there_are_enough() {
        assert!(!P.due(0, 0));
        assert!(!P.due(7, 7 * 128));
        assert!(P.due(8, 8 * 128));
        assert!(P.due(1000, 1000 * 16 * 1024));
    }

    #[test]
    fn bulk_stays_until_its_average_read_is_small() {
        assert!(!P.due(8, 8 * 64 * 1024));
        assert!(!P.due(100, 100 * 16 * 1024 + 1));
        // A bulk start followed by many small messages.
        assert!(P.due(200, 4 * 64 * 1024 + 196 * 128));
    }

    #[test]
    fn zero_reads_moves_at_the_first_chance() {
        let p = Policy { after_reads: 0, ..P };
        assert!(p.due(0, 0));
    }

    #[test]
    fn no_overflow() {
        assert!(P.due(u64::MAX, u64::MAX));
    }
}
