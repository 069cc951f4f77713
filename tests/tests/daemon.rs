//! The daemon features, in-process on `wsproxy::Server` (the binary's side is in
//! `proxy/tests/daemon_cli.rs`): metrics and health on the admin listener (1), reload without
//! drops (2), passive and active upstream health (4), idle timeout and TCP keepalive (5).
//!
//! Every test starts its own proxy (userspace relay, loopback) and upstreams. Upstreams that need
//! to be told apart send a one-letter id right after their 101 ([`Flaky`]).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wsproxy::balance::Balancer;
use wsproxy_tests::daemon_kit::*;
use wsproxy_tests::exposition::Exposition;
use wsproxy_tests::fleet::{Fleet, PER_ROUND, echo_check};
use wsproxy_tests::*;

// ---- helpers of this file ----

const ADMIN: &str = "[admin]\naddress = \"127.0.0.1:0\"\n";
const OPEN_LIMITS: &str = "[limits]\nrequests_per_second = 10000.0\nburst = 10000\nmax_connections_per_ip = 0\n";

/// Config text: the userspace relay, `extra` sections (not `[relay]` nor `[upstreams]`), weighted
/// upstreams, then `upstreams_extra` (keys of `[upstreams]`, then sub-tables such as
/// `[upstreams.health]`).
fn cfg(main: &[(SocketAddr, u32)], backup: &[(SocketAddr, u32)], upstreams_extra: &str, extra: &str) -> String {
    format!(
        "[relay]\nmode = \"userspace\"\n{extra}\n[upstreams]\nmain = [{}]\nbackup = [{}]\n{upstreams_extra}\n",
        weighted(main),
        weighted(backup)
    )
}

/// The first client `client_ip(n)`, n from `from`, whose upstream order satisfies `pred`.
fn client_where(upstreams: &wsproxy::config::Upstreams, from: u32, pred: impl Fn(&[SocketAddr]) -> bool) -> IpAddr {
    let b = Balancer::new(upstreams);
    (from..from + 5000)
        .map(client_ip)
        .find(|&ip| pred(&b.order(ip)))
        .expect("no client among 5000 has the wanted upstream order")
}

/// Reads a request head byte by byte (nothing behind it is consumed).
async fn read_request_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// An upstream whose traffic differs by direction: a valid 101, then it reads 1000 bytes, answers
/// 300, and closes its side.
async fn asymmetric_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let head = read_request_head(&mut s).await;
                let accept = wsproxy::upstream::accept_key(&header(&head, "sec-websocket-key").unwrap_or_default());
                let r = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Accept: {accept}\r\n\r\n"
                );
                s.write_all(r.as_bytes()).await?;
                let mut buf = vec![0u8; 1000];
                s.read_exact(&mut buf).await?;
                s.write_all(&[b'u'; 300]).await?;
                s.shutdown().await?;
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await?;
                Ok::<_, std::io::Error>(())
            });
        }
    });
    addr
}

