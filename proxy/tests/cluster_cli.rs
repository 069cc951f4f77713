//! A fleet of `wsproxy` processes (the in-process side is in `tests/tests/cluster.rs`):
//!
//! - a node killed with SIGKILL: its leases in the cluster store expire within `lease_ttl`, and
//!   the client can use them again through another node;
//! - the same upstream, in the same order, for a client on every node with the same upstreams
//!   (listed in another order in each node's file), the second choice included;
//! - a store that goes away and comes back is logged once each way.
//!
//! A real Redis server (Debian's `redis-server`) is started by each test; without it the tests
//! fail under CI=true and say they were skipped elsewhere.

mod common;
use wsproxy_tests::redis_kit as redis;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::{DAEMON_DEADLINE, Daemon, free_port, temp_config};
use nix::sys::signal::Signal;
use redis::RedisServer;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use wsproxy::balance::Balancer;
use wsproxy_tests::daemon_kit::{Flaky, upgrade_and_id};
use wsproxy_tests::relay_kit::{poll_every_async, say};
use wsproxy_tests::{client_ip, connect_from, echo_upstream, read_head, request, status};

/// A node's file: on 127.0.0.1:`port`, the node's own limits out of the way, the userspace
/// relay, `[cluster]` with these lines, and these upstreams.
fn node_file(name: &str, port: u16, cluster: &str, main: &str) -> std::path::PathBuf {
    let text = format!(
        "[listen]\naddress = \"127.0.0.1:{port}\"\ndrain_timeout = \"1s\"\n\
         [limits]\nrequests_per_second = 100000.0\nburst = 100000\nmax_connections_per_ip = 10000\n\
         [relay]\nmode = \"userspace\"\n[cluster]\n{cluster}\n\
         [upstreams]\nmain = [{main}]\ntimeout = \"2s\"\n"
    );
    temp_config(name, &text)
}

