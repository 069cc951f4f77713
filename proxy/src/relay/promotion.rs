//! When `relay.mode = "auto"` moves a connection from the userspace relay to the kernel relay.
//!
//! Putting a pair under the kernel relay costs a few map updates and system calls at the start
//! and at the end; it pays back per message (the kernel relay moves a small message for a
//! fraction of the userspace relay's CPU), not per byte (for bulk transfers it is no cheaper on
//! the measured machines: `docs/kernel-relay.md`). So a connection starts in userspace and
//! moves once it shows message traffic: a run of messages that are small on average. The run is
//! judged on its own, not the connection's whole past, so a connection that began with a bulk
//! transfer still moves once it turns to messages. Short connections and bulk transfers never
//! pay for the maps.
//!
//! Messages are counted by their frame headers (`relay::frames`), not by reads: a relay that
//! falls behind takes several queued messages per read, and counting reads would move exactly
//! the busiest connections late. A read inside a frame adds its bytes and no message, so bulk in
//! large frames stays bulk however small its reads; a stream that is not well-formed WebSocket
//! is judged by its reads (each at least one message).
//!
//! A run must also be quick: its messages within `promote_within` (a message rate). A move pays
//! back per message, so a connection with a message every few seconds takes long to earn its
//! move back, and when many such connections reach their count together (a broadcast to
//! thousands), their moves come in waves on a proxy that is busy already.

use std::time::{Duration, Instant};

use crate::config;

/// The promotion rule of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Messages (both directions) in a run.
    pub after_messages: u64,
    /// Largest average message of a run that still counts as message traffic.
    pub max_average_message: u64,
    /// The longest a run may take: a slower one starts again.
    pub within: Duration,
}

/// The current run of messages of one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Run {
    messages: u64,
    bytes: u64,
    /// When its first read came.
    began: Option<Instant>,
}

impl Policy {
    pub fn new(cfg: &config::Relay) -> Self {
        Policy {
            after_messages: cfg.promote_after_messages,
            max_average_message: cfg.promote_max_average_message,
            within: cfg.promote_within,
        }
    }

    /// Adds a read of `n` bytes that counted as `messages` (`Frames::feed`), at `now`, to `run`;
    /// true once the connection should move. A run older than `within` starts again with this
    /// read; a full run whose average message is too large starts again after it.
    pub fn observe(&self, run: &mut Run, n: u64, messages: u64, now: Instant) -> bool {
        let began = *run.began.get_or_insert(now);
        if now.saturating_duration_since(began) > self.within {
            *run = Run {
                began: Some(now),
                ..Run::default()
            };
        }
        run.messages = run.messages.saturating_add(messages);
        run.bytes = run.bytes.saturating_add(n);
        self.due(run)
    }

    /// True when `run` shows message traffic (also for a run of no messages when
    /// `after_messages` is 0: move at the first chance).
    pub fn due(&self, run: &mut Run) -> bool {
        if run.messages < self.after_messages {
            return false;
        }
        if run.bytes <= run.messages.saturating_mul(self.max_average_message) {
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
        after_messages: 8,
        max_average_message: 16 * 1024,
        within: Duration::from_secs(1),
    };

    /// Reads of one message each, all at one instant; the index of the read after which the
    /// connection moves.
    fn feed(p: &Policy, run: &mut Run, reads: impl IntoIterator<Item = u64>) -> Option<usize> {
        let now = Instant::now();
        reads.into_iter().position(|n| p.observe(run, n, 1, now))
    }

    /// Reads of 128 B, `apart` from each other; the index of the read after which it moves.
    fn paced(p: &Policy, reads: usize, apart: Duration) -> Option<usize> {
        let (t0, mut run) = (Instant::now(), Run::default());
        (0..reads).position(|i| p.observe(&mut run, 128, 1, t0 + apart * i as u32))
    }

    #[test]
    fn a_run_must_come_within_the_window() {
        // 8 messages in 700 ms move; one every 200 ms (8 in 1.4 s) never do.
        assert_eq!(paced(&P, 100, Duration::from_millis(100)), Some(7));
        assert_eq!(paced(&P, 100, Duration::from_millis(200)), None);
        // A slow start does not hold a connection back once it speeds up: the run starts again.
        let (t0, mut run) = (Instant::now(), Run::default());
        for i in 0..5 {
            assert!(!P.observe(&mut run, 128, 1, t0 + Duration::from_secs(2 * i)));
        }
        let fast = t0 + Duration::from_secs(10);
        let moved = (0..8).position(|i| P.observe(&mut run, 128, 1, fast + Duration::from_millis(i)));
        assert_eq!(moved, Some(7));
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
        let p = Policy { after_messages: 0, ..P };
        assert!(p.due(&mut Run::default()));
    }

    #[test]
    fn no_overflow() {
        let p = Policy {
            after_messages: 1,
            max_average_message: u64::MAX,
            within: Duration::MAX,
        };
        let mut run = Run::default();
        assert!(p.observe(&mut run, u64::MAX, u64::MAX, Instant::now()));
    }

    #[test]
    fn queued_messages_read_at_once_count_each() {
        // A relay behind its sender: each read takes 10 frames of 70 B.
        let mut run = Run::default();
        let now = Instant::now();
        let moved = (0..8).position(|_| P.observe(&mut run, 700, 10, now));
        assert_eq!(moved, Some(0), "10 messages in the first read are a run of 8");
    }

    #[test]
    fn reads_inside_frames_add_bytes_and_no_message() {
        // 64 KiB frames read in 16 KiB pieces: bulk, however small the reads.
        let mut run = Run::default();
        let now = Instant::now();
        let pieces = (0..1000u64).map(|i| if i % 4 == 0 { 1 } else { 0 });
        assert_eq!(
            pieces.clone().position(|m| P.observe(&mut run, 16 * 1024, m, now)),
            None
        );
        // Small messages after them move, once a run of them is small on average.
        let mut run = Run::default();
        assert!(!P.observe(&mut run, 100, 0, now), "no message yet");
        assert_eq!((0..20).position(|_| P.observe(&mut run, 128, 1, now)), Some(7));
    }
}
