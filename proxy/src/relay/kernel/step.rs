//! The states of one direction of the kernel relay, and what it does next: a pure function of
//! its phase and what it just saw, so that every transition is tested without root or sockets.
//!
//! While the verdict redirects, a direction only waits: it is woken when the verdict passed bytes
//! to userspace (the destination fell a window behind), at EOF, or on an error. [`next`] turns
//! what a read then found into the next action.

use std::io;

/// Where a direction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The kernel moves the bytes; wait until the source is readable.
    Relaying,
    /// EOF is readable, but bytes the verdict passed are still on their way into the receive
    /// queue (nothing wakes the direction for them): look again after a pause.
    AwaitingPassed,
    /// EOF passed on as a FIN: the direction is over.
    Done,
}

/// What a read of the source found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Passed bytes, for userspace to forward.
    Bytes(usize),
    /// End of stream: the source's peer sent its FIN, or (once the kernel has taken the
    /// socket's pending error) was reset.
    Eof,
    /// Nothing to read (yet).
    Nothing,
    /// The read failed (a reset).
    Failed(io::ErrorKind),
}

/// What the direction knows besides the read, looked up only when a decision needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seen {
    /// Bytes the verdict passed to userspace from this source, and bytes userspace forwarded.
    pub passed: u64,
    pub forwarded: u64,
    /// The verdict met bytes it could not put in order.
    pub broken: bool,
    /// The source's connection is closed although this relay never shut it down: only a reset
    /// gets it there (after a FIN it waits in CLOSE_WAIT for this relay's own).
    pub source_reset: bool,
    /// The drain timeout has run out since the source's peer closed.
    pub drain_expired: bool,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Wait for the next wake-up.
    Wait,
    /// Write `n` passed bytes to the destination once it has taken every redirected byte
    /// before them, then report them forwarded.
    Forward(usize),
    /// Pause, then read again (phase [`Phase::AwaitingPassed`]).
    PauseAndRead,
    /// Wait until the destination has taken every byte of this direction, then shut it down
    /// for writing (phase [`Phase::Done`] after).
    PassFin,
    /// End the pair.
    Fail(Failure),
}

/// Why a direction ends the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The source's connection failed.
    Source(io::ErrorKind),
    /// The destination did not take the bytes within the drain timeout.
    DrainTimeout,
    /// The verdict could not keep the source's bytes in order; they must not be forwarded.
    Stream,
}

