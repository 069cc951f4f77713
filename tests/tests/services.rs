//! Many services on one proxy, from outside: host routing on a shared listener (exact names,
//! the most specific wildcard, the listener's default, 421 for a host nobody serves), each
//! service with its own upstreams, header rules, limits, access rules and handshake bounds, the
//! service named in metrics, logs and `GET /services`, and reloads that add and remove services
//! and listeners under 200 open checksummed connections.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsproxy_tests::daemon_kit::{KeepaliveOpts, keepalive_opts, sockets_where};
use wsproxy_tests::exposition::Exposition;
use wsproxy_tests::relay_kit::{first_difference, pattern, poll_until};
use wsproxy_tests::{
    DEADLINE, Proxy, Script, Upstream, client_ip, connect_from, header, read_to_close, upgrade_status, within,
};

/// Generous limits, so that only the limits a test sets refuse anything.
const OPEN: &str = "[limits]\nrequests_per_second = 1000.0\nburst = 1000\n";

/// An upstream that upgrades every request and then echoes raw bytes.
async fn upgrading() -> Upstream {
    Upstream::start(Script::Upgrade { after: Vec::new() }).await
}

/// A `[[service]]` block: `name`, `listen` (addresses), `hosts`, its upstream, an `X-Service`
/// field naming it on every forwarded request, and more settings: (section, lines) pairs.
fn service(name: &str, listen: &[&str], hosts: &[&str], upstream: SocketAddr, more: &[(&str, &str)]) -> String {
    let list = |v: &[&str]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
    let mut sections = std::collections::BTreeMap::from([
        ("upstreams", format!("main = [{{ address = \"{upstream}\" }}]\n")),
        (
            "headers",
            format!("add = [{{ name = \"X-Service\", value = \"{name}\" }}]\n"),
        ),
    ]);
    for (section, lines) in more {
        sections.entry(section).or_default().push_str(&format!("{lines}\n"));
    }
    let mut text = format!(
        "[[service]]\nname = \"{name}\"\nlisten = [{}]\nhosts = [{}]\n",
        list(listen),
        list(hosts)
    );
    for (section, lines) in sections {
        text.push_str(&format!("[service.{section}]\n{lines}"));
    }
    text
}

/// Sends a handshake for `host` (with `extra` header lines) from `from` and reads the answer
/// head: its status, and the connection (open when it was a 101).
async fn handshake(from: IpAddr, to: SocketAddr, host: &str, extra: &str) -> (u16, TcpStream) {
    let mut s = connect_from(from, to).await;
    let code = upgrade_status(&mut s, host, extra).await;
    (code, s)
}

/// The `X-Service` value of the next request `upstream` saw.
async fn served_by(upstream: &mut Upstream) -> String {
    let seen = upstream.next_seen().await;
    header(&seen.head, "x-service").unwrap_or_default()
}

#[tokio::test]
async fn each_host_goes_to_its_service_and_an_unknown_host_gets_421() {
    let names = ["exact", "wide", "narrow", "rest", "alone"];
    let mut ups = Vec::new();
    for _ in names {
        ups.push(upgrading().await);
    }
    let shared = "127.0.0.1:0";
    let text = [
        OPEN.to_string(),
        service("exact", &[shared], &["chat.example.com"], ups[0].addr, &[]),
        service("wide", &[shared], &["*.example.com"], ups[1].addr, &[]),
        service("narrow", &[shared], &["*.eu.example.com"], ups[2].addr, &[]),
        service("rest", &[shared], &[], ups[3].addr, &[]),
        service("alone", &["127.0.0.2:0"], &["alone.example"], ups[4].addr, &[]),
    ]
    .concat();
    let proxy = Proxy::start_services(&text).await;
    let (on_shared, on_alone) = (proxy.bound(shared).await, proxy.bound("127.0.0.2:0").await);
    for (to, host, want) in [
        (on_shared, "chat.example.com", 0),
        (on_shared, "Chat.Example.COM:8080", 0),
        (on_shared, "a.example.com", 1),
        (on_shared, "a.b.example.com", 1),
        (on_shared, "x.eu.example.com", 2),
        (on_shared, "example.com", 3),
        (on_shared, "elsewhere.test", 3),
        (on_alone, "alone.example:443", 4),
    ] {
        let (code, s) = handshake(client_ip(1), to, host, "").await;
        assert_eq!(code, 101, "{host}");
        drop(s);
        assert_eq!(served_by(&mut ups[want]).await, names[want], "{host}");
    }
    // A listener whose only service names its hosts serves no other host.
    let (code, mut s) = handshake(client_ip(1), on_alone, "chat.example.com", "").await;
    assert_eq!(code, 421);
    read_to_close(&mut s).await;
    let m = Exposition::parse(&proxy.server.metrics_text());
    let refused = [("service", "alone"), ("outcome", "refused"), ("status", "421")];
    assert_eq!(m.value("wsproxy_handshakes_total", &refused), 1.0);
    for (name, upgraded) in names.iter().zip([2.0, 2.0, 1.0, 2.0, 1.0]) {
        let labels = [("service", *name), ("outcome", "upgraded")];
        assert_eq!(m.value("wsproxy_handshakes_total", &labels), upgraded, "{name}");
    }
    assert_eq!(ups.iter().map(Upstream::accepted).sum::<usize>(), 8);
    proxy.stop().await;
}

