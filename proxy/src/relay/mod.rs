//! The payload relay after the 101: one interface, with the relay that carries a connection
//! chosen per connection.
//!
//! Both relays keep the same contract: bytes are delivered untouched, once and in order; when one
//! side closes, the other is shut down for writing only after every byte already received from the
//! closing side has been delivered (half-close); a reset or error on one side closes the other at
//! once.

pub mod userspace;

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

/// Which relay carried a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Userspace,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
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
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::ClientError(_) => "client error",
            End::UpstreamError(_) => "upstream error",
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
    pub duration: Duration,
}

/// Relays between the two sockets until both sides have closed or one failed.
pub async fn relay(client: TcpStream, upstream: TcpStream) -> Outcome {
    userspace::relay(client, upstream).await
}
