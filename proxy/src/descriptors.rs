//! The descriptor budget of client connections. Every client connection holds two descriptors
//! (its socket and, from the handshake on, its upstream's), and clients decide how many they
//! open; the admin listener and the proxy's own work (health probes, reading the configuration
//! on reload) need descriptors too, and must get them while clients hold every one they can.
//!
//! So at start the proxy takes the soft `RLIMIT_NOFILE`, subtracts the descriptors already open
//! and a reserve ([`reserve`]), and lets client connections use only the rest: the accept loop
//! stops accepting (and says so, at most once a second) while that many are open, exactly as at
//! `listen.max_connections`.

use std::io;

/// Descriptors a client connection holds: its socket and its upstream's.
pub const PER_CLIENT: u64 = 2;

/// Descriptors kept for everything that is neither a client connection nor the admin listener:
/// upstream probes beyond one per upstream, reading the configuration file or the token on a
/// reload, the runtime's own. A limit too low for the whole of it keeps an eighth of itself.
pub const SPARE: u64 = 32;

/// Descriptors kept out of the clients' reach: the admin listener's connections (and one more
/// for a connection it is refusing), one per upstream (an active probe), and [`SPARE`] (at most
/// an eighth of `limit`).
pub fn reserve(limit: u64, admin_connections: Option<usize>, upstreams: usize) -> u64 {
    let admin = admin_connections.map_or(0, |n| n as u64 + 1);
    admin + upstreams as u64 + SPARE.min(limit / 8)
}

/// How many client connections may be open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The soft `RLIMIT_NOFILE`.
    pub limit: u64,
    /// Descriptors open when the budget was made.
    pub open: u64,
    /// Descriptors no client connection may take.
    pub reserve: u64,
    /// Client connections that fit in the rest (at least 1, so that a proxy with too low a limit
    /// still serves, one client at a time).
    pub clients: usize,
}

impl Budget {
    pub fn new(limit: u64, open: u64, reserve: u64) -> Budget {
        let free = limit.saturating_sub(open).saturating_sub(reserve);
        let clients = usize::try_from(free / PER_CLIENT).unwrap_or(usize::MAX).max(1);
        Budget {
            limit,
            open,
            reserve,
            clients,
        }
    }

    /// The budget of this process now.
    pub fn now(admin_connections: Option<usize>, upstreams: usize) -> io::Result<Budget> {
        let limit = nofile()?;
        Ok(Budget::new(
            limit,
            open()?,
            reserve(limit, admin_connections, upstreams),
        ))
    }
}

/// The soft `RLIMIT_NOFILE` (`u64::MAX` when unlimited).
pub fn nofile() -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit};
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    Ok(soft)
}

/// Descriptors open in this process.
pub fn open() -> io::Result<u64> {
    // The directory's own descriptor is among the entries while it is read.
    let n = std::fs::read_dir("/proc/self/fd")?.count() as u64;
    Ok(n.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_holds_the_admin_connections_the_probes_and_the_spare() {
        assert_eq!(reserve(4096, Some(64), 2), 65 + 2 + SPARE);
        assert_eq!(reserve(4096, None, 1), 1 + SPARE);
        // A tiny limit keeps an eighth of itself as the spare.
        assert_eq!(reserve(64, None, 1), 1 + 8);
    }

    #[test]
    fn clients_get_what_is_left_two_descriptors_each() {
        let b = Budget::new(4096, 20, 99);
        assert_eq!(b.clients, (4096 - 20 - 99) / 2);
        // Never zero: too low a limit still serves one client at a time.
        assert_eq!(Budget::new(64, 60, 40).clients, 1);
        assert!(Budget::new(u64::MAX, 20, 99).clients > 1 << 40);
    }

    #[test]
    fn this_process_has_a_limit_and_open_descriptors() {
        let b = Budget::now(Some(64), 1).unwrap();
        assert!(b.open >= 3, "{b:?}");
        assert!(b.limit > b.open, "{b:?}");
    }
}