#[tokio::test]
async fn a_shared_listener_without_a_default_refuses_unknown_hosts_before_any_upstream() {
    let mut a = upgrading().await;
    let b = upgrading().await;
    let text = [
        OPEN.to_string(),
        service("a", &["127.0.0.1:0"], &["a.test"], a.addr, &[]),
        service("b", &["127.0.0.1:0"], &["b.test"], b.addr, &[]),
    ]
    .concat();
    let proxy = Proxy::start_services(&text).await;
    let (code, mut s) = handshake(client_ip(1), proxy.addr, "c.test", "").await;
    assert_eq!(code, 421);
    let body = read_to_close(&mut s).await;
    assert!(body.contains("no service for this host"), "{body:?}");
    let (code, s) = handshake(client_ip(1), proxy.addr, "a.test", "").await;
    assert_eq!(code, 101);
    drop(s);
    assert_eq!(served_by(&mut a).await, "a");
    assert_eq!(b.accepted(), 0);
    let m = Exposition::parse(&proxy.server.metrics_text());
    let unknown = [("service", ""), ("outcome", "refused"), ("status", "421")];
    assert_eq!(m.value("wsproxy_handshakes_total", &unknown), 1.0);
    proxy.stop().await;
}

#[tokio::test]
async fn each_service_keeps_its_own_limits_access_rules_and_handshake_bounds() {
    let ups = [
        upgrading().await,
        upgrading().await,
        upgrading().await,
        upgrading().await,
        upgrading().await,
    ];
    let text = [
        // The defaults every service starts from.
        "[limits]\nrequests_per_second = 1000.0\nburst = 1000\nmax_connections_per_ip = 3\n".to_string(),
        service(
            "one-each",
            &["127.0.0.1:0"],
            &[],
            ups[0].addr,
            &[("limits", "max_connections_per_ip = 1")],
        ),
        service(
            "two-in-all",
            &["127.0.0.2:0"],
            &[],
            ups[1].addr,
            &[("limits", "max_connections = 2")],
        ),
        service(
            "guarded",
            &["127.0.0.3:0"],
            &[],
            ups[2].addr,
            &[(
                "access",
                &format!("origins = [\"https://ok.example\"]\ndeny = [\"{}\"]", client_ip(9)),
            )],
        ),
        service(
            "small",
            &["127.0.0.4:0"],
            &["small.test"],
            ups[3].addr,
            &[
                ("handshake", "max_head_bytes = 1024"),
                ("headers", "underscore_headers = \"reject\""),
            ],
        ),
        service("large", &["127.0.0.4:0"], &["large.test"], ups[4].addr, &[]),
    ]
    .concat();
    let proxy = Proxy::start_services(&text).await;
    let at = |configured: &'static str| proxy.bound(configured);
    let (one, two, guarded, shared) = (
        at("127.0.0.1:0").await,
        at("127.0.0.2:0").await,
        at("127.0.0.3:0").await,
        at("127.0.0.4:0").await,
    );

    // Per client: one connection on "one-each"; the default of three elsewhere.
    let (code, _held) = handshake(client_ip(1), one, "x", "").await;
    assert_eq!(code, 101);
    let (code, _) = handshake(client_ip(1), one, "x", "").await;
    assert_eq!(code, 429, "over one-each's per-client cap");
    // The service's total: two connections, whoever holds them; then 503 for a third client.
    let (code, _a) = handshake(client_ip(2), two, "x", "").await;
    assert_eq!(code, 101);
    let (code, b) = handshake(client_ip(3), two, "x", "").await;
    assert_eq!(code, 101);
    let (code, mut s) = handshake(client_ip(4), two, "x", "").await;
    assert_eq!(code, 503, "over two-in-all's total");
    read_to_close(&mut s).await;
    drop(b);
    let freed = poll_until(DEADLINE, || {
        let m = Exposition::parse(&proxy.server.metrics_text());
        let open = [("service", "two-in-all")];
        (m.value("wsproxy_connections_open", &open) <= 1.0).then_some(())
    })
    .await;
    assert!(freed.is_some(), "the closed connection was not released");
    let (code, _c) = handshake(client_ip(4), two, "x", "").await;
    assert_eq!(code, 101, "a slot freed by a close is usable again");

    // Origin allow-list and client network deny list of "guarded" only.
    let (code, _) = handshake(client_ip(5), guarded, "x", "Origin: https://evil.example\r\n").await;
    assert_eq!(code, 403);
    let (code, _ok) = handshake(client_ip(5), guarded, "x", "Origin: https://ok.example\r\n").await;
    assert_eq!(code, 101);
    let (code, _) = handshake(client_ip(9), guarded, "x", "Origin: https://ok.example\r\n").await;
    assert_eq!(code, 403, "a denied client network");
    let (code, _) = handshake(client_ip(9), one, "x", "Origin: https://evil.example\r\n").await;
    assert_eq!(code, 101, "one-each has no access rules");

    // One listener, two services told apart by host, each with its own head bounds and
    // underscore policy: what one refuses the other forwards.
    let padding = format!("X-Padding: {}\r\n", "p".repeat(1500));
    let (code, _) = handshake(client_ip(6), shared, "small.test", &padding).await;
    assert_eq!(code, 431, "over small's max_head_bytes");
    let (code, _) = handshake(client_ip(6), shared, "large.test", &padding).await;
    assert_eq!(code, 101);
    let (code, _) = handshake(client_ip(7), shared, "small.test", "X_Under: 1\r\n").await;
    assert_eq!(code, 400, "small rejects underscores");
    let (code, _) = handshake(client_ip(7), shared, "large.test", "X_Under: 1\r\n").await;
    assert_eq!(code, 101, "large drops them (the default)");
    proxy.stop().await;
}

