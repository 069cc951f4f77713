//! Choice of upstream by client IP: weighted rendezvous hashing with a fixed seed.
//!
//! Each upstream gets a score from a hash of (client IP, upstream address); the client's order of
//! upstreams is by score, which is both its choice and its failover order. The seed is a constant,
//! so every proxy instance, before and after a restart, orders a client's upstreams the same way.
//! An upstream is named by its address, so removing one moves only the clients whose first choice
//! it was, and reordering the config file moves nobody. Weights use the logarithmic method
//! (score = weight / -ln(u)), which gives each upstream a share proportional to its weight and
//! keeps the minimal-disruption property.

use std::hash::Hasher;
use std::net::{IpAddr, SocketAddr};

use siphasher::sip::SipHasher13;

use crate::config::{UpstreamServer, Upstreams};

/// Fixed hash keys: changing them moves every client, so they never change.
const SEED: (u64, u64) = (0x7773_7072_6f78_7921, 0x6261_6c61_6e63_6521);

#[derive(Debug, Clone)]
pub struct Balancer {
    main: Vec<UpstreamServer>,
    backup: Vec<UpstreamServer>,
}

impl Balancer {
    pub fn new(upstreams: &Upstreams) -> Self {
        Self {
            main: upstreams.main.clone(),
            backup: upstreams.backup.clone(),
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
    h.write(server.address.to_string().as_bytes());
    // 53 high bits give a uniform value in (0, 1): never 0, so ln() stays finite.
    let u = ((h.finish() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(server.weight) / -u.ln()
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
        }
    }

    fn balancer(main: Vec<UpstreamServer>, backup: Vec<UpstreamServer>) -> Balancer {
        Balancer::new(&Upstreams {
            main,
            backup,
            timeout: Duration::from_secs(1),
            max_head_bytes: 4096,
            send_proxy_protocol: false,
            on_refusal: Default::default(),
            health: Default::default(),
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
}
