//! The payload relay after the 101: one interface, with the relay that carries a connection
//! chosen per connection.
//!
//! Both relays keep the same contract: bytes are delivered untouched, once and in order; when one
//! side closes, the other is shut down for writing only after every byte already received from the
//! closing side has been delivered (half-close); a reset or error on one side closes the other at
//! once.

pub mod kernel;
pub mod userspace;

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::warn;

use crate::config::{self, RelayMode};
use crate::ebpf::KernelPrograms;

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
    /// The relay's own machinery failed (a kernel map operation); both were cut.
    Internal,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::ClientError(_) => "client error",
            End::UpstreamError(_) => "upstream error",
            End::DrainTimeout => "drain timeout",
            End::Internal => "internal error",
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

/// Totals over all relayed connections, for metrics and tests.
#[derive(Debug, Default)]
pub struct Totals {
    open: [AtomicU64; 2],
    ended: [AtomicU64; 2],
    client_to_upstream: [AtomicU64; 2],
    upstream_to_client: [AtomicU64; 2],
    fallbacks: AtomicU64,
    drain_timeouts: AtomicU64,
}

/// A copy of [`Totals`]; arrays are indexed by [`Mode`] (kernel, userspace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TotalsSnapshot {
    pub open: [u64; 2],
    pub ended: [u64; 2],
    pub client_to_upstream: [u64; 2],
    pub upstream_to_client: [u64; 2],
    /// Connections the kernel relay could not take, carried by the userspace relay instead.
    pub fallbacks: u64,
    pub drain_timeouts: u64,
}

impl Totals {
    pub fn snapshot(&self) -> TotalsSnapshot {
        let two = |a: &[AtomicU64; 2]| [a[0].load(Relaxed), a[1].load(Relaxed)];
        TotalsSnapshot {
            open: two(&self.open),
            ended: two(&self.ended),
            client_to_upstream: two(&self.client_to_upstream),
            upstream_to_client: two(&self.upstream_to_client),
            fallbacks: self.fallbacks.load(Relaxed),
            drain_timeouts: self.drain_timeouts.load(Relaxed),
        }
    }

    fn started(&self, mode: Mode) {
        self.open[mode as usize].fetch_add(1, Relaxed);
    }

    fn ended(&self, o: &Outcome) {
        let m = o.mode as usize;
        self.open[m].fetch_sub(1, Relaxed);
        self.ended[m].fetch_add(1, Relaxed);
        self.client_to_upstream[m].fetch_add(o.client_to_upstream, Relaxed);
        self.upstream_to_client[m].fetch_add(o.upstream_to_client, Relaxed);
        if o.end == End::DrainTimeout {
            self.drain_timeouts.fetch_add(1, Relaxed);
        }
    }
}

/// Relays between the two sockets until both sides have closed or one failed, in the kernel
/// when the configuration and the loaded programs allow it.
pub async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    programs: Option<&KernelPrograms>,
    cfg: &config::Relay,
    totals: &Totals,
) -> Outcome {
    let (client, upstream) = match programs.filter(|_| cfg.mode != RelayMode::Userspace) {
        Some(programs) => {
            totals.started(Mode::Kernel);
            match kernel::relay(client, upstream, programs, cfg).await {
                Ok(o) => {
                    totals.ended(&o);
                    return o;
                }
                Err((client, upstream, e)) => {
                    totals.open[Mode::Kernel as usize].fetch_sub(1, Relaxed);
                    totals.fallbacks.fetch_add(1, Relaxed);
                    warn!(error = %format!("{e:#}"), "kernel relay: cannot take the connection, relaying it in userspace");
                    (client, upstream)
                }
            }
        }
        None => (client, upstream),
    };
    totals.started(Mode::Userspace);
    let o = userspace::relay(client, upstream).await;
    totals.ended(&o);
    o
}

/// Makes the next close of `s` send a reset: passing an abort on tells the surviving peer the
/// stream did not end cleanly, and discards whatever would otherwise still be delivered.
pub(crate) fn reset_on_close(s: &impl AsFd) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // Failure only means a FIN instead of a reset; nothing to recover.
    let _ = nix::sys::socket::setsockopt(&s.as_fd(), nix::sys::socket::sockopt::Linger, &linger);
}