#[tokio::test]
async fn services_are_listed_with_their_upstreams_and_named_in_metrics() {
    let (a, b) = (upgrading().await, upgrading().await);
    let text = [
        OPEN.to_string(),
        service("chat", &["127.0.0.1:0"], &["chat.test"], a.addr, &[]),
        service(
            "feed",
            &["127.0.0.1:0", "127.0.0.2:0"],
            &[],
            b.addr,
            &[("upstreams", "balance = \"least-connections\"")],
        ),
    ]
    .concat();
    let proxy = Proxy::start_services(&text).await;
    let (code, _held) = handshake(client_ip(1), proxy.addr, "feed.test", "").await;
    assert_eq!(code, 101);
    let json = proxy.server.services_json();
    let services = json["services"].as_array().unwrap();
    assert_eq!(services.len(), 2, "{json}");
    assert_eq!(services[0]["name"], "chat");
    assert_eq!(services[0]["hosts"][0], "chat.test");
    assert_eq!(services[0]["upstreams"][0]["address"], a.addr.to_string());
    assert_eq!(services[0]["upstreams"][0]["up"], true);
    assert_eq!(services[1]["name"], "feed");
    assert_eq!(services[1]["listen"].as_array().unwrap().len(), 2);
    assert_eq!(services[1]["open"], 1, "{json}");
    assert_eq!(
        services[1]["upstreams"][0]["open"], 1,
        "least-connections counts it: {json}"
    );
    let m = Exposition::parse(&proxy.server.metrics_text());
    assert_eq!(
        m.value(
            "wsproxy_upstream_attempts_total",
            &[("service", "feed"), ("upstream", &b.addr.to_string())]
        ),
        1.0
    );
    assert_eq!(m.sum("wsproxy_upstream_attempts_total", &[("service", "chat")]), 0.0);
    proxy.stop().await;
}

/// Rounds each checked connection carries.
const ROUNDS: u32 = 3;

