//! Socket buffer caps of the relayed sockets (`relay.client_sndbuf` and the other three).
//!
//! A peer that stops reading leaves bytes in the proxy's sockets: the send queue of the socket
//! towards it and the receive queue of the socket from the other side. Autotuned, each may grow to
//! the `net.ipv4.tcp_wmem`/`tcp_rmem` maxima (MiBs); capped, a stalled connection holds about
//! twice the caps (the kernel doubles a set value to allow for its own bookkeeping), plus the
//! kernel relay's in-flight credit. A set buffer is no longer autotuned.
//!
//! The kernel relay sets the send buffers it redirects into itself ([`for_kernel_relay`]).

use std::os::fd::AsFd;
use std::sync::OnceLock;

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

/// The host's send buffer limits: what `SO_SNDBUF` may set (`net.core.wmem_max`; the kernel
/// doubles it) and how far autotuning grows a buffer (`net.ipv4.tcp_wmem`'s maximum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendLimits {
    pub set_max: u64,
    pub autotune_max: u64,
}

impl SendLimits {
    /// Read once per process (at start-up by [`warn_of_host_limits`], else at the first
    /// kernel-relayed pair), in the network namespace of the proxy and its sockets.
    pub fn host() -> SendLimits {
        static HOST: OnceLock<SendLimits> = OnceLock::new();
        *HOST.get_or_init(|| {
            let read = |path: &str| {
                std::fs::read_to_string(path)
                    .ok()
                    .and_then(|t| t.split_whitespace().last()?.parse().ok())
            };
            // Unreadable (no /proc): Linux's defaults.
            SendLimits {
                set_max: read("/proc/sys/net/core/wmem_max").unwrap_or(212_992),
                autotune_max: read("/proc/sys/net/ipv4/tcp_wmem").unwrap_or(4 << 20),
            }
        })
    }

    /// The `SO_SNDBUF` value that gives a destination of the kernel relay room for `window`
    /// bytes (doubled by the kernel: the window's payload and the skbs' overhead), where the
    /// host allows more than autotuning reaches; `None`: autotuning reaches as far.
    pub fn for_window(self, window: u64) -> Option<usize> {
        // The kernel takes at most INT_MAX / 2 (then doubles it).
        let v = window.min(self.set_max).min(i32::MAX as u64 / 2);
        (2 * v > self.autotune_max).then_some(v as usize)
    }

    /// The largest of `windows` the relay would give beyond autotuning's reach but the host
    /// lets it give only in part, or not at all ([`Self::for_window`]).
    fn largest_short(self, windows: impl Iterator<Item = u64>) -> Option<u64> {
        windows
            .filter(|&w| 2 * w > self.autotune_max && self.for_window(w) != Some(w as usize))
            .max()
    }
}

/// Gives each socket the verdict redirects into a send buffer of the in-flight window
/// (`relay.max_in_flight_bytes`, doubled by the kernel) where the host allows it
/// ([`SendLimits::for_window`]), unless `relay.*_sndbuf` caps that buffer.
///
/// Why: the kernel's sender of redirected bytes (the destination psock's backlog worker) meets a
/// full send queue with a retry one timer tick later (4 ms at HZ=250), and the write-space
/// wake-up that comes sooner is lost while that retry is pending. An autotuned buffer (at most
/// `tcp_wmem`'s maximum, 4 MiB of true size by default) fills within a tick at bulk rates; the
/// window then fills behind it, the verdict passes, and userspace carries the stream until the
/// sender pauses (`docs/kernel-relay.md`). A stalled peer may then hold twice the window in that
/// send queue instead of the autotuned maximum. Not `SO_SNDBUFFORCE`: serving holds no
/// capability (`privileges`).
pub(super) fn for_kernel_relay(client: &impl AsFd, upstream: &impl AsFd, cfg: &config::Relay) {
    let Some(size) = SendLimits::host().for_window(cfg.max_in_flight_bytes) else {
        return;
    };
    for (side, s, capped) in [
        ("client", client.as_fd(), cfg.client_sndbuf),
        ("upstream", upstream.as_fd(), cfg.upstream_sndbuf),
    ] {
        if capped.is_none()
            && let Err(e) = setsockopt(&s, sockopt::SndBuf, &size)
        {
            debug!(side, error = %e, "kernel relay: cannot size the send buffer to the window");
        }
    }
}

