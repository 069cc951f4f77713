//! A fleet of nodes sharing cluster limits (`[cluster]`) through a real Redis server (Debian's
//! `redis-server`, started by each test on a loopback address of its own, no persistence):
//! three in-process nodes in front of one echo upstream.
//!
//! - a cluster connection cap of N admits exactly N connections of one client across the
//!   nodes, attempts made all at once; closing one admits one more, and only one;
//! - the cluster rate holds across the nodes within one token;
//! - the store stalled (SIGSTOP) then killed and restarted empty: `allow` admits on the node's
//!   limits alone, `deny` refuses, no handshake waits past the deadline, and the limits come
//!   back by themselves, counting what `allow` admitted meanwhile.
//!
//! The nodes in other processes (a node killed with SIGKILL, the same upstream order from two
//! processes) are in `proxy/tests/cluster_cli.rs`, where the binary is at hand.
//!
//! Without redis-server the tests fail under CI=true and say they were skipped elsewhere.

use wsproxy_tests::redis_kit as redis;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use wsproxy_tests::exposition::Exposition;
use wsproxy_tests::relay_kit::{poll_every_async, say};
use wsproxy_tests::{DEADLINE, Proxy, client_ip, config, connect_from, echo_upstream, read_head, request, status};

use redis::RedisServer;

/// The node's own limits out of the way: only the cluster's refuse.
const NODE_LIMITS: &str = "[limits]\nrequests_per_second = 100000.0\nburst = 100000\nmax_connections_per_ip = 10000\n[relay]\nmode = \"userspace\"\n";

/// A node in front of `upstream` with these `[cluster]` lines.
async fn node(upstream: SocketAddr, cluster: &str) -> Proxy {
    Proxy::start(&config(
        &[upstream],
        &[],
        &format!("{NODE_LIMITS}[cluster]\n{cluster}\n"),
    ))
    .await
}