// ---- 1: metrics and health on the admin listener ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req1_metrics_count_every_handshake_outcome() {
    let asym = asymmetric_upstream().await;
    let extra = format!(
        "{ADMIN}[limits]\nrequests_per_second = 0.001\nburst = 3\nmax_connections_per_ip = 0\n\
         [handshake]\nmax_head_bytes = 1024\nheader_timeout = \"300ms\"\n"
    );
    // A refused connection holds its client's slot until the client has closed it too, so the
    // per-client cap (client 7) is set only once the clients that are refused in turn are done.
    let capped = extra.replace("max_connections_per_ip = 0", "max_connections_per_ip = 1");
    let proxy = ServerProxy::start(&cfg(&[(asym, 1)], &[], "timeout = \"2s\"", &extra)).await;
    let admin = proxy.admin.unwrap();

    // Series that exist from the start.
    let m = proxy.scrape().await;
    for relay in ["userspace", "kernel"] {
        assert_eq!(m.value("wsproxy_connections_open", &[("relay", relay)]), 0.0);
    }
    assert_eq!(
        m.value("wsproxy_kernel_relay_available", &[]),
        0.0,
        "userspace mode loads no kernel relay"
    );
    assert_eq!(m.value("wsproxy_relay_fallbacks_total", &[]), 0.0);

    // upgraded/101 (client 1), with 1000 bytes up and 300 down; the open gauge while it is open.
    let upgraded_exchange = |ip: IpAddr, addr: SocketAddr| async move {
        let mut s = connect_from(ip, addr).await;
        s.write_all(request("/m").as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        assert_eq!(status(&head), 101, "{head}");
        s
    };
    let finish = |mut s: TcpStream| async move {
        s.write_all(&[b'c'; 1000]).await.unwrap();
        s.shutdown().await.unwrap();
        let back = read_to_close(&mut s).await;
        assert_eq!(back, "u".repeat(300));
    };
    let c1 = upgraded_exchange(client_ip(1), proxy.addr).await;
    proxy
        .scrape_until("one open userspace connection", |e| {
            e.get("wsproxy_connections_open", &[("relay", "userspace")]) == Some(1.0)
        })
        .await;
    finish(c1).await;

    // refused: 400 (client 2), 426 (client 3), 431 (client 4), 408 (client 5).
    let r = exchange(client_ip(2), proxy.addr, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(status(&r), 400, "{r}");
    let r = exchange(
        client_ip(3),
        proxy.addr,
        request("/").replace("Version: 13", "Version: 8").as_bytes(),
    )
    .await;
    assert_eq!(status(&r), 426, "{r}");
    let big = request("/").replace(
        "Host: test\r\n",
        &format!("Host: test\r\nX-Big: {}\r\n", "b".repeat(2000)),
    );
    let r = exchange(client_ip(4), proxy.addr, big.as_bytes()).await;
    assert_eq!(status(&r), 431, "{r}");
    let r = exchange(client_ip(5), proxy.addr, b"GET / HTTP/1.1\r\nHost: t\r\n").await;
    assert_eq!(status(&r), 408, "{r}");

    // rate_limited (client 6): a burst of 3, then 429.
    for _ in 0..3 {
        let r = exchange(client_ip(6), proxy.addr, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(status(&r), 400, "{r}");
    }
    let r = exchange(client_ip(6), proxy.addr, request("/").as_bytes()).await;
    assert_eq!(status(&r), 429, "{r}");
    assert!(
        header(&r, "retry-after").is_some() && r.ends_with("request rate limit\n"),
        "{r}"
    );

    // connection_limited (client 7): one open connection is its cap.
    proxy.apply(&cfg(&[(asym, 1)], &[], "timeout = \"2s\"", &capped));
    let c7 = upgraded_exchange(client_ip(7), proxy.addr).await;
    let r = exchange(client_ip(7), proxy.addr, request("/").as_bytes()).await;
    assert!(status(&r) == 429 && r.ends_with("connection limit\n"), "{r}");
    finish(c7).await;

    // upstream_timeout (client 8): the only upstream never answers.
    let silent = Upstream::start(Script::Silent).await;
    proxy.apply(&cfg(&[(silent.addr, 1)], &[], "timeout = \"300ms\"", &extra));
    let r = exchange(client_ip(8), proxy.addr, request("/").as_bytes()).await;
    assert_eq!(status(&r), 400, "{r}");

    // upstream_error (client 9): the upstream answers 503; the client gets nothing.
    let refusing = Upstream::start(Script::Respond(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".into(),
    ))
    .await;
    proxy.apply(&cfg(&[(refusing.addr, 1)], &[], "timeout = \"2s\"", &extra));
    let r = exchange(client_ip(9), proxy.addr, request("/").as_bytes()).await;
    assert_eq!(r, "", "nothing of the upstream's refusal reaches the client");

    // all_upstreams_down (client 10): nothing listens on the main nor the backup upstream.
    let (dead1, dead2) = (dead_addr().await, dead_addr().await);
    proxy.apply(&cfg(&[(dead1, 1)], &[(dead2, 1)], "timeout = \"2s\"", &extra));
    let r = exchange(client_ip(10), proxy.addr, request("/").as_bytes()).await;
    assert_eq!(status(&r), 400, "{r}");

    let m = proxy
        .scrape_until("both relayed connections counted, none open", |e| {
            // The open gauge falls last as a connection ends (its bytes and end are counted
            // first): both are waited for.
            e.get(
                "wsproxy_connections_ended_total",
                &[("relay", "userspace"), ("end", "closed")],
            ) == Some(2.0)
                && e.get("wsproxy_connections_open", &[("relay", "userspace")]) == Some(0.0)
        })
        .await;
    let hs =
        |outcome: &str, status: &str| m.get("wsproxy_handshakes_total", &[("outcome", outcome), ("status", status)]);
    let expected = [
        ("upgraded", "101", 2.0),
        ("refused", "400", 4.0),
        ("refused", "426", 1.0),
        ("refused", "431", 1.0),
        ("refused", "408", 1.0),
        ("rate_limited", "429", 1.0),
        ("connection_limited", "429", 1.0),
        ("upstream_timeout", "400", 1.0),
        ("upstream_error", "0", 1.0),
        ("all_upstreams_down", "400", 1.0),
    ];
    for (outcome, status, n) in expected {
        assert_eq!(
            hs(outcome, status),
            Some(n),
            "handshakes {outcome}/{status}:\n{}",
            m.text
        );
    }
    assert_eq!(
        m.sum("wsproxy_handshakes_total", &[]),
        14.0,
        "no other outcome:\n{}",
        m.text
    );

    // The latency histogram saw every handshake; the 408 and the timeout took 300 ms each.
    assert_eq!(
        m.type_of("wsproxy_handshake_duration_seconds").as_deref(),
        Some("histogram")
    );
    assert_eq!(m.value("wsproxy_handshake_duration_seconds_count", &[]), 14.0);
    let sum = m.value("wsproxy_handshake_duration_seconds_sum", &[]);
    assert!((0.6..10.0).contains(&sum), "duration sum {sum}");
    let buckets = m.buckets("wsproxy_handshake_duration_seconds");
    let last = buckets.last().unwrap();
    assert_eq!((last.less_than, last.count), (f64::INFINITY, 14.0));
    let buckets: Vec<f64> = buckets.iter().map(|b| b.count).collect();
    assert!(
        buckets.len() > 10 && buckets.windows(2).all(|w| w[0] <= w[1]),
        "{buckets:?}"
    );

    // Attempts and failures per upstream.
    let up = |a: SocketAddr| a.to_string();
    for (addr, attempts) in [
        (asym, 2.0),
        (silent.addr, 1.0),
        (refusing.addr, 1.0),
        (dead1, 1.0),
        (dead2, 1.0),
    ] {
        assert_eq!(
            m.get("wsproxy_upstream_attempts_total", &[("upstream", &up(addr))]),
            Some(attempts),
            "{addr}"
        );
    }
    assert_eq!(
        m.sum("wsproxy_upstream_failures_total", &[("upstream", &up(asym))]),
        0.0
    );
    for (addr, reason) in [
        (silent.addr, "timeout"),
        (refusing.addr, "status"),
        (dead1, "connect"),
        (dead2, "connect"),
    ] {
        assert_eq!(
            m.get(
                "wsproxy_upstream_failures_total",
                &[("upstream", &up(addr)), ("reason", reason)]
            ),
            Some(1.0),
            "{addr} {reason}:\n{}",
            m.text
        );
    }

    // Bytes by direction, the gauges back to 0, no fallback, reloads counted.
    let bytes = |dir: &str| {
        m.value(
            "wsproxy_relayed_bytes_total",
            &[("relay", "userspace"), ("direction", dir)],
        )
    };
    assert_eq!(
        (bytes("client_to_upstream"), bytes("upstream_to_client")),
        (2000.0, 600.0)
    );
    assert_eq!(
        m.value(
            "wsproxy_relayed_bytes_total",
            &[("relay", "kernel"), ("direction", "client_to_upstream")]
        ),
        0.0
    );
    assert_eq!(m.value("wsproxy_connections_open", &[("relay", "userspace")]), 0.0);
    assert_eq!(m.value("wsproxy_connections_open", &[("relay", "kernel")]), 0.0);
    assert_eq!(m.value("wsproxy_relay_fallbacks_total", &[]), 0.0);
    assert_eq!(m.value("wsproxy_kernel_relay_available", &[]), 0.0);
    assert_eq!(m.value("wsproxy_config_reloads_total", &[("result", "ok")]), 4.0);
    assert_eq!(m.type_of("wsproxy_handshakes").as_deref(), Some("counter"));
    assert_eq!(m.type_of("wsproxy_connections_open").as_deref(), Some("gauge"));
    // The same numbers through the API.
    let t = proxy.server.totals();
    assert_eq!(
        (t.client_to_upstream[1], t.upstream_to_client[1], t.ended[1]),
        (2000, 600, 2)
    );

    // Other paths and methods.
    assert_eq!(http(admin, "POST", "/metrics").await.status, 405);
    assert_eq!(http(admin, "GET", "/nope").await.status, 404);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req1_healthz_ok_while_accepting_503_while_draining() {
    let echo = echo_upstream().await;
    let extra = format!("{ADMIN}[listen]\ndrain_timeout = \"30s\"\n");
    let mut proxy = ServerProxy::start(&cfg(&[(echo, 1)], &[], "", &extra)).await;
    let admin = proxy.admin.unwrap();
    let r = http(admin, "GET", "/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"), "{r:?}");
    assert!(proxy.server.accepting());

    let mut ws = ws_connect(client_ip(1), proxy.addr).await.unwrap();
    echo_check(&mut ws, "before the stop").await;
    proxy.begin_stop();
    let end = Instant::now() + DEADLINE;
    loop {
        let r = http(admin, "GET", "/healthz").await;
        if r.status == 503 {
            break;
        }
        assert_eq!(r.status, 200, "{r:?}");
        assert!(Instant::now() < end, "/healthz never answered 503 after the stop began");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!proxy.server.accepting());
    let refused = TcpStream::connect(proxy.addr).await;
    assert_eq!(
        refused.map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );

    // The open connection still flows during the drain; once it ends, the stop completes long
    // before the 30 s drain timeout.
    echo_check(&mut ws, "during the drain").await;
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = within("the close", ws.next()).await {}
    drop(ws);
    proxy.wait_stopped(Duration::from_secs(5)).await;
    assert_eq!(
        http(admin, "GET", "/healthz").await.status,
        503,
        "still 503 after the stop"
    );
    assert_eq!(proxy.server.totals().drain_timeouts, 0);
    proxy.stop().await;
}

/// A connection the graceful stop closes at `[listen] drain_timeout` ends like any other: the
/// open gauge goes back down and the end is counted (with its bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req1_connection_closed_by_the_shutdown_drain_is_counted() {
    let up = Flaky::start("U").await;
    let extra = format!("{ADMIN}[listen]\ndrain_timeout = \"1s\"\n");
    let mut proxy = ServerProxy::start(&cfg(&[(up.addr, 1)], &[], "", &extra)).await;
    let (mut s, _) = upgrade_and_id(client_ip(1), proxy.addr, 1).await.unwrap();
    s.write_all(&[b'd'; 40]).await.unwrap();
    let mut back = [0u8; 40];
    within("the echo", s.read_exact(&mut back)).await.unwrap();
    assert_eq!(proxy.server.totals().open[1], 1);
    proxy.begin_stop();
    proxy.wait_stopped(Duration::from_secs(5)).await;
    read_to_close(&mut s).await;
    let m = proxy.scrape().await;
    assert_eq!(
        (
            m.value("wsproxy_connections_open", &[("relay", "userspace")]),
            m.sum("wsproxy_connections_ended_total", &[])
        ),
        (0.0, 1.0),
        "the connection closed at the drain timeout is still counted as open:\n{}",
        m.text
    );
    assert_eq!(
        m.value(
            "wsproxy_relayed_bytes_total",
            &[("relay", "userspace"), ("direction", "client_to_upstream")]
        ),
        40.0
    );
    proxy.stop().await;
}

/// `listen.close_spread`: the connections a drain ends close over the window, not at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req1_connections_a_drain_ends_close_spread_over_the_window() {
    let up = Upstream::start(Script::Upgrade { after: Vec::new() }).await;
    let extra = "[listen]\ndrain_timeout = \"300ms\"\nclose_spread = \"2s\"\n[limits]\nrequests_per_second = 1000.0\nburst = 1000\n";
    let mut proxy = Proxy::start(&config(&[up.addr], &[], extra)).await;
    let mut open = Vec::new();
    for i in 0..40 {
        let mut s = connect_from(client_ip(1 + i), proxy.addr).await;
        try_upgrade(&mut s, "/").await.unwrap();
        open.push(s);
    }
    let stopping = Instant::now();
    proxy.begin_stop();
    let closes = futures_util::future::join_all(open.into_iter().map(|mut s| async move {
        read_to_close(&mut s).await;
        stopping.elapsed()
    }))
    .await;
    let (first, last) = (closes.iter().min().unwrap(), closes.iter().max().unwrap());
    assert!(
        *first >= Duration::from_millis(300),
        "closed before the drain's end: {first:?}"
    );
    assert!(
        *last - *first >= Duration::from_secs(1),
        "40 closes within {:?}: not spread over the 2 s window",
        *last - *first
    );
    assert!(*last <= Duration::from_millis(300 + 2000 + 1000), "{last:?}");
    proxy.wait_stopped(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn req1_admin_listener_off_without_address() {
    let echo = echo_upstream().await;
    let text = cfg(&[(echo, 1)], &[], "", "");
    assert!(wsproxy::Config::parse(&text, "t").unwrap().admin.is_none());
    let proxy = ServerProxy::start(&text).await;
    assert!(proxy.server.config().admin.is_none());
    assert!(proxy.admin.is_none());
    // With an address it is on.
    let with = cfg(&[(echo, 1)], &[], "", "[admin]\naddress = \"127.0.0.1:9999\"\n");
    assert_eq!(
        wsproxy::Config::parse(&with, "t").unwrap().admin.map(|a| a.address),
        Some(wsproxy::config::AdminAddress::Tcp("127.0.0.1:9999".parse().unwrap()))
    );
    proxy.stop().await;
}

fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/wsproxy.toml")
}

#[test]
fn req1_shipped_config_sets_admin_on_loopback_9090() {
    let c = wsproxy::Config::load(&shipped_config()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.admin.map(|a| a.address),
        Some(wsproxy::config::AdminAddress::Tcp("127.0.0.1:9090".parse().unwrap())),
        "the shipped config must enable the admin listener"
    );
}

/// The shipped file shows every option (set or commented out) in its section.
#[test]
fn req1_shipped_config_documents_every_daemon_option() {
    let text = std::fs::read_to_string(shipped_config()).unwrap();
    // Lines with any leading "#" and blanks removed: commented-out options count.
    let lines: Vec<&str> = text.lines().map(|l| l.trim_start_matches(['#', ' '])).collect();
    let has = |section: &str, key: &str| {
        let Some(start) = lines.iter().position(|l| *l == format!("[{section}]")) else {
            return false;
        };
        lines[start + 1..]
            .iter()
            .take_while(|l| !(l.starts_with('[') && l.ends_with(']')))
            .any(|l| l.starts_with(&format!("{key} =")))
    };
    // Every option the configuration's file structs accept (proxy/src/config/), section by
    // section ("[service]" for the [[service]] blocks); `upstreams.main`/`backup` entries and
    // `headers.add` entries are lists of tables.
    let wanted = [
        ("listen", "address"),
        ("listen", "max_connections"),
        ("listen", "drain_timeout"),
        ("listen", "close_spread"),
        ("upgrade", "socket"),
        ("upgrade", "timeout"),
        ("listen.proxy_protocol", "trusted"),
        ("listen.proxy_protocol", "header_timeout"),
        ("admin", "address"),
        ("admin", "idle_timeout"),
        ("admin", "max_connections"),
        ("admin", "token_file"),
        ("access", "allow"),
        ("access", "deny"),
        ("access", "origins"),
        ("limits", "requests_per_second"),
        ("limits", "burst"),
        ("limits", "max_connections_per_ip"),
        ("limits", "ipv6_prefix"),
        ("limits", "max_tracked_clients"),
        ("limits", "max_connections_per_network"),
        ("limits", "network_prefix_v4"),
        ("limits", "network_prefix_v6"),
        ("limits", "max_connections"),
        ("[service]", "name"),
        ("[service]", "listen"),
        ("[service]", "hosts"),
        ("handshake", "max_head_bytes"),
        ("handshake", "max_headers"),
        ("handshake", "header_timeout"),
        ("headers", "underscore_headers"),
        ("headers", "forwarded_proto"),
        ("headers", "forwarded"),
        ("headers", "trusted_proxies"),
        ("headers", "forwarded_for"),
        ("headers", "client_address_header"),
        ("headers", "request_id_header"),
        ("headers", "add"),
        ("upstreams", "main"),
        ("upstreams", "backup"),
        ("upstreams", "timeout"),
        ("upstreams", "max_head_bytes"),
        ("upstreams", "send_proxy_protocol"),
        ("upstreams", "on_refusal"),
        ("upstreams", "balance"),
        ("upstreams", "resolve_interval"),
        ("upstreams.tls", "enabled"),
        ("upstreams.tls", "server_name"),
        ("upstreams.tls", "ca_file"),
        ("upstreams.tls", "client_certificate"),
        ("upstreams.tls", "client_key"),
        ("upstreams.tls", "verify"),
        ("tls", "certificate"),
        ("tls", "key"),
        ("tls", "default_certificate"),
        ("tls", "handshake_timeout"),
        ("tls", "min_version"),
        ("tls", "expiry_warning"),
        ("upstreams.health", "max_fails"),
        ("upstreams.health", "fail_timeout"),
        ("upstreams.health", "probe_interval"),
        ("upstreams.health", "probe"),
        ("upstreams.health", "count_5xx"),
        ("keepalive", "enabled"),
        ("keepalive", "idle"),
        ("keepalive", "interval"),
        ("keepalive", "count"),
        ("relay", "mode"),
        ("relay", "promote_after_messages"),
        ("relay", "promote_max_average_message"),
        ("relay", "promote_within"),
        ("relay", "max_in_flight_bytes"),
        ("relay", "max_in_flight_skbs"),
        ("relay", "drain_timeout"),
        ("relay", "idle_timeout"),
        ("relay", "max_lifetime"),
        ("relay", "max_lifetime_jitter"),
        ("relay", "send_timeout"),
        ("relay", "park_after"),
        ("relay", "client_sndbuf"),
        ("relay", "client_rcvbuf"),
        ("relay", "upstream_sndbuf"),
        ("relay", "upstream_rcvbuf"),
        ("cluster", "url"),
        ("cluster", "key_prefix"),
        ("cluster", "requests_per_second"),
        ("cluster", "burst"),
        ("cluster", "max_connections_per_ip"),
        ("cluster", "lease_ttl"),
        ("cluster", "timeout"),
        ("cluster", "on_store_error"),
    ];
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(s, k)| !has(s, k))
        .map(|(s, k)| format!("{s}.{k}"))
        .collect();
    assert!(missing.is_empty(), "config/wsproxy.toml does not show: {missing:?}");
}

