//! Ports for processes that bind them themselves (the `wsproxy` binary from a configuration
//! file, `redis-server`, HAProxy), where the harness cannot hand over a bound listener.
//!
//! A port from `bind(":0")` is an ephemeral one: once that listener is closed, the kernel may give
//! the same port to the next `connect` of any test running alongside as its local port, and the
//! process told to bind it then fails with "Address already in use" (a CI run saw exactly that).
//! So the ports come from outside the ephemeral range (`net.ipv4.ip_local_port_range`, which
//! IPv6 uses as well), where no `connect` ever takes one: only an explicit bind can hold such a
//! port, and each is checked free by binding it on every address first. Each call of a process
//! gets another port, and processes start far apart (by pid), so that test binaries running at
//! the same time do not pick the same one.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out (the well-known and registered ports below belong to services).
const LOWEST: u16 = 10_000;

/// Calls made so far by this process.
static TAKEN: AtomicU32 = AtomicU32::new(0);

/// A port nothing is bound to now, outside the kernel's ephemeral range: see the module's text.
pub fn free_port() -> u16 {
    let range = ephemeral_range();
    let (first, count) = outside_ephemeral(&range);
    assert!(
        count > 0,
        "no port from {LOWEST} lies outside the ephemeral range {range:?}"
    );
    let start = std::process::id().wrapping_mul(7_919) % count;
    let candidates = (0..count).map(|_| {
        let n = TAKEN.fetch_add(1, Ordering::Relaxed);
        first + (start.wrapping_add(n) % count) as u16
    });
    first_free(candidates).unwrap_or_else(|| panic!("no free port among {count} from {first}"))
}

/// The first of `ports` that binds on the wildcard address (which fails if the port is bound on
/// any address).
fn first_free(ports: impl IntoIterator<Item = u16>) -> Option<u16> {
    ports
        .into_iter()
        .find(|&p| TcpListener::bind((Ipv4Addr::UNSPECIFIED, p)).is_ok())
}

/// The kernel's ephemeral range, `(low, high)` inclusive; Linux's default when it cannot be read.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

/// The larger run of ports, from [`LOWEST`], below or above the ephemeral range `(low, high)`:
/// `(first, count)`.
fn outside_ephemeral(&(low, high): &(u16, u16)) -> (u16, u32) {
    let below = u32::from(low.saturating_sub(LOWEST));
    // Past the range, and never below LOWEST; 65,536 when the range reaches the last port.
    let after = u32::from(high.max(LOWEST - 1)) + 1;
    let above = (1 << 16) - after;
    if below >= above {
        (LOWEST, below)
    } else {
        (after as u16, above)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_outside_the_ephemeral_range() {
        assert_eq!(outside_ephemeral(&(32_768, 60_999)), (10_000, 22_768));
        // A range starting low leaves the ports above it.
        assert_eq!(outside_ephemeral(&(1_024, 50_000)), (50_001, 15_535));
        assert_eq!(outside_ephemeral(&(12_000, 60_999)), (61_000, 4_536));
        let (low, high) = ephemeral_range();
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        for p in &ports {
            assert!(!(low..=high).contains(p), "{p} is in the ephemeral range {low}-{high}");
            assert!(*p >= LOWEST, "{p}");
        }
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "a port handed out twice: {ports:?}");
    }

    #[test]
    fn a_port_bound_on_one_address_is_skipped() {
        let held = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let busy = held.local_addr().unwrap().port();
        let free = free_port();
        assert_eq!(first_free([busy, free]), Some(free));
    }
}