async fn node(name: &str, cluster: &str, main: &str) -> (Daemon, SocketAddr) {
    let port = free_port();
    let d = Daemon::run(&node_file(name, port, cluster, main), None).await;
    (d, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// A handshake from `from`: its status, and the connection when it was a 101.
async fn attempt(from: IpAddr, to: SocketAddr) -> (u16, Option<TcpStream>) {
    let mut s = connect_from(from, to).await;
    s.write_all(request("/").as_bytes()).await.unwrap();
    let code = status(&read_head(&mut s).await);
    (code, (code == 101).then_some(s))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_sigkill_stops_counting_within_the_lease_ttl() {
    if !redis::available() {
        return;
    }
    const CAP: usize = 3;
    const TTL: Duration = Duration::from_secs(2);
    let store = RedisServer::start("127.0.0.51").await;
    let echo = echo_upstream().await;
    let cluster = format!(
        "url = \"{}\"\nmax_connections_per_ip = {CAP}\nlease_ttl = \"{}s\"\ntimeout = \"1s\"",
        store.url(),
        TTL.as_secs()
    );
    let main = format!("{{ address = \"{echo}\" }}");
    let (mut doomed, a) = node("sigkill-a.toml", &cluster, &main).await;
    let (_survivor, b) = node("sigkill-b.toml", &cluster, &main).await;
    let x = client_ip(50);
    let leases = format!("wsproxy:{{default:{x}}}:leases");

    let mut held = Vec::new();
    for i in 0..CAP {
        let (code, s) = attempt(x, a).await;
        assert_eq!(code, 101, "connection {i} through the node to be killed");
        held.extend(s);
    }
    assert_eq!(store.query(&["ZCARD", &leases]).await, format!(":{CAP}"));
    assert_eq!(attempt(x, b).await.0, 429, "the other node counts them");

    doomed.signal(Signal::SIGKILL);
    let killed = Instant::now();
    doomed.wait_exit(DAEMON_DEADLINE).await;
    drop(held);
    // Its leases still count until they expire: nobody gave them back.
    assert_eq!(attempt(x, b).await.0, 429, "right after the kill");
    let back = poll_every_async(TTL * 5, Duration::from_millis(50), || async { attempt(x, b).await.1 }).await;
    let waited = killed.elapsed();
    let first = back.expect("the dead node's leases never expired");
    assert!(
        waited <= TTL + Duration::from_millis(750),
        "the dead node's leases counted for {waited:?} (lease_ttl {TTL:?})"
    );
    // The client has its whole cap again, on the surviving node.
    let mut again = vec![first];
    for i in 1..CAP {
        let (code, s) = attempt(x, b).await;
        assert_eq!(code, 101, "connection {i} after the expiry");
        again.extend(s);
    }
    assert_eq!(attempt(x, b).await.0, 429, "the cap again");
    assert_eq!(store.query(&["ZCARD", &leases]).await, format!(":{CAP}"));
    say(&format!(
        "SIGKILL: the dead node's {CAP} leases stopped counting after {waited:?} (lease_ttl {TTL:?})"
    ));
    drop(again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_orders_a_clients_upstreams_the_same_way() {
    const CLIENTS: u32 = 64;
    let mut ups = Vec::new();
    for id in ["a", "b", "c", "d"] {
        ups.push(Flaky::start(id).await);
    }
    let weights = [1, 2, 1, 3];
    let entries: Vec<String> = ups
        .iter()
        .zip(weights)
        .map(|(u, w)| format!("{{ address = \"{}\", weight = {w} }}", u.addr))
        .collect();
    // The same upstreams and weights, listed in another order: the order in the file is no part
    // of the hash.
    let forward = entries.join(", ");
    let backward = entries.iter().rev().cloned().collect::<Vec<_>>().join(", ");
    let (_one, p1) = node("order-1.toml", "", &forward).await;
    let (_two, p2) = node("order-2.toml", "", &backward).await;
    let config = wsproxy::Config::parse(&format!("[upstreams]\nmain = [{forward}]\n"), "the nodes' upstreams").unwrap();
    let balancer = Balancer::new(&config.services[0].upstreams);
    let id_of: HashMap<SocketAddr, &str> = ups.iter().map(|u| (u.addr, u.id)).collect();

    // The upstream a client lands on through each node, and the one the hash ranks `rank`.
    async fn landings(
        p: [SocketAddr; 2],
        b: &Balancer,
        ids: &HashMap<SocketAddr, &str>,
        rank: usize,
    ) -> HashMap<String, u32> {
        let mut shares = HashMap::new();
        for n in 0..CLIENTS {
            let ip = client_ip(200 + n);
            let mut seen = Vec::new();
            for proxy in p {
                let (s, id) = upgrade_and_id(ip, proxy, 1)
                    .await
                    .unwrap_or_else(|h| panic!("{ip}: {h}"));
                drop(s);
                seen.push(id);
            }
            let expected = ids[&b.order(ip)[rank]];
            assert_eq!(
                seen,
                [expected, expected],
                "{ip}: node 1, node 2 (the hash ranks {expected} #{rank})"
            );
            *shares.entry(seen[0].clone()).or_default() += 1;
        }
        shares
    }

    let first = landings([p1, p2], &balancer, &id_of, 0).await;
    assert_eq!(first.len(), 4, "every upstream is someone's first choice: {first:?}");
    // The heaviest upstream goes: its clients take their second choice, the same on both nodes.
    ups[3].kill().await;
    let moved: Vec<IpAddr> = (0..CLIENTS)
        .map(|n| client_ip(200 + n))
        .filter(|ip| balancer.order(*ip)[0] == ups[3].addr)
        .collect();
    assert!(!moved.is_empty());
    for ip in &moved {
        let mut seen = Vec::new();
        for proxy in [p1, p2] {
            let (s, id) = upgrade_and_id(*ip, proxy, 1)
                .await
                .unwrap_or_else(|h| panic!("{ip}: {h}"));
            drop(s);
            seen.push(id);
        }
        let second = id_of[&balancer.order(*ip)[1]];
        assert_eq!(seen, [second, second], "{ip}: its second choice on both nodes");
    }
    say(&format!(
        "same upstream on two processes for {CLIENTS} clients (shares {first:?}); {} moved to the same second choice",
        moved.len()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_is_logged_once_each_way() {
    if !redis::available() {
        return;
    }
    let mut store = RedisServer::start("127.0.0.52").await;
    let echo = echo_upstream().await;
    let cluster = format!(
        "url = \"{}\"\nmax_connections_per_ip = 2\ntimeout = \"1s\"",
        store.url()
    );
    let (mut d, p) = node("outage.toml", &cluster, &format!("{{ address = \"{echo}\" }}")).await;
    assert_eq!(attempt(client_ip(60), p).await.0, 101);
    store.kill().await;
    for i in 0..20 {
        assert_eq!(attempt(client_ip(61 + i), p).await.0, 101, "allow, attempt {i}");
    }
    store.restart().await;
    d.wait_for("cluster store answers again").await;
    // Limits apply again: a client at the cap is refused.
    let y = client_ip(90);
    let mut held = Vec::new();
    for _ in 0..2 {
        held.extend(attempt(y, p).await.1);
    }
    assert_eq!(held.len(), 2);
    assert_eq!(attempt(y, p).await.0, 429);
    assert_eq!(d.count("cluster store unreachable"), 1, "{}", d.text());
    assert_eq!(d.count("cluster store answers again"), 1, "{}", d.text());
    let line = d.wait_for("cluster store unreachable").await;
    assert!(line.contains("on_store_error") && line.contains(&store.url()), "{line}");
}