/// The next phase and action after a read in `phase` found `read`.
pub fn next(phase: Phase, read: Read, seen: Seen) -> (Phase, Action) {
    use Action::*;
    match (phase, read) {
        (Phase::Done, _) => (Phase::Done, Wait),
        (_, Read::Failed(kind)) => (phase, Fail(Failure::Source(kind))),
        // The verdict counts a pass before the bytes are readable, and wakes the direction only
        // when nothing was waiting before: bytes counted but not yet readable are read after a
        // pause, never waited for.
        (Phase::Relaying, Read::Nothing) if seen.passed > seen.forwarded => (Phase::Relaying, PauseAndRead),
        (Phase::Relaying, Read::Nothing) => (Phase::Relaying, Wait),
        // EOF is already readable: nothing else will wake the direction.
        (Phase::AwaitingPassed, Read::Nothing) => (phase, PauseAndRead),
        // The verdict counts a broken skb before its bytes become readable.
        (_, Read::Bytes(_) | Read::Eof) if seen.broken => (phase, Fail(Failure::Stream)),
        (_, Read::Bytes(n)) => (phase, Forward(n)),
        // Passed bytes can still be in the kernel's backlog when EOF is readable: they first.
        (_, Read::Eof) if seen.passed > seen.forwarded => {
            if seen.drain_expired {
                (phase, Fail(Failure::DrainTimeout))
            } else {
                (Phase::AwaitingPassed, PauseAndRead)
            }
        }
        (_, Read::Eof) if seen.source_reset => (phase, Fail(Failure::Source(io::ErrorKind::ConnectionReset))),
        (_, Read::Eof) => (Phase::Done, PassFin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: Seen = Seen {
        passed: 0,
        forwarded: 0,
        broken: false,
        source_reset: false,
        drain_expired: false,
    };

    #[test]
    fn nothing_to_read_waits_for_the_next_wake_up() {
        assert_eq!(
            next(Phase::Relaying, Read::Nothing, QUIET),
            (Phase::Relaying, Action::Wait)
        );
    }

    #[test]
    fn passed_bytes_not_yet_readable_are_read_after_a_pause() {
        let coming = Seen {
            passed: 10,
            forwarded: 4,
            ..QUIET
        };
        assert_eq!(
            next(Phase::Relaying, Read::Nothing, coming),
            (Phase::Relaying, Action::PauseAndRead)
        );
    }

    #[test]
    fn a_pass_while_redirecting_is_forwarded() {
        let seen = Seen { passed: 100, ..QUIET };
        assert_eq!(
            next(Phase::Relaying, Read::Bytes(100), seen),
            (Phase::Relaying, Action::Forward(100))
        );
    }

    #[test]
    fn a_half_close_passes_the_fin_on() {
        // Either direction: the decision is the same for both.
        assert_eq!(next(Phase::Relaying, Read::Eof, QUIET), (Phase::Done, Action::PassFin));
        let forwarded_all = Seen {
            passed: 10,
            forwarded: 10,
            ..QUIET
        };
        assert_eq!(
            next(Phase::Relaying, Read::Eof, forwarded_all),
            (Phase::Done, Action::PassFin)
        );
    }

    #[test]
    fn eof_before_the_last_passed_bytes_waits_for_them() {
        let behind = Seen {
            passed: 10,
            forwarded: 4,
            ..QUIET
        };
        assert_eq!(
            next(Phase::Relaying, Read::Eof, behind),
            (Phase::AwaitingPassed, Action::PauseAndRead)
        );
        assert_eq!(
            next(Phase::AwaitingPassed, Read::Nothing, behind),
            (Phase::AwaitingPassed, Action::PauseAndRead)
        );
        assert_eq!(
            next(Phase::AwaitingPassed, Read::Bytes(6), behind),
            (Phase::AwaitingPassed, Action::Forward(6))
        );
        let caught_up = Seen {
            forwarded: 10,
            ..behind
        };
        assert_eq!(
            next(Phase::AwaitingPassed, Read::Eof, caught_up),
            (Phase::Done, Action::PassFin)
        );
    }

    #[test]
    fn the_drain_timeout_ends_a_wait_for_passed_bytes() {
        let stuck = Seen {
            passed: 10,
            forwarded: 4,
            drain_expired: true,
            ..QUIET
        };
        assert_eq!(
            next(Phase::AwaitingPassed, Read::Eof, stuck),
            (Phase::AwaitingPassed, Action::Fail(Failure::DrainTimeout))
        );
    }

    #[test]
    fn a_reset_ends_the_pair_whether_read_as_an_error_or_as_eof() {
        let kind = io::ErrorKind::ConnectionReset;
        assert_eq!(
            next(Phase::Relaying, Read::Failed(kind), QUIET).1,
            Action::Fail(Failure::Source(kind))
        );
        // The kernel's redirect into the reset socket took its pending error: the read finds EOF.
        let reset = Seen {
            source_reset: true,
            ..QUIET
        };
        assert_eq!(
            next(Phase::Relaying, Read::Eof, reset).1,
            Action::Fail(Failure::Source(kind))
        );
    }

    #[test]
    fn bytes_out_of_order_are_never_forwarded() {
        let broken = Seen { broken: true, ..QUIET };
        for read in [Read::Bytes(5), Read::Eof] {
            assert_eq!(next(Phase::Relaying, read, broken).1, Action::Fail(Failure::Stream));
        }
    }

    #[test]
    fn done_stays_done() {
        assert_eq!(next(Phase::Done, Read::Eof, QUIET), (Phase::Done, Action::Wait));
    }
}
