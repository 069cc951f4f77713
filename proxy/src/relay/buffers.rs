//! Socket buffer caps of the relayed sockets (`relay.client_sndbuf` and the other three).
//!
//! A peer that stops reading leaves bytes in the proxy's sockets: the send queue of the socket
//! towards it and the receive queue of the socket from the other side. Autotuned, each may grow to
//! the `net.ipv4.tcp_wmem`/`tcp_rmem` maxima (MiBs); capped, a stalled connection holds about
//! twice the caps (the kernel doubles a set value to allow for its own bookkeeping), plus the
//! kernel relay's in-flight credit. A set buffer is no longer autotuned.

use std::os::fd::AsFd;

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::TcpStream;
use tracing::debug;

use crate::config;

/// Applies the configured caps to both sockets before the relay starts. Best effort: a socket
/// whose buffer cannot be set still relays, with the kernel's own sizes.
pub(super) fn cap(client: &TcpStream, upstream: &TcpStream, cfg: &config::Relay) {
    for (side, s, snd, rcv) in [
        ("client", client, cfg.client_sndbuf, cfg.client_rcvbuf),
        ("upstream", upstream, cfg.upstream_sndbuf, cfg.upstream_rcvbuf),
    ] {
        let fd = s.as_fd();
        if let Some(b) = snd
            && let Err(e) = setsockopt(&fd, sockopt::SndBuf, &(b as usize))
        {
            debug!(side, error = %e, "relay: cannot cap the send buffer");
        }
        if let Some(b) = rcv
            && let Err(e) = setsockopt(&fd, sockopt::RcvBuf, &(b as usize))
        {
            debug!(side, error = %e, "relay: cannot cap the receive buffer");
        }
    }
}
