//! Per-client admission: a token bucket of handshake requests and a cap on open connections,
//! and a cap on the open connections of a whole network (an IPv4 /24, an IPv6 /48 by default).
//!
//! A client is an IPv4 address, or an IPv6 prefix (a single host usually owns a whole /64, so
//! keying by full address would let it multiply its quota). The table is bounded: an entry whose
//! bucket is full again and that holds no connection carries no information and may be dropped;
//! when the table is at its cap such entries are swept, and if none can be, new clients are
//! refused rather than letting a flood of source addresses grow memory.
//!
//! These are the node's own limits, the first and free line. The limits a fleet of nodes shares
//! (`[cluster]`, see `cluster`) come after them, for the clients admitted here; a connection
//! holds its lease next to its [`Slot`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config;

/// Why a client was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over the request rate; a token is due after `retry_after`.
    RateLimited { retry_after: Duration },
    /// Already holding `max_connections_per_ip` connections.
    TooManyConnections,
    /// The client's network already holds `max_connections_per_network` connections.
    TooManyFromNetwork,
    /// The client table is full of clients that are still being limited.
    TableFull,
    /// The service already holds `limits.max_connections` connections (all clients together).
    ServiceFull,
    /// The cluster store cannot be asked, and `cluster.on_store_error = "deny"`.
    StoreUnavailable,
}

/// The key under which a client is limited (on this node and in the cluster store alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl ClientKey {
    pub fn new(ip: IpAddr, ipv6_prefix: u8) -> Self {
        Self::of_prefix(ip, 32, ipv6_prefix)
    }

    /// The network of `ip`: its first `v4` or `v6` bits.
    pub fn of_prefix(ip: IpAddr, v4: u8, v6: u8) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(a) => {
                let mask = if v4 >= 32 { u32::MAX } else { !(u32::MAX >> v4) };
                ClientKey(IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask)))
            }
            IpAddr::V6(a) => {
                let mask = if v6 >= 128 { u128::MAX } else { !(u128::MAX >> v6) };
                ClientKey(IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask)))
            }
        }
    }
}

#[derive(Debug)]
struct Entry {
    tokens: f64,
    refilled: Instant,
    open: u32,
}

#[derive(Debug)]
struct Table {
    /// Kept with the table so a reload changes both under one lock.
    cfg: config::Limits,
    clients: HashMap<ClientKey, Entry>,
    /// Open connections per network; an entry exists only while it holds one, so the map is no
    /// larger than the connections open.
    networks: HashMap<ClientKey, u32>,
    /// Connections open through this limiter (a service's), against `max_connections`.
    open: u32,
    last_sweep: Option<Instant>,
}

/// Admission state shared by all connections.
#[derive(Debug)]
pub struct Limiter {
    table: Mutex<Table>,
}

/// Minimum time between two sweeps of a full table: a sweep walks every entry, and a flood of new
/// addresses must not make each accept pay for that.
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

impl Limiter {
    pub fn new(cfg: config::Limits) -> Arc<Self> {
        Arc::new(Self {
            table: Mutex::new(Table {
                cfg,
                clients: HashMap::new(),
                networks: HashMap::new(),
                open: 0,
                last_sweep: None,
            }),
        })
    }

    /// New limits (reload). Clients keep their state: a reload is no way around a limit.
    pub fn reconfigure(&self, cfg: config::Limits) {
        let mut table = self.lock();
        if table.cfg.ipv6_prefix != cfg.ipv6_prefix {
            // Keys of another prefix length would never match again.
            table.clients.retain(|_, e| e.open > 0);
        }
        table.cfg = cfg;
    }

