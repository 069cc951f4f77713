//! Choice of upstream for a client: by a consistent hash of its address (the default), in turn,
//! or by the fewest open connections. Whatever picks the first upstream, the others follow as
//! the client's failover order, main ones before backup ones.
//!
//! The hash is weighted rendezvous hashing with a fixed seed. Each upstream gets a score from a
//! hash of (client IP, upstream address); the client's order of upstreams is by score, which is
//! both its choice and its failover order. The seed is a constant, so every proxy instance,
//! before and after a restart, orders a client's upstreams the same way. An upstream is named by
//! its address, so removing one moves only the clients whose first choice it was, and
//! reordering the config file moves nobody. Weights use the logarithmic method (score = weight /
//! -ln(u)), which gives each upstream a share proportional to its weight and keeps the
//! minimal-disruption property.
//!
//! Round-robin is the smooth weighted kind (each upstream's turn spread out, not in runs of its
//! weight). Least-connections counts what each upstream has open through this proxy (from the
//! handshake attempt to the relay's end) in [`Load`], which outlives reloads: a reload that adds
//! or removes an upstream keeps the others' counts.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::hash::Hasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use crate::lock::lock;

use siphasher::sip::SipHasher13;

use crate::config::{Balance, UpstreamServer, Upstreams};

/// Fixed hash keys: changing them moves every client, so they never change.
const SEED: (u64, u64) = (0x7773_7072_6f78_7921, 0x6261_6c61_6e63_6521);

#[derive(Debug)]
pub struct Balancer {
    main: Vec<UpstreamServer>,
    backup: Vec<UpstreamServer>,
    method: Balance,
    /// Round-robin's running weights (main, backup), one per upstream of weight > 0.
    turns: Mutex<(Vec<i64>, Vec<i64>)>,
}

impl Balancer {
    pub fn new(upstreams: &Upstreams) -> Self {
        let running = |s: &[UpstreamServer]| vec![0; s.len()];
        Self {
            main: upstreams.main.clone(),
            backup: upstreams.backup.clone(),
            method: upstreams.balance,
            turns: Mutex::new((running(&upstreams.main), running(&upstreams.backup))),
        }
    }

    /// The upstreams to try for `client`, in order: main ones by score, then backup ones by score.
    /// Upstreams of weight 0 are left out.
    pub fn order(&self, client: IpAddr) -> Vec<SocketAddr> {
        let client = client.to_canonical();
        let mut out = ranked(&self.main, client);
        out.extend(ranked(&self.backup, client));
        out
    }

    /// The upstreams to try for `client` by the configured method: the first is the choice,
    /// the rest the failover order (main ones, then backup ones).
    pub fn choose(&self, client: IpAddr, load: &Load) -> Vec<SocketAddr> {
        match self.method {
            Balance::IpHash => self.order(client),
            Balance::RoundRobin => {
                let mut turns = lock(&self.turns);
                let (main, backup) = &mut *turns;
                let mut out = in_turn(&self.main, main);
                out.extend(in_turn(&self.backup, backup));
                out
            }
            Balance::LeastConnections => {
                let client = client.to_canonical();
                let mut out = least_loaded(&self.main, client, load);
                out.extend(least_loaded(&self.backup, client, load));
                out
            }
        }
    }
}

/// Smooth weighted round-robin (as nginx does it): every upstream's running weight grows by its
/// weight, the largest is chosen and pays the total back. The rest follow in list order after it.
fn in_turn(servers: &[UpstreamServer], running: &mut [i64]) -> Vec<SocketAddr> {
    let total: i64 = servers.iter().map(|s| i64::from(s.weight)).sum();
    if total == 0 {
        return Vec::new();
    }
    let mut chosen = 0;
    for (i, s) in servers.iter().enumerate() {
        running[i] += i64::from(s.weight);
        if s.weight > 0 && (servers[chosen].weight == 0 || running[i] > running[chosen]) {
            chosen = i;
        }
    }
    running[chosen] -= total;
    (0..servers.len())
        .map(|k| (chosen + k) % servers.len())
        .filter(|&i| servers[i].weight > 0)
        .map(|i| servers[i].address)
        .collect()
}

/// By open connections per unit of weight, fewest first; ties by the client's hash order, so
/// that equal upstreams share new clients instead of the first in the file taking them all.
fn least_loaded(servers: &[UpstreamServer], client: IpAddr, load: &Load) -> Vec<SocketAddr> {
    let open = lock(&load.open);
    let mut scored: Vec<(f64, f64, SocketAddr)> = servers
        .iter()
        .filter(|s| s.weight > 0)
        .map(|s| {
            let n = open.get(&s.address).copied().unwrap_or(0) as f64;
            (n / f64::from(s.weight), score(client, s), s.address)
        })
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)).then(a.2.cmp(&b.2)));
    scored.into_iter().map(|(_, _, a)| a).collect()
}