/// One checksummed connection: [`ROUNDS`] rounds of `chunk` bytes written and read back through
/// an echoing upstream, the pattern seeded by `seed`, each round once `allowed` reaches it (the
/// test reloads between two); then a clean close both ways. Returns the bytes carried.
async fn stream_checked(
    mut s: TcpStream,
    seed: u64,
    chunk: usize,
    mut allowed: tokio::sync::watch::Receiver<u32>,
) -> u64 {
    let mut got = vec![0u8; chunk];
    for round in 1..=ROUNDS {
        allowed.wait_for(|&a| a >= round).await.unwrap();
        let offset = u64::from(round - 1) * chunk as u64;
        s.write_all(pattern(seed, offset, chunk))
            .await
            .unwrap_or_else(|e| panic!("connection {seed}: write: {e}"));
        s.read_exact(&mut got)
            .await
            .unwrap_or_else(|e| panic!("connection {seed}: read at {offset}: {e}"));
        if let Some(at) = first_difference(seed, offset, &got) {
            panic!("connection {seed}: byte {at} differs");
        }
    }
    s.shutdown().await.unwrap();
    let mut tail = Vec::new();
    s.read_to_end(&mut tail).await.unwrap();
    assert!(tail.is_empty(), "connection {seed}: bytes after the end");
    u64::from(ROUNDS) * chunk as u64
}

#[tokio::test]
async fn reload_adds_and_removes_services_and_listeners_under_200_checked_connections() {
    let (ups_kept, ups_moved, ups_new) = (upgrading().await, upgrading().await, upgrading().await);
    let before = [
        OPEN.to_string(),
        "[listen]\ndrain_timeout = \"20s\"\n".to_string(),
        service("kept", &["127.0.0.1:0"], &[], ups_kept.addr, &[]),
        service("changed", &["127.0.0.2:0"], &[], ups_moved.addr, &[]),
        service("removed", &["127.0.0.3:0"], &[], ups_moved.addr, &[]),
    ]
    .concat();
    // `changed` gets other header rules; `removed` and its listener go; `added` comes on a new
    // listener and on `kept`'s, by host.
    let after = [
        OPEN.to_string(),
        "[listen]\ndrain_timeout = \"20s\"\n".to_string(),
        service("kept", &["127.0.0.1:0"], &[], ups_kept.addr, &[]),
        service(
            "changed",
            &["127.0.0.2:0"],
            &[],
            ups_moved.addr,
            &[("limits", "max_connections_per_ip = 500")],
        ),
        service(
            "added",
            &["127.0.0.4:0", "127.0.0.1:0"],
            &["added.test"],
            ups_new.addr,
            &[],
        ),
    ]
    .concat();
    let mut proxy = Proxy::start_services(&before).await;
    let listeners = [
        proxy.bound("127.0.0.1:0").await,
        proxy.bound("127.0.0.2:0").await,
        proxy.bound("127.0.0.3:0").await,
    ];
    let (go, rounds) = tokio::sync::watch::channel(1u32);
    let mut conns = Vec::new();
    for i in 0..200u64 {
        let to = listeners[i as usize % 3];
        let (code, s) = handshake(client_ip(100 + i as u32 % 50), to, "any.test", "").await;
        assert_eq!(code, 101, "connection {i}");
        conns.push(tokio::spawn(stream_checked(s, i, 4096, rounds.clone())));
    }
    // Every connection has carried a round; a second round runs across the reload.
    go.send(2).unwrap();
    let notes = proxy
        .server
        .apply(wsproxy::Config::parse(&after, "t").unwrap())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(notes.is_empty(), "{notes:?}");
    go.send(3).unwrap();
    let added = proxy.bound("127.0.0.4:0").await;
    // The removed listener stops accepting; its connections stay (they drain).
    let closed = poll_until(DEADLINE, || {
        std::net::TcpStream::connect_timeout(&listeners[2], Duration::from_millis(200))
            .is_err()
            .then_some(())
    })
    .await;
    assert!(closed.is_some(), "the removed listener still accepts");
    let (code, _n1) = handshake(client_ip(1), added, "added.test", "").await;
    assert_eq!(code, 101, "the new listener serves the new service");
    let (code, _n2) = handshake(client_ip(1), listeners[0], "added.test", "").await;
    assert_eq!(code, 101, "a kept listener serves the new service by host");
    let (code, _k) = handshake(client_ip(1), listeners[0], "other.test", "").await;
    assert_eq!(code, 101, "and its old service for the rest");
    assert_eq!(ups_new.accepted(), 2);
    let mut total = 0;
    for c in conns {
        total += within("a checked connection", c).await.unwrap();
    }
    assert_eq!(
        total,
        200 * u64::from(ROUNDS) * 4096,
        "every byte of every connection, once"
    );
    let ended = poll_until(DEADLINE, || {
        let m = Exposition::parse(&proxy.server.metrics_text());
        let closed = [("end", "closed")];
        let by = |service| m.sum("wsproxy_connections_ended_total", &[closed[0], ("service", service)]);
        let all = m.sum("wsproxy_connections_ended_total", &[]);
        (all >= 200.0).then(|| (by("kept"), by("changed"), by("removed"), all))
    })
    .await;
    assert_eq!(
        ended,
        Some((67.0, 67.0, 66.0, 200.0)),
        "every connection closed by its client, none cut, each counted under its service"
    );
    drop((_n1, _n2, _k));
    proxy.begin_stop();
    proxy.wait_stopped(DEADLINE).await;
}

