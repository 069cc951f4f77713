//! How a relayed connection went: which relay carried it, how it ended, what it moved. One type
//! for the relays, the metrics and the logs, outside all three and importing nothing of theirs:
//! the metrics count it without importing the relay, and the relay reports to the metrics.

use std::io;
use std::time::Duration;

/// Which relay carried a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Kernel,
    Userspace,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Kernel => "kernel",
            Mode::Userspace => "userspace",
        }
    }
}

/// Which side ended the relay, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed in turn; every byte was delivered.
    Closed,
    /// The client side failed (reset, error); the upstream side was cut at once.
    ClientError(io::ErrorKind),
    /// The upstream side failed; the client side was cut at once.
    UpstreamError(io::ErrorKind),
    /// After one side closed, the other did not take the remaining bytes within the drain
    /// timeout; both were cut.
    DrainTimeout,
    /// Nothing was relayed either way for the configured idle timeout; both were closed.
    IdleTimeout,
    /// A peer took no byte for the configured send timeout while bytes waited for it; both
    /// were cut.
    SendTimeout,
    /// Still open when the proxy's shutdown drain ended; both were cut.
    Shutdown,
    /// Open for `relay.max_lifetime` (and its jitter); both were cut.
    MaxLifetime,
    /// The relay's own machinery failed (a kernel map operation); both were cut.
    Internal,
    /// The kernel relay could not keep one direction's bytes in order (an skb that neither
    /// followed on from the last nor could be cut to); both were cut before a wrong byte was
    /// delivered.
    StreamFault,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::ClientError(_) => "client error",
            End::UpstreamError(_) => "upstream error",
            End::DrainTimeout => "drain timeout",
            End::IdleTimeout => "idle timeout",
            End::SendTimeout => "send timeout",
            End::Shutdown => "shutdown",
            End::MaxLifetime => "max lifetime",
            End::Internal => "internal error",
            End::StreamFault => "stream fault",
        }
    }
}

/// Why the kernel relay did not take a connection it was given (the userspace relay carries it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// A side had closed before the sockets went into the map (which takes established sockets
    /// only): ordinary for a peer that closes right after the 101 or right after a promotion.
    PeerClosed,
    /// The kernel refused the pair (a map operation failed).
    Refused,
}

impl Fallback {
    pub const ALL: [Fallback; 2] = [Fallback::PeerClosed, Fallback::Refused];

    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::PeerClosed => "peer_closed",
            Fallback::Refused => "refused",
        }
    }
}

/// What one relayed connection did.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub mode: Mode,
    pub end: End,
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    /// Bytes the kernel handed the kernel relay's verdict a second time, which it cut (both
    /// directions; always 0 in userspace).
    pub repeated_cut: u64,
    /// Bytes the kernel relay's verdict left to userspace because a destination fell behind its
    /// window (or was not yet in the map), which userspace then forwarded (both directions;
    /// always 0 in userspace).
    pub passed: u64,
    pub duration: Duration,
}

impl Outcome {
    /// The end of a connection whose bytes were copied by userspace only (no verdict counters).
    pub fn copied(
        mode: Mode,
        end: End,
        (client_to_upstream, upstream_to_client): (u64, u64),
        duration: Duration,
    ) -> Outcome {
        Outcome {
            mode,
            end,
            client_to_upstream,
            upstream_to_client,
            repeated_cut: 0,
            passed: 0,
            duration,
        }
    }
}