    /// Counts one handshake request of `ip` and, when admitted, holds one of its connection slots
    /// until the returned guard is dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Slot, Refusal> {
        let mut table = self.lock();
        let cfg = table.cfg.clone();
        // The service's own cap first: past it, no client is admitted, and none is charged a
        // token for a refusal that is not its doing.
        if cfg.max_connections != 0 && table.open >= cfg.max_connections {
            return Err(Refusal::ServiceFull);
        }
        let key = ClientKey::new(ip, cfg.ipv6_prefix);
        if !table.clients.contains_key(&key) && table.clients.len() >= cfg.max_tracked_clients {
            Self::sweep(&mut table, now);
            if table.clients.len() >= cfg.max_tracked_clients {
                return Err(Refusal::TableFull);
            }
        }
        let burst = f64::from(cfg.burst);
        let rate = cfg.requests_per_second;
        let e = table.clients.entry(key).or_insert(Entry {
            tokens: burst,
            refilled: now,
            open: 0,
        });
        let elapsed = now.saturating_duration_since(e.refilled).as_secs_f64();
        e.tokens = (e.tokens + elapsed * rate).min(burst);
        e.refilled = now;
        if e.tokens < 1.0 {
            let wait = Duration::from_secs_f64((1.0 - e.tokens) / rate);
            return Err(Refusal::RateLimited { retry_after: wait });
        }
        e.tokens -= 1.0;
        if cfg.max_connections_per_ip != 0 && e.open >= cfg.max_connections_per_ip {
            return Err(Refusal::TooManyConnections);
        }
        let network = ClientKey::of_prefix(ip, cfg.network_prefix_v4, cfg.network_prefix_v6);
        let held = table.networks.get(&network).copied().unwrap_or(0);
        if cfg.max_connections_per_network != 0 && held >= cfg.max_connections_per_network {
            return Err(Refusal::TooManyFromNetwork);
        }
        *table.networks.entry(network).or_default() += 1;
        table.open += 1;
        if let Some(e) = table.clients.get_mut(&key) {
            e.open += 1;
        }
        Ok(Slot {
            limiter: Arc::clone(self),
            key,
            network,
        })
    }

    /// Number of clients currently tracked.
    pub fn tracked(&self) -> usize {
        self.lock().clients.len()
    }

    fn sweep(table: &mut Table, now: Instant) {
        if table
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_INTERVAL)
        {
            return;
        }
        table.last_sweep = Some(now);
        let burst = f64::from(table.cfg.burst);
        let rate = table.cfg.requests_per_second;
        table.clients.retain(|_, e| {
            let tokens = e.tokens + now.saturating_duration_since(e.refilled).as_secs_f64() * rate;
            e.open > 0 || tokens < burst
        });
    }

    /// Counts a connection admitted elsewhere (by a predecessor process): it holds a slot of
    /// its client, its network and the service, with no token charged and no cap checked (it
    /// is open already).
    pub fn adopt(self: &Arc<Self>, ip: IpAddr) -> Slot {
        let mut table = self.lock();
        let cfg = table.cfg.clone();
        let key = ClientKey::new(ip, cfg.ipv6_prefix);
        let network = ClientKey::of_prefix(ip, cfg.network_prefix_v4, cfg.network_prefix_v6);
        let now = Instant::now();
        table
            .clients
            .entry(key)
            .or_insert(Entry {
                tokens: f64::from(cfg.burst),
                refilled: now,
                open: 0,
            })
            .open += 1;
        *table.networks.entry(network).or_default() += 1;
        table.open += 1;
        Slot {
            limiter: Arc::clone(self),
            key,
            network,
        }
    }

    /// Every client's token bucket (for a successor process).
    pub fn export(&self, now: Instant) -> Vec<crate::upgrade::ClientState> {
        self.lock()
            .clients
            .iter()
            .map(|(k, e)| crate::upgrade::ClientState {
                key: k.0,
                tokens: e.tokens,
                age_ms: now.saturating_duration_since(e.refilled).as_millis() as u64,
            })
            .collect()
    }

    /// A predecessor's token buckets: each client keeps the tokens it had, refilled from when
    /// they were last (open counts come with the connections, [`Limiter::adopt`]).
    pub fn import(&self, clients: &[crate::upgrade::ClientState], now: Instant) {
        let mut table = self.lock();
        let burst = f64::from(table.cfg.burst);
        for c in clients {
            if table.clients.len() >= table.cfg.max_tracked_clients {
                break;
            }
            let refilled = now
                .checked_sub(std::time::Duration::from_millis(c.age_ms))
                .unwrap_or(now);
            let e = table.clients.entry(ClientKey(c.key)).or_insert(Entry {
                tokens: burst,
                refilled,
                open: 0,
            });
            e.tokens = c.tokens.clamp(0.0, burst);
            e.refilled = refilled;
        }
    }

    /// Connections open through this limiter.
    pub fn open(&self) -> u32 {
        self.lock().open
    }

    fn release(&self, key: &ClientKey, network: &ClientKey) {
        let mut table = self.lock();
        table.open = table.open.saturating_sub(1);
        if let Some(e) = table.clients.get_mut(key) {
            e.open = e.open.saturating_sub(1);
        }
        if let Some(n) = table.networks.get_mut(network) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                table.networks.remove(network);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave the table inconsistent (each update is a
        // few field writes), so a poisoned lock is still usable.
        crate::lock::lock(&self.table)
    }
}