/// A handshake from `from` to `node`: the answer's status, the connection when it was a 101
/// (kept open: it holds a lease), and how long the answer took.
async fn attempt(from: IpAddr, node: SocketAddr) -> (u16, Option<TcpStream>, Duration) {
    let started = Instant::now();
    let mut s = connect_from(from, node).await;
    s.write_all(request("/").as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    let took = started.elapsed();
    let code = status(&head);
    (code, (code == 101).then_some(s), took)
}

/// The sum over `nodes` of a metric (labels as in [`Exposition::sum`]).
fn total(nodes: &[&Proxy], name: &str, labels: &[(&str, &str)]) -> f64 {
    nodes
        .iter()
        .map(|n| Exposition::parse(&n.server.metrics_text()).sum(name, labels))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_admit_exactly_the_cluster_cap_and_a_closed_connection_admits_one_more() {
    if !redis::available() {
        return;
    }
    const CAP: usize = 5;
    const PER_NODE: usize = 6;
    let store = RedisServer::start("127.0.0.41").await;
    let echo = echo_upstream().await;
    // A generous deadline: this test is about counting, not about a slow store.
    let cluster = format!(
        "url = \"{}\"\nmax_connections_per_ip = {CAP}\nrequests_per_second = 10000.0\nburst = 10000\ntimeout = \"1s\"\nlease_ttl = \"3s\"",
        store.url()
    );
    let nodes = [
        node(echo, &cluster).await,
        node(echo, &cluster).await,
        node(echo, &cluster).await,
    ];
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let client = client_ip(1);

    // Attempts from one client, all at once, spread over the three nodes.
    let attempts = (0..PER_NODE * addrs.len()).map(|i| attempt(client, addrs[i % addrs.len()]));
    let results = futures_util::future::join_all(attempts).await;
    let mut open: Vec<TcpStream> = Vec::new();
    let mut statuses = Vec::new();
    for (code, s, _) in results {
        statuses.push(code);
        open.extend(s);
    }
    assert_eq!(open.len(), CAP, "admitted across the fleet; statuses {statuses:?}");
    assert!(
        statuses.iter().all(|&c| c == 101 || c == 429),
        "every refusal is a 429: {statuses:?}"
    );
    let refused = (PER_NODE * addrs.len() - CAP) as f64;
    let by_nodes: Vec<&Proxy> = nodes.iter().collect();
    assert_eq!(
        total(&by_nodes, "wsproxy_cluster_refused_total", &[("reason", "connections")]),
        refused
    );
    assert_eq!(total(&by_nodes, "wsproxy_cluster_leases", &[]), CAP as f64);
    // Another client is not affected.
    let (code, other, _) = attempt(client_ip(2), addrs[0]).await;
    assert_eq!(code, 101, "another client");
    drop(other);

    // Closing one lets exactly one more in, through any node.
    drop(open.pop());
    let mut round = 0usize;
    let again = poll_every_async(DEADLINE, Duration::from_millis(20), || {
        round += 1;
        let to = addrs[round % addrs.len()];
        async move { attempt(client, to).await.1 }
    })
    .await
    .expect("a closed connection's lease was not given back");
    open.push(again);
    for to in &addrs {
        let (code, _, _) = attempt(client, *to).await;
        assert_eq!(code, 429, "the cap is reached again");
    }
    say(&format!(
        "cluster cap: {CAP} of {} attempts admitted across 3 nodes; one closed, one more admitted",
        PER_NODE * addrs.len()
    ));
    drop(open);
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_rate_holds_across_nodes_within_one_token() {
    if !redis::available() {
        return;
    }
    const RATE: f64 = 2.0;
    const BURST: u32 = 6;
    const ATTEMPTS: usize = 30;
    let store = RedisServer::start("127.0.0.42").await;
    let echo = echo_upstream().await;
    let cluster = format!(
        "url = \"{}\"\nrequests_per_second = {RATE:?}\nburst = {BURST}\nmax_connections_per_ip = 0\ntimeout = \"1s\"",
        store.url()
    );
    let nodes = [
        node(echo, &cluster).await,
        node(echo, &cluster).await,
        node(echo, &cluster).await,
    ];
    let client = client_ip(3);

    let started = Instant::now();
    let mut admitted = 0usize;
    let mut retry_after = Vec::new();
    for i in 0..ATTEMPTS {
        let to = nodes[i % nodes.len()].addr;
        let mut s = connect_from(client, to).await;
        s.write_all(request("/").as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        match status(&head) {
            101 => admitted += 1,
            429 => retry_after.push(wsproxy_tests::header(&head, "retry-after")),
            other => panic!("attempt {i}: {other}: {head}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // GCRA allows the burst at once, then one token every 1/RATE s.
    let allowed = f64::from(BURST) + RATE * elapsed;
    assert!(
        (admitted as f64 - allowed).abs() <= 1.0,
        "{admitted} admitted in {elapsed:.3}s across 3 nodes; the cluster allows {allowed:.2} (each node alone would allow all {ATTEMPTS})"
    );
    assert!(retry_after.iter().all(|r| r.as_deref() == Some("1")), "{retry_after:?}");
    let by_nodes: Vec<&Proxy> = nodes.iter().collect();
    assert_eq!(
        total(&by_nodes, "wsproxy_cluster_refused_total", &[("reason", "rate")]),
        (ATTEMPTS - admitted) as f64
    );
    // A token comes back after 1/RATE s.
    let mut round = 0usize;
    let back = poll_every_async(DEADLINE, Duration::from_millis(50), || {
        round += 1;
        let to = nodes[round % nodes.len()].addr;
        async move { (attempt(client, to).await.0 == 101).then_some(()) }
    })
    .await;
    assert!(back.is_some(), "no token came back");
    say(&format!(
        "cluster rate: {admitted} of {ATTEMPTS} attempts in {elapsed:.3}s admitted across 3 nodes (burst {BURST}, {RATE}/s)"
    ));
    for n in nodes {
        n.stop().await;
    }
}

/// Of `wsproxy_cluster_store_seconds{op="admit"}`: the count of the lowest bucket at or above
/// `bound` seconds, and the count of all.
fn admit_calls(node: &Proxy, bound: f64) -> (u64, u64) {
    let text = node.server.metrics_text();
    let within = text
        .lines()
        .filter_map(|l| l.strip_prefix("wsproxy_cluster_store_seconds_bucket{le=\""))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\",op=\"admit\"} ")?;
            Some((le.parse::<f64>().ok()?, count.trim().parse::<u64>().ok()?))
        })
        .find(|(le, _)| *le >= bound)
        .unwrap_or_else(|| panic!("no admit bucket at or above {bound} in:\n{text}"))
        .1;
    let all = text
        .lines()
        .find_map(|l| l.strip_prefix("wsproxy_cluster_store_seconds_count{op=\"admit\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no admit count in:\n{text}"));
    (within, all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_stalls_or_dies_follows_on_store_error_within_the_deadline_and_comes_back() {
    if !redis::available() {
        return;
    }
    const CAP: usize = 2;
    // A deadline long enough for a loaded test machine never to miss it while the store is
    // well, short against the seconds a stalled store would hold a handshake without one.
    const TIMEOUT_MS: u64 = 100;
    // What a handshake may take at most: the deadline, and the rest of the handshake on a busy
    // machine.
    const BOUND: Duration = Duration::from_millis(TIMEOUT_MS + 700);
    let mut store = RedisServer::start("127.0.0.43").await;
    let echo = echo_upstream().await;
    let cluster = |mode: &str| {
        format!(
            "url = \"{}\"\nmax_connections_per_ip = {CAP}\nrequests_per_second = 10000.0\nburst = 10000\n\
             timeout = \"{TIMEOUT_MS}ms\"\nlease_ttl = \"3s\"\non_store_error = \"{mode}\"",
            store.url()
        )
    };
    let allow = node(echo, &cluster("allow")).await;
    let deny = node(echo, &cluster("deny")).await;

    // Well: the cap holds on both.
    let x = client_ip(10);
    let mut held = Vec::new();
    for to in [allow.addr, deny.addr] {
        let (code, s, _) = attempt(x, to).await;
        assert_eq!(code, 101);
        held.extend(s);
    }
    assert_eq!(attempt(x, allow.addr).await.0, 429);
    assert_eq!(attempt(x, deny.addr).await.0, 429);
    drop(held);

    for outage in ["stalled", "killed"] {
        match outage {
            "stalled" => store.stall(),
            _ => store.kill().await,
        }
        // allow: the node's own limits alone (they are open here), so more than the cap.
        let y = client_ip(if outage == "stalled" { 11 } else { 12 });
        let mut unchecked = Vec::new();
        for i in 0..CAP + 2 {
            let (code, s, took) = attempt(y, allow.addr).await;
            assert_eq!(code, 101, "{outage}, allow, attempt {i}");
            assert!(took < BOUND, "{outage}, allow, attempt {i}: {took:?}");
            unchecked.extend(s);
        }
        // deny: refused, as fast: 503 (the fleet's limits cannot be checked; no client is over
        // a limit).
        for i in 0..CAP + 2 {
            let (code, _, took) = attempt(client_ip(20 + i as u32), deny.addr).await;
            assert_eq!(code, 503, "{outage}, deny, attempt {i}");
            assert!(took < BOUND, "{outage}, deny, attempt {i}: {took:?}");
        }
        for n in [&allow, &deny] {
            let m = Exposition::parse(&n.server.metrics_text());
            assert_eq!(m.value("wsproxy_cluster_store_up", &[]), 0.0, "{outage}: marked down");
        }
        let by_nodes = [&allow, &deny];
        assert!(total(&by_nodes, "wsproxy_cluster_refused_total", &[("reason", "store_error")]) >= (CAP + 2) as f64);
        assert!(total(&by_nodes, "wsproxy_cluster_unchecked_total", &[]) >= (CAP + 2) as f64);

        match outage {
            "stalled" => store.resume(),
            _ => store.restart().await,
        }
        // Back by themselves: once the store answers, the allow node writes the leases it took
        // meanwhile, so that y, holding CAP + 2 connections, is over the cap on every node.
        let back = poll_every_async(DEADLINE, Duration::from_millis(50), || async {
            (attempt(client_ip(30), deny.addr).await.0 == 101).then_some(())
        })
        .await;
        assert!(back.is_some(), "{outage}: the deny node does not admit again");
        let counted = poll_every_async(DEADLINE, Duration::from_millis(50), || async {
            (attempt(y, deny.addr).await.0 == 429).then_some(())
        })
        .await;
        assert!(
            counted.is_some(),
            "{outage}: the leases taken without the store are not counted"
        );
        assert_eq!(attempt(y, allow.addr).await.0, 429, "{outage}: the cap again");
        // And given back when those connections end.
        drop(unchecked);
        let freed = poll_every_async(DEADLINE, Duration::from_millis(50), || async {
            attempt(y, allow.addr).await.1
        })
        .await;
        assert!(freed.is_some(), "{outage}: y was not admitted again");
        for n in [&allow, &deny] {
            let m = Exposition::parse(&n.server.metrics_text());
            assert_eq!(m.value("wsproxy_cluster_store_up", &[]), 1.0, "{outage}: up again");
        }
        say(&format!(
            "cluster store {outage}: allow admitted, deny refused, both within {BOUND:?}; limits back"
        ));
    }
    // No admission call ever waited much past the deadline (the first bucket from 0.4 s: room
    // for a late wake-up on a busy machine).
    for n in [&allow, &deny] {
        let (within, all) = admit_calls(n, 0.4);
        assert_eq!(within, all, "an admission call outlived its deadline");
    }
    let errors = total(
        &[&allow, &deny],
        "wsproxy_cluster_store_errors_total",
        &[("op", "admit")],
    );
    assert!(errors > 0.0);
    allow.stop().await;
    deny.stop().await;
}