/// Warns, at start-up, of kernel-relay windows the host's `net.core.wmem_max` keeps the relay
/// from giving its destinations ([`for_kernel_relay`]): bulk through those falls back to the
/// userspace relay at full speed.
pub fn warn_of_host_limits(windows: impl Iterator<Item = u64>) {
    if let Some(m) = host_limit_message(SendLimits::host(), windows) {
        tracing::warn!("{m}");
    }
}

/// What [`warn_of_host_limits`] says, if anything: also a reload's note, for a window raised
/// by the reload.
pub fn host_limit_message(host: SendLimits, windows: impl Iterator<Item = u64>) -> Option<String> {
    let w = host.largest_short(windows)?;
    Some(format!(
        "kernel relay: net.core.wmem_max ({}) is below relay.max_in_flight_bytes ({w}): the relay cannot give its \
         sockets send buffers of the window, and bulk transfers fall back to the userspace relay at full speed \
         (raise net.core.wmem_max to {w} or more)",
        host.set_max
    ))
}

#[cfg(test)]
mod tests {
    use nix::sys::socket::getsockopt;

    use super::*;

    fn sndbuf(s: &TcpStream) -> usize {
        getsockopt(&s.as_fd(), sockopt::SndBuf).unwrap()
    }

    #[test]
    fn a_window_is_given_where_the_host_allows_more_than_autotuning() {
        const MIB: u64 = 1 << 20;
        let host = |set_max, autotune_max| SendLimits { set_max, autotune_max };
        // This machine's values: the window, which the kernel doubles past autotuning's 4 MiB.
        assert_eq!(host(4 * MIB, 4 * MIB).for_window(4 * MIB), Some(4 << 20));
        // A larger window than the host lets a socket set: as much as it lets.
        assert_eq!(host(4 * MIB, 4 * MIB).for_window(64 * MIB), Some(4 << 20));
        // Linux's default wmem_max: setting it would shrink the buffer below autotuning's.
        assert_eq!(host(212_992, 4 * MIB).for_window(4 * MIB), None);
        // A small window: autotuning reaches further, and the window bounds the relay anyway.
        assert_eq!(host(4 * MIB, 4 * MIB).for_window(64 << 10), None);
        // The kernel's own bound.
        assert_eq!(
            host(u64::MAX, 4 * MIB).for_window(u64::MAX),
            Some(i32::MAX as usize / 2)
        );
    }

    #[test]
    fn windows_the_host_cuts_short_are_named() {
        let host = |set_max| SendLimits {
            set_max,
            autotune_max: 4 << 20,
        };
        let windows = || [64 << 10, 4 << 20, 16 << 20].into_iter();
        // The largest window the host cuts short, of those autotuning does not reach either.
        assert_eq!(host(212_992).largest_short(windows()), Some(16 << 20));
        assert_eq!(host(4 << 20).largest_short(windows()), Some(16 << 20));
        assert_eq!(host(16 << 20).largest_short(windows()), None);
    }

    #[test]
    fn the_message_names_the_sysctl_the_value_and_the_window() {
        let host = |set_max| SendLimits {
            set_max,
            autotune_max: 4 << 20,
        };
        let windows = || [64 << 10, 16 << 20].into_iter();
        let m = host_limit_message(host(4 << 20), windows()).unwrap();
        assert!(m.contains("net.core.wmem_max (4194304)"), "{m}");
        assert!(m.contains("relay.max_in_flight_bytes (16777216)"), "{m}");
        assert!(m.contains("raise net.core.wmem_max to 16777216 or more"), "{m}");
        assert_eq!(host_limit_message(host(16 << 20), windows()), None);
    }

    #[tokio::test]
    async fn the_kernel_relay_sizes_send_buffers_to_the_window_unless_capped() {
        let (c, u) = super::super::loopback_pair().await;
        let before = sndbuf(&c);
        let cfg = config::Relay {
            max_in_flight_bytes: 3 << 20,
            upstream_sndbuf: Some(65536),
            ..config::Relay::default()
        };
        cap(&c, &u, &cfg);
        for_kernel_relay(&c, &u, &cfg);
        match SendLimits::host().for_window(3 << 20) {
            Some(size) => assert_eq!(sndbuf(&c), 2 * size, "the window (as far as the host allows), doubled"),
            None => assert_eq!(sndbuf(&c), before, "autotuned: the host allows no more"),
        }
        assert_eq!(sndbuf(&u), 2 * 65536, "a configured cap stays");
    }
}