fn ranked(servers: &[UpstreamServer], client: IpAddr) -> Vec<SocketAddr> {
    let mut scored: Vec<(f64, SocketAddr)> = servers
        .iter()
        .filter(|s| s.weight > 0)
        .map(|s| (score(client, s), s.address))
        .collect();
    // Ties are practically impossible; the address breaks them so the order is still total.
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, a)| a).collect()
}

fn score(client: IpAddr, server: &UpstreamServer) -> f64 {
    let mut h = SipHasher13::new_with_keys(SEED.0, SEED.1);
    match client {
        IpAddr::V4(a) => h.write(&a.octets()),
        IpAddr::V6(a) => h.write(&a.octets()),
    }
    h.write_u8(0xff);
    // The address's text, streamed into the hash as it is formatted: the same bytes as hashing
    // `to_string()`, without a string per upstream per handshake.
    let _ = write!(Streamed(&mut h), "{}", server.address);
    // 53 high bits give a uniform value in (0, 1): never 0, so ln() stays finite.
    let u = ((h.finish() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(server.weight) / -u.ln()
}

/// Feeds formatted text into a hash, piece by piece (SipHash is a stream over bytes: pieces hash
/// as their concatenation).
struct Streamed<'a>(&'a mut SipHasher13);

impl fmt::Write for Streamed<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.write(s.as_bytes());
        Ok(())
    }
}

/// Connections open through this proxy per upstream, from the handshake attempt to the relay's
/// end; kept across reloads (it belongs to the proxy, not to a configuration).
#[derive(Debug, Default)]
pub struct Load {
    open: Mutex<HashMap<SocketAddr, u64>>,
}

impl Load {
    /// Counts a connection to `upstream` until the returned guard is dropped.
    pub fn track(self: &Arc<Self>, upstream: SocketAddr) -> Tracked {
        *lock(&self.open).entry(upstream).or_default() += 1;
        Tracked {
            load: Arc::clone(self),
            upstream,
        }
    }

    /// Connections open to `upstream`.
    pub fn open(&self, upstream: SocketAddr) -> u64 {
        lock(&self.open).get(&upstream).copied().unwrap_or(0)
    }
}