/// One open connection of a client; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    limiter: Arc<Limiter>,
    key: ClientKey,
    network: ClientKey,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limiter.release(&self.key, &self.network);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rps: f64, burst: u32, per_ip: u32, max_tracked: usize) -> Arc<Limiter> {
        Limiter::new(config::Limits {
            requests_per_second: rps,
            burst,
            max_connections_per_ip: per_ip,
            ipv6_prefix: 64,
            max_tracked_clients: max_tracked,
            ..Default::default()
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_service_cap_holds_for_all_clients_together() {
        let l = Limiter::new(config::Limits {
            max_connections: 2,
            ..Default::default()
        });
        let t0 = Instant::now();
        let a = l.admit(ip("10.0.0.1"), t0).unwrap();
        let _b = l.admit(ip("10.9.0.2"), t0).unwrap();
        assert_eq!(l.admit(ip("10.8.0.3"), t0).unwrap_err(), Refusal::ServiceFull);
        assert_eq!(l.open(), 2);
        drop(a);
        assert!(l.admit(ip("10.8.0.3"), t0).is_ok());
    }

    #[test]
    fn bucket_allows_burst_then_refills_at_rate() {
        let l = limiter(2.0, 3, 0, 10);
        let t0 = Instant::now();
        let slots: Vec<_> = (0..3).map(|_| l.admit(ip("10.0.0.1"), t0).unwrap()).collect();
        match l.admit(ip("10.0.0.1"), t0) {
            Err(Refusal::RateLimited { retry_after }) => assert_eq!(retry_after, Duration::from_millis(500)),
            other => panic!("{other:?}"),
        }
        // Another client has its own bucket.
        assert!(l.admit(ip("10.0.0.2"), t0).is_ok());
        // Half a second at 2/s gives one token back.
        assert!(l.admit(ip("10.0.0.1"), t0 + Duration::from_millis(500)).is_ok());
        assert!(l.admit(ip("10.0.0.1"), t0 + Duration::from_millis(500)).is_err());
        drop(slots);
    }

    #[test]
    fn connection_cap_is_released_by_the_guard() {
        let l = limiter(1000.0, 1000, 2, 10);
        let t = Instant::now();
        let a = l.admit(ip("10.0.0.1"), t).unwrap();
        let _b = l.admit(ip("10.0.0.1"), t).unwrap();
        assert_eq!(l.admit(ip("10.0.0.1"), t).unwrap_err(), Refusal::TooManyConnections);
        drop(a);
        assert!(l.admit(ip("10.0.0.1"), t).is_ok());
    }

    #[test]
    fn ipv6_clients_share_their_prefix() {
        let l = limiter(1.0, 1, 0, 10);
        let t = Instant::now();
        let _a = l.admit(ip("2001:db8:1:2::1"), t).unwrap();
        assert!(matches!(
            l.admit(ip("2001:db8:1:2:ffff::9"), t),
            Err(Refusal::RateLimited { .. })
        ));
        assert!(
            l.admit(ip("2001:db8:1:3::1"), t).is_ok(),
            "another /64 is another client"
        );
        // An IPv4-mapped address is the IPv4 client.
        let _c = l.admit(ip("10.1.1.1"), t).unwrap();
        assert!(l.admit(ip("::ffff:10.1.1.1"), t).is_err());
    }

    #[test]
    fn table_is_bounded_and_idle_entries_expire() {
        let l = limiter(10.0, 2, 0, 100);
        let t0 = Instant::now();
        for i in 0..100u32 {
            drop(
                l.admit(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + i)), t0)
                    .unwrap(),
            );
        }
        assert_eq!(l.tracked(), 100);
        // Full of clients still being limited: a newcomer is refused, memory does not grow.
        assert_eq!(l.admit(ip("11.0.0.1"), t0).unwrap_err(), Refusal::TableFull);
        assert_eq!(l.tracked(), 100);
        // Once their buckets are full again (0.1 s at 10/s), the entries are swept.
        let later = t0 + Duration::from_secs(1);
        assert!(l.admit(ip("11.0.0.1"), later).is_ok());
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn clients_holding_connections_are_never_swept() {
        let l = limiter(10.0, 2, 0, 1);
        let t0 = Instant::now();
        let held = l.admit(ip("10.0.0.1"), t0).unwrap();
        let later = t0 + Duration::from_secs(60);
        assert_eq!(l.admit(ip("10.0.0.2"), later).unwrap_err(), Refusal::TableFull);
        drop(held);
        // The sweep interval has not passed since the last sweep at `later`.
        assert_eq!(l.admit(ip("10.0.0.2"), later).unwrap_err(), Refusal::TableFull);
        assert!(l.admit(ip("10.0.0.2"), later + SWEEP_INTERVAL).is_ok());
    }

    #[test]
    fn a_network_cap_counts_every_address_of_the_prefix() {
        let l = Limiter::new(config::Limits {
            max_connections_per_network: 2,
            ..Default::default()
        });
        let t = Instant::now();
        let a = l.admit(ip("198.51.100.1"), t).unwrap();
        let _b = l.admit(ip("198.51.100.2"), t).unwrap();
        assert_eq!(l.admit(ip("198.51.100.3"), t).unwrap_err(), Refusal::TooManyFromNetwork);
        assert!(l.admit(ip("198.51.101.1"), t).is_ok(), "another /24");
        // IPv6: the /48 counts, though each /64 is a client of its own.
        let _c = l.admit(ip("2001:db8:1:1::1"), t).unwrap();
        let _d = l.admit(ip("2001:db8:1:2::1"), t).unwrap();
        assert_eq!(
            l.admit(ip("2001:db8:1:3::1"), t).unwrap_err(),
            Refusal::TooManyFromNetwork
        );
        drop(a);
        assert!(l.admit(ip("198.51.100.3"), t).is_ok(), "released with the slot");
        // Held now: one in 198.51.100.0/24 and two in 2001:db8:1::/48; the others were dropped.
        assert_eq!(
            l.lock().networks.len(),
            2,
            "entries only for networks holding connections"
        );
    }
}