// ---- 2: reload without drops ----

const CONNS: usize = 100;
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req2_reloads_keep_100_websockets_and_new_ones_get_new_settings() {
    let echo = echo_upstream().await;
    let (mut s1, mut s2) = (Flaky::start("1").await, Flaky::start("2").await);
    let text = |main: &[(SocketAddr, u32)], backup: &[(SocketAddr, u32)], generation: u32, limits: &str| {
        let extra = format!("{limits}[headers]\nadd = [{{ name = \"X-Gen\", value = \"{generation}\" }}]\n");
        cfg(main, backup, "timeout = \"2s\"", &extra)
    };
    let proxy = ServerProxy::start(&text(&[(echo, 1)], &[], 0, OPEN_LIMITS)).await;
    let mut fleet = Fleet::open(proxy.addr, CONNS, 1).await;
    let mut extra_relayed = 0u64;

    // One new raw connection from `ip`: which upstream took it, and the X-Gen it forwarded.
    async fn landing(proxy: SocketAddr, ip: IpAddr, ups: [&mut Flaky; 2]) -> (String, Option<String>) {
        let (s, id) = upgrade_and_id(ip, proxy, 1)
            .await
            .unwrap_or_else(|h| panic!("{ip}: {h}"));
        drop(s);
        let up = ups
            .into_iter()
            .find(|u| u.id == id)
            .unwrap_or_else(|| panic!("unknown id {id:?}"));
        let seen = within("the upstream's record", up.seen.recv()).await.unwrap();
        (id, header(&seen.head, "x-gen"))
    }

    // Reload 1: a second upstream (s1) joins; new clients whose first choice it is go to it.
    fleet.start_round(1);
    let t1 = text(&[(echo, 1), (s1.addr, 1)], &[], 1, OPEN_LIMITS);
    proxy.apply(&t1);
    let c = client_where(&proxy.server.config().services[0].upstreams, 1000, |o| o[0] == s1.addr);
    assert_eq!(
        landing(proxy.addr, c, [&mut s1, &mut s2]).await,
        ("1".into(), Some("1".into()))
    );
    let c = client_where(&proxy.server.config().services[0].upstreams, 1000, |o| o[0] == echo);
    let mut ws = ws_connect(c, proxy.addr).await.unwrap();
    echo_check(&mut ws, "new client on the echo upstream").await;
    drop(ws);
    extra_relayed += 2;
    fleet.finish_round(1).await;

    // Reload 2: the echo upstream leaves (its 100 connections stay), s2 joins with weight 3.
    fleet.start_round(2);
    let t2 = text(&[(s1.addr, 1), (s2.addr, 3)], &[], 2, OPEN_LIMITS);
    proxy.apply(&t2);
    let ups2 = proxy.server.config().services[0].upstreams.clone();
    let c = client_where(&ups2, 1000, |o| o[0] == s2.addr);
    assert_eq!(
        landing(proxy.addr, c, [&mut s1, &mut s2]).await,
        ("2".into(), Some("2".into()))
    );
    let c = client_where(&ups2, 1000, |o| o[0] == s1.addr);
    assert_eq!(
        landing(proxy.addr, c, [&mut s1, &mut s2]).await,
        ("1".into(), Some("2".into()))
    );
    extra_relayed += 2;
    fleet.finish_round(2).await;

    // Reload 3: one connection per client; a new client's second connection is refused.
    fleet.start_round(3);
    let capped = "[limits]\nrequests_per_second = 10000.0\nburst = 10000\nmax_connections_per_ip = 1\n";
    proxy.apply(&text(&[(s1.addr, 1), (s2.addr, 3)], &[], 3, capped));
    let (held, id) = upgrade_and_id(client_ip(3000), proxy.addr, 1).await.unwrap();
    let r = exchange(client_ip(3000), proxy.addr, request("/").as_bytes()).await;
    assert_eq!(status(&r), 429, "{r}");
    drop(held);
    let up = if id == "1" { &mut s1 } else { &mut s2 };
    let seen = within("the upstream's record", up.seen.recv()).await.unwrap();
    assert_eq!(header(&seen.head, "x-gen").as_deref(), Some("3"));
    extra_relayed += 1;
    fleet.finish_round(3).await;

    // Reload 4: s1's weight goes to 0; clients whose first choice it was move to s2.
    fleet.start_round(4);
    proxy.apply(&text(&[(s1.addr, 0), (s2.addr, 1)], &[], 4, OPEN_LIMITS));
    let s1_before = s1.accepted();
    let b2 = Balancer::new(&ups2);
    let movers: Vec<IpAddr> = (4000..6000)
        .map(client_ip)
        .filter(|&ip| b2.order(ip)[0] == s1.addr)
        .take(5)
        .collect();
    for ip in movers {
        assert_eq!(
            landing(proxy.addr, ip, [&mut s1, &mut s2]).await,
            ("2".into(), Some("4".into()))
        );
    }
    assert_eq!(s1.accepted(), s1_before, "a weight-0 upstream got a new client");
    extra_relayed += 5;
    fleet.finish_round(4).await;

    // Reload 5: s1 main, s2 backup, another header value.
    fleet.start_round(5);
    proxy.apply(&text(&[(s1.addr, 1)], &[(s2.addr, 1)], 5, OPEN_LIMITS));
    assert_eq!(
        landing(proxy.addr, client_ip(7000), [&mut s1, &mut s2]).await,
        ("1".into(), Some("5".into()))
    );
    extra_relayed += 1;
    fleet.finish_round(5).await;

    // A last round after every reload; none of the 100 connections has ended.
    fleet.start_round(6);
    fleet.finish_round(6).await;
    let end = Instant::now() + DEADLINE;
    while proxy.server.totals().ended[1] < extra_relayed {
        assert!(
            Instant::now() < end,
            "the extra connections did not end: {:?}",
            proxy.server.totals()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t = proxy.server.totals();
    assert_eq!((t.open[1], t.ended[1]), (CONNS as u64, extra_relayed), "{t:?}");
    let m = Exposition::parse(&proxy.server.metrics_text());
    assert_eq!(m.value("wsproxy_config_reloads_total", &[("result", "ok")]), 5.0);

    let counts = fleet.close().await;
    assert!(counts.iter().all(|&n| n == 6 * PER_ROUND), "{counts:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req2_invalid_config_file_is_refused_and_the_old_one_kept() {
    let mut s1 = Flaky::start("1").await;
    let s1_addr = s1.addr;
    let dir = std::env::temp_dir().join(format!("wsproxy-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("reload.toml");
    let good = |generation: &str| {
        let extra =
            format!("{ADMIN}{OPEN_LIMITS}[headers]\nadd = [{{ name = \"X-Gen\", value = \"{generation}\" }}]\n");
        cfg(&[(s1_addr, 1)], &[], "timeout = \"2s\"", &extra)
    };
    std::fs::write(&path, good("old")).unwrap();
    let proxy = ServerProxy::start_server(wsproxy::Server::from_file(path.clone()).unwrap()).await;
    let admin = proxy.admin.unwrap();

    /// The X-Gen header a new connection from `ip` forwards to `s1`.
    async fn gen_seen(proxy: SocketAddr, s1: &mut Flaky, ip: IpAddr) -> Option<String> {
        let (s, id) = upgrade_and_id(ip, proxy, 1).await.unwrap();
        assert_eq!(id, "1");
        drop(s);
        header(
            &within("the upstream's record", s1.seen.recv()).await.unwrap().head,
            "x-gen",
        )
    }
    assert_eq!(
        gen_seen(proxy.addr, &mut s1, client_ip(1)).await.as_deref(),
        Some("old")
    );
    let (mut held, _) = upgrade_and_id(client_ip(2), proxy.addr, 1).await.unwrap();

    // A file with bad values: every field named, nothing changed.
    std::fs::write(
        &path,
        format!("{ADMIN}[limits]\nburst = 0\n[upstreams]\nmain = []\ntimeout = \"0s\"\n"),
    )
    .unwrap();
    let e = proxy.server.reload().unwrap_err();
    for field in ["limits.burst", "upstreams.main", "upstreams.timeout"] {
        assert!(
            e.problems.iter().any(|p| p.starts_with(field)),
            "{field} not named: {e}"
        );
    }
    assert_eq!(proxy.server.config().services[0].headers.add[0].value, "old");
    // The same through POST /reload: 400 and every problem.
    let r = http(admin, "POST", "/reload").await;
    assert_eq!(r.status, 400, "{r:?}");
    for field in ["limits.burst", "upstreams.main", "upstreams.timeout"] {
        assert!(r.body.contains(field), "{field} not in {r:?}");
    }
    // A syntax error.
    std::fs::write(&path, "[upstreams\nmain = ").unwrap();
    let e = proxy.server.reload().unwrap_err();
    assert!(e.problems[0].starts_with("syntax"), "{e}");

    // Still serving, with the old settings, and the open connection still flows.
    assert_eq!(
        gen_seen(proxy.addr, &mut s1, client_ip(3)).await.as_deref(),
        Some("old")
    );
    held.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    within("the echo", held.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"still here");
    let m = proxy.scrape().await;
    assert_eq!(m.value("wsproxy_config_reloads_total", &[("result", "error")]), 3.0);
    assert_eq!(m.value("wsproxy_config_reloads_total", &[("result", "ok")]), 0.0);

    // A good file again, through POST /reload.
    std::fs::write(&path, good("new")).unwrap();
    let r = http(admin, "POST", "/reload").await;
    assert_eq!((r.status, r.body.as_str()), (200, "reloaded\n"), "{r:?}");
    assert_eq!(
        gen_seen(proxy.addr, &mut s1, client_ip(4)).await.as_deref(),
        Some("new")
    );

    // A proxy not started from a file cannot reload one.
    let plain = wsproxy::Server::new(wsproxy::Config::parse(&good("x"), "t").unwrap()).unwrap();
    assert!(
        plain
            .reload()
            .unwrap_err()
            .to_string()
            .contains("not started from a file")
    );
    drop(held);
    proxy.stop().await;
}

// ---- 4: upstream health ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req4_passive_health_marks_down_skips_and_recovers() {
    let mut a = Flaky::start("A").await;
    let (b, c) = (Flaky::start("B").await, Flaky::start("C").await);
    let health = "timeout = \"1s\"\n[upstreams.health]\nmax_fails = 2\nfail_timeout = \"2s\"\n";
    let text = cfg(
        &[(a.addr, 1), (b.addr, 1), (c.addr, 1)],
        &[],
        health,
        &format!("{ADMIN}{OPEN_LIMITS}"),
    );
    let proxy = ServerProxy::start(&text).await;
    let ups = proxy.server.config().services[0].upstreams.clone();
    let ids = [(a.addr, "A"), (b.addr, "B"), (c.addr, "C")];
    let id = |addr: SocketAddr| ids.iter().find(|x| x.0 == addr).unwrap().1;
    let x = client_where(&ups, 1, |o| o[0] == a.addr);
    let x_next = Balancer::new(&ups).order(x)[1];
    let z = client_where(&ups, 1, |o| o[0] == a.addr && o[1] != x_next);
    let z_next = Balancer::new(&ups).order(z)[1];
    let y = client_where(&ups, 1, |o| o[0] == b.addr);
    let paddr = proxy.addr;
    let land = |ip: IpAddr| async move { upgrade_and_id(ip, paddr, 1).await.unwrap().1 };
    let a_label = a.addr.to_string();
    let up_a = |e: &Exposition| e.get("wsproxy_upstream_up", &[("upstream", &a_label)]);
    let attempts_a = |e: &Exposition| e.get("wsproxy_upstream_attempts_total", &[("upstream", &a_label)]);

    assert_eq!(land(x).await, "A");
    assert_eq!(up_a(&proxy.scrape().await), Some(1.0));

    // A dies: two failed attempts (each failing over to x's next choice) mark it down.
    a.kill().await;
    for _ in 0..2 {
        assert_eq!(land(x).await, id(x_next));
    }
    let marked = Instant::now();
    let m = proxy.scrape().await;
    assert_eq!(up_a(&m), Some(0.0), "{}", m.text);
    assert_eq!(attempts_a(&m), Some(3.0));
    assert_eq!(
        m.value(
            "wsproxy_upstream_failures_total",
            &[("upstream", &a_label), ("reason", "connect")]
        ),
        2.0
    );

    // Down: skipped without an attempt; A's clients go to their own next choice, others stay.
    assert_eq!(land(x).await, id(x_next));
    assert_eq!(land(z).await, id(z_next));
    assert_eq!(land(y).await, "B");
    assert_eq!(
        attempts_a(&proxy.scrape().await),
        Some(3.0),
        "a down upstream was tried"
    );
    assert!(
        marked.elapsed() < Duration::from_secs(2),
        "the checks above ran past the cool-down; make it longer"
    );

    // A is back; after the cool-down its clients return to it.
    a.revive().await;
    let end = Instant::now() + DEADLINE;
    loop {
        let got = land(x).await;
        if got == "A" {
            break;
        }
        assert_eq!(got, id(x_next));
        assert!(Instant::now() < end, "x never went back to A");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back_after = marked.elapsed();
    assert!(
        back_after >= Duration::from_millis(1800),
        "back after {back_after:?}, before the 2 s cool-down"
    );
    assert_eq!(land(z).await, "A");
    assert_eq!(up_a(&proxy.scrape().await), Some(1.0));
    proxy.stop().await;
}

/// Active probes mark a dead upstream down without any client traffic, and up when it is back.
async fn active_probes(kind: &str) {
    let mut a = Flaky::start("A").await;
    let b = Flaky::start("B").await;
    let health = format!(
        "timeout = \"500ms\"\n[upstreams.health]\nmax_fails = 2\nfail_timeout = \"30s\"\n\
         probe_interval = \"200ms\"\nprobe = \"{kind}\"\n"
    );
    let proxy = ServerProxy::start(&cfg(&[(a.addr, 1), (b.addr, 1)], &[], &health, ADMIN)).await;
    let (a_label, b_label) = (a.addr.to_string(), b.addr.to_string());
    let up = |e: &Exposition, l: &str| e.get("wsproxy_upstream_up", &[("upstream", l)]);
    /// Waits until `n` more probe connections reached `f`.
    async fn wait_probes(f: &Flaky, n: usize) {
        let (start, end) = (f.accepted(), Instant::now() + DEADLINE);
        while f.accepted() < start + n {
            assert!(Instant::now() < end, "no probes reached {}", f.addr);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Probes arrive without clients.
    wait_probes(&a, 2).await;
    if kind == "websocket" {
        let seen = within("a probe's record", a.seen.recv()).await.unwrap();
        assert!(
            seen.head.starts_with("GET ") && seen.head.contains("wsproxy-probe"),
            "{}",
            seen.head
        );
    }
    assert_eq!(up(&proxy.scrape().await, &a_label), Some(1.0));

    // Dead: marked down by the probes alone.
    a.kill().await;
    let t = Instant::now();
    let m = proxy
        .scrape_until("A marked down by probes", |e| up(e, &a_label) == Some(0.0))
        .await;
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(up(&m, &b_label), Some(1.0));
    assert_eq!(m.sum("wsproxy_handshakes_total", &[]), 0.0, "there was client traffic");
    assert_eq!(
        m.sum("wsproxy_upstream_attempts_total", &[]),
        0.0,
        "probes are not client attempts"
    );

    // Back on the same port: up again, long before the 30 s cool-down.
    a.revive().await;
    let t = Instant::now();
    proxy
        .scrape_until("A marked up by probes", |e| up(e, &a_label) == Some(1.0))
        .await;
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // Accepting TCP but not answering the handshake: only a WebSocket probe notices.
    a.answering(false);
    if kind == "websocket" {
        proxy
            .scrape_until("A down: no 101", |e| up(e, &a_label) == Some(0.0))
            .await;
        a.answering(true);
        proxy
            .scrape_until("A up: 101 again", |e| up(e, &a_label) == Some(1.0))
            .await;
    } else {
        wait_probes(&a, 4).await;
        assert_eq!(
            up(&proxy.scrape().await, &a_label),
            Some(1.0),
            "a TCP probe only connects"
        );
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req4_active_tcp_probes_mark_down_and_up() {
    active_probes("tcp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req4_active_websocket_probes_mark_down_and_up() {
    active_probes("websocket").await;
}

// ---- 5: idle timeout and keepalive ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req5_no_idle_timeout_by_default() {
    let echo = echo_upstream().await;
    let proxy = ServerProxy::start(&cfg(&[(echo, 1)], &[], "", "")).await;
    assert_eq!(proxy.server.config().services[0].relay.idle_timeout, None);
    let mut ws = ws_connect(client_ip(1), proxy.addr).await.unwrap();
    echo_check(&mut ws, "before the silence").await;
    // The silence under test, not a wait for something.
    tokio::time::sleep(Duration::from_secs(3)).await;
    echo_check(&mut ws, "after 3 s of silence").await;
    let t = proxy.server.totals();
    assert_eq!((t.open[1], t.ended[1]), (1, 0), "{t:?}");
    drop(ws);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req5_idle_timeout_closes_a_silent_connection_not_a_talking_one() {
    let up = Flaky::start("U").await;
    let text = cfg(&[(up.addr, 1)], &[], "", "").replace(
        "mode = \"userspace\"\n",
        "mode = \"userspace\"\nidle_timeout = \"1s\"\n",
    );
    let proxy = ServerProxy::start(&text).await;
    let (mut silent, _) = upgrade_and_id(client_ip(1), proxy.addr, 1).await.unwrap();
    let (mut talker, _) = upgrade_and_id(client_ip(2), proxy.addr, 1).await.unwrap();

    silent.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    within("the echo", silent.read_exact(&mut b)).await.unwrap();
    let last_byte = Instant::now();
    let closed = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        let r = silent.read(&mut buf).await;
        (Instant::now(), r.map_err(|e| e.kind()))
    });

    // The talker sends every 250 ms for 3 s; every message comes back.
    for i in 0..12u8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        talker.write_all(&[i; 8]).await.unwrap();
        let mut back = [0u8; 8];
        within("the talker's echo", talker.read_exact(&mut back)).await.unwrap();
        assert_eq!(back, [i; 8]);
    }
    let (closed_at, r) = within("the silent connection to close", closed).await.unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "the silent connection got data: {r:?}");
    let idle = closed_at - last_byte;
    assert!(
        (Duration::from_millis(900)..Duration::from_millis(2000)).contains(&idle),
        "closed after {idle:?}"
    );

    let m = Exposition::parse(&proxy.server.metrics_text());
    assert_eq!(
        m.value(
            "wsproxy_connections_ended_total",
            &[("relay", "userspace"), ("end", "idle timeout")]
        ),
        1.0
    );
    assert_eq!(
        m.value("wsproxy_connections_open", &[("relay", "userspace")]),
        1.0,
        "the talker is still open"
    );
    drop(talker);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req5_tcp_keepalive_on_both_proxy_sockets() {
    let cases = [
        ("", Some((60, 10, 6))),
        (
            "[keepalive]\nidle = \"45s\"\ninterval = \"7s\"\ncount = 4\n",
            Some((45, 7, 4)),
        ),
        ("[keepalive]\nenabled = false\n", None),
    ];
    for (section, want) in cases {
        let up = Flaky::start("K").await;
        let proxy = ServerProxy::start(&cfg(&[(up.addr, 1)], &[], "", section)).await;
        let (s, _) = upgrade_and_id(client_ip(1), proxy.addr, 1).await.unwrap();
        let client = s.local_addr().unwrap();
        let client_side = sockets_where(|local, peer| local == proxy.addr && peer == client);
        let upstream_side = sockets_where(|_, peer| peer == up.addr);
        assert_eq!(
            (client_side.len(), upstream_side.len()),
            (1, 1),
            "the proxy's two sockets"
        );
        for (side, fd) in [("client", client_side[0]), ("upstream", upstream_side[0])] {
            let o = keepalive_opts(fd);
            assert!(o.nodelay, "{side} side: {o:?}");
            match want {
                Some((idle_s, interval_s, count)) => assert_eq!(
                    o,
                    KeepaliveOpts {
                        keepalive: true,
                        idle_s,
                        interval_s,
                        count,
                        nodelay: true
                    },
                    "{section:?}: {side} side"
                ),
                None => assert!(!o.keepalive, "{section:?}: {side} side: {o:?}"),
            }
        }
        drop(s);
        proxy.stop().await;
    }
}