/// One connection counted in [`Load`].
#[derive(Debug)]
pub struct Tracked {
    load: Arc<Load>,
    upstream: SocketAddr,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut open = lock(&self.load.open);
        if let Some(n) = open.get_mut(&self.upstream) {
            *n -= 1;
            // Gone entries keep the map as small as the upstreams in use.
            if *n == 0 {
                open.remove(&self.upstream);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    fn server(port: u16, weight: u32) -> UpstreamServer {
        UpstreamServer {
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            weight,
            name: None,
        }
    }

    fn balancer(main: Vec<UpstreamServer>, backup: Vec<UpstreamServer>) -> Balancer {
        Balancer::new(&Upstreams {
            main,
            backup,
            entries: Vec::new(),
            resolve_interval: Duration::from_secs(30),
            timeout: Duration::from_secs(1),
            max_head_bytes: 4096,
            send_proxy_protocol: false,
            on_refusal: Default::default(),
            balance: Default::default(),
            health: Default::default(),
            tls: None,
        })
    }

    fn clients(n: u32) -> impl Iterator<Item = IpAddr> {
        (0..n).map(|i| {
            IpAddr::from(std::net::Ipv4Addr::from(
                0x0a00_0000u32.wrapping_add(i.wrapping_mul(2_654_435_761)),
            ))
        })
    }

    #[test]
    fn same_client_same_order_and_fixed_values() {
        let b = balancer(vec![server(1, 1), server(2, 1), server(3, 1)], vec![server(9, 1)]);
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        let order = b.order(ip);
        assert_eq!(order.len(), 4);
        assert_eq!(order[3].port(), 9, "backup comes after every main upstream");
        // Pinned: another build, instance or restart must give this very order.
        let ports: Vec<u16> = order.iter().map(|a| a.port()).collect();
        assert_eq!(ports, PINNED_ORDER);
        // Config order does not matter.
        let shuffled = balancer(vec![server(3, 1), server(1, 1), server(2, 1)], vec![server(9, 1)]);
        assert_eq!(shuffled.order(ip), order);
    }

    #[test]
    fn scores_hash_the_address_text_whole() {
        // The score as it was first defined: the address formatted into a string, hashed at once.
        let reference = |client: IpAddr, server: &UpstreamServer| {
            let mut h = SipHasher13::new_with_keys(SEED.0, SEED.1);
            match client {
                IpAddr::V4(a) => h.write(&a.octets()),
                IpAddr::V6(a) => h.write(&a.octets()),
            }
            h.write_u8(0xff);
            h.write(server.address.to_string().as_bytes());
            let u = ((h.finish() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            f64::from(server.weight) / -u.ln()
        };
        let mut servers: Vec<UpstreamServer> = (1..50).map(|p| server(p * 1_111, 1 + u32::from(p) % 4)).collect();
        servers.push(UpstreamServer {
            address: "[2001:db8::17]:8443".parse().unwrap(),
            weight: 3,
            ..server(1, 1)
        });
        for client in clients(200).chain(["2001:db8::1".parse().unwrap()]) {
            for s in &servers {
                assert_eq!(
                    score(client, s).to_bits(),
                    reference(client, s).to_bits(),
                    "{client} {}",
                    s.address
                );
            }
        }
    }

    /// The order for 203.0.113.9 over ports 1, 2, 3 (+ backup 9); computed once and kept.
    const PINNED_ORDER: [u16; 4] = [3, 2, 1, 9];

    #[test]
    fn removing_an_upstream_moves_only_its_clients() {
        let all = balancer(vec![server(1, 1), server(2, 1), server(3, 1), server(4, 1)], vec![]);
        let less = balancer(vec![server(1, 1), server(2, 1), server(4, 1)], vec![]);
        let mut moved = 0;
        for ip in clients(20_000) {
            let before = all.order(ip);
            let after = less.order(ip);
            if before[0].port() == 3 {
                moved += 1;
                // Its clients go to their second choice, which is what failover would pick.
                assert_eq!(after[0], before[1]);
            } else {
                assert_eq!(after[0], before[0], "client {ip} moved although its upstream stayed");
            }
        }
        assert!(
            (4000..6000).contains(&moved),
            "about a quarter should have been on it: {moved}"
        );
    }

    #[test]
    fn weights_set_the_shares_and_zero_is_never_chosen() {
        let b = balancer(vec![server(1, 1), server(2, 3), server(3, 0)], vec![]);
        let mut first: HashMap<u16, u32> = HashMap::new();
        for ip in clients(40_000) {
            let order = b.order(ip);
            assert!(order.iter().all(|a| a.port() != 3));
            *first.entry(order[0].port()).or_default() += 1;
        }
        let share = f64::from(first[&2]) / 40_000.0;
        assert!((0.73..0.77).contains(&share), "weight 3 of 4 should get 75%: {share}");
    }

    #[test]
    fn ipv6_and_mapped_clients() {
        let b = balancer(vec![server(1, 1), server(2, 1)], vec![]);
        let mapped: IpAddr = "::ffff:198.51.100.4".parse().unwrap();
        let v4: IpAddr = "198.51.100.4".parse().unwrap();
        assert_eq!(b.order(mapped), b.order(v4));
        assert_eq!(b.order("2001:db8::1".parse().unwrap()).len(), 2);
    }

    fn with_method(method: Balance, main: Vec<UpstreamServer>, backup: Vec<UpstreamServer>) -> Balancer {
        let mut b = balancer(main, backup);
        b.method = method;
        b
    }

    #[test]
    fn round_robin_takes_turns_by_weight_spread_out() {
        let b = with_method(
            Balance::RoundRobin,
            vec![server(1, 1), server(2, 2), server(3, 0)],
            vec![server(9, 1)],
        );
        let load = Load::default();
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        let firsts: Vec<u16> = (0..6).map(|_| b.choose(ip, &load)[0].port()).collect();
        assert_eq!(firsts, [2, 1, 2, 2, 1, 2], "smooth: weight 2 twice as often, never 3");
        let order: Vec<u16> = b.choose(ip, &load).iter().map(|a| a.port()).collect();
        assert_eq!(order.len(), 3, "every usable upstream, then the backup: {order:?}");
        assert_eq!(order[2], 9);
    }

    #[test]
    fn least_connections_counts_open_ones_per_weight_and_forgets_closed_ones() {
        let b = with_method(Balance::LeastConnections, vec![server(1, 1), server(2, 2)], vec![]);
        let load = Arc::new(Load::default());
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        let a1 = SocketAddr::from(([127, 0, 0, 1], 1));
        let a2 = SocketAddr::from(([127, 0, 0, 1], 2));
        // Each new connection goes where the load per weight is lowest.
        let mut held = Vec::new();
        for _ in 0..6 {
            let first = b.choose(ip, &load)[0];
            held.push(load.track(first));
        }
        assert_eq!((load.open(a1), load.open(a2)), (2, 4), "shares 1:2");
        held.retain(|t| t.upstream != a2);
        assert_eq!(load.open(a2), 0);
        assert_eq!(b.choose(ip, &load)[0], a2, "the emptied one first");
        drop(held);
        assert!(lock(&load.open).is_empty(), "no entry left behind");
    }
}