#[tokio::test]
async fn the_admin_listener_answers_get_services_with_json() {
    let (a, b) = (upgrading().await, upgrading().await);
    let text = [
        OPEN.to_string(),
        "[admin]\naddress = \"127.0.0.1:0\"\n".to_string(),
        service("chat", &["127.0.0.1:0"], &["chat.test"], a.addr, &[]),
        service("feed", &["127.0.0.1:0"], &[], b.addr, &[]),
    ]
    .concat();
    let proxy = wsproxy_tests::daemon_kit::ServerProxy::start(&text).await;
    let admin = proxy.admin.unwrap();
    let r = wsproxy_tests::daemon_kit::http(admin, "GET", "/services").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
    let json: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body));
    let names: Vec<&str> = json["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["chat", "feed"]);
    assert_eq!(json["services"][1]["upstreams"][0]["address"], b.addr.to_string());
    let r = wsproxy_tests::daemon_kit::http(admin, "POST", "/services").await;
    assert_eq!(r.status, 405);
    proxy.stop().await;
}

/// The keepalive of the proxy's socket for the client connection `s` (through `listener`).
fn client_side_keepalive(listener: SocketAddr, s: &TcpStream) -> KeepaliveOpts {
    let client = s.local_addr().unwrap();
    let fds = sockets_where(|local, peer| local == listener && peer == client);
    assert_eq!(fds.len(), 1, "the proxy's socket for {client}");
    keepalive_opts(fds[0])
}

/// Accepted sockets inherit their listener's keepalive and Nagle options, so a listener carries
/// those its services share and a connection sets its own where they differ; a reload that
/// changes them applies to the connections after it.
#[tokio::test]
async fn each_service_keeps_its_own_tcp_keepalive_on_a_shared_listener_and_across_a_reload() {
    let up = upgrading().await;
    let keepalive = |idle: u32| format!("idle = \"{idle}s\"\ninterval = \"7s\"\ncount = 4");
    let config = |a: &str, b: &str, alone: &str| {
        [
            OPEN.to_string(),
            service("a", &["127.0.0.1:0"], &["a.test"], up.addr, &[("keepalive", a)]),
            service("b", &["127.0.0.1:0"], &["b.test"], up.addr, &[("keepalive", b)]),
            service("alone", &["127.0.0.2:0"], &[], up.addr, &[("keepalive", alone)]),
        ]
        .concat()
    };
    let on = |idle_s| KeepaliveOpts {
        keepalive: true,
        idle_s,
        interval_s: 7,
        count: 4,
        nodelay: true,
    };
    let proxy = Proxy::start_services(&config(&keepalive(45), "enabled = false", &keepalive(30))).await;
    let (shared, alone) = (proxy.bound("127.0.0.1:0").await, proxy.bound("127.0.0.2:0").await);
    let mut open = Vec::new();
    for (to, host, want) in [
        (shared, "a.test", Some(45)),
        (shared, "b.test", None),
        (alone, "x.test", Some(30)),
    ] {
        let (code, s) = handshake(client_ip(1), to, host, "").await;
        assert_eq!(code, 101, "{host}");
        let o = client_side_keepalive(to, &s);
        match want {
            Some(idle) => assert_eq!(o, on(idle), "{host}"),
            None => assert!(o.nodelay && !o.keepalive, "{host}: {o:?}"),
        }
        open.push((to, s, o));
    }
    // Shared now by both services of the listener; `alone`'s changed.
    let notes = proxy
        .server
        .apply(wsproxy::Config::parse(&config(&keepalive(50), &keepalive(50), &keepalive(20)), "t").unwrap())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(notes.is_empty(), "{notes:?}");
    for (to, host, idle) in [(shared, "a.test", 50), (shared, "b.test", 50), (alone, "x.test", 20)] {
        let (code, s) = handshake(client_ip(1), to, host, "").await;
        assert_eq!(code, 101, "{host}");
        assert_eq!(client_side_keepalive(to, &s), on(idle), "{host} after the reload");
    }
    // Open connections keep what they started with.
    for (to, s, o) in &open {
        assert_eq!(client_side_keepalive(*to, s), *o);
    }
    drop(open);
    proxy.stop().await;
}
