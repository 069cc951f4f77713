//! Rules 1-3 of the handshake: per-client limits, the bounded request head, and RFC 6455
//! validation, through the real proxy on loopback.

use std::net::IpAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use wsproxy_tests::*;

const USERSPACE: &str = "[relay]\nmode = \"userspace\"\n";

fn generous() -> String {
    format!("{USERSPACE}[limits]\nrequests_per_second = 10000.0\nburst = 10000\n")
}

async fn echo_roundtrip(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) {
    ws.send(Message::text("ping")).await.unwrap();
    let back = within("the echo", ws.next()).await.unwrap().unwrap();
    assert_eq!(back, Message::text("ping"));
}

#[tokio::test]
async fn rule1_request_rate_is_limited_per_ip_with_retry_after() {
    let mut up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    let extra = format!("{USERSPACE}[limits]\nrequests_per_second = 0.5\nburst = 3\n");
    let proxy = Proxy::start(&config(&[up.addr], &[], &extra)).await;
    let a = client_ip(1);
    for _ in 0..3 {
        let mut s = connect_from(a, proxy.addr).await;
        s.write_all(request("/").as_bytes()).await.unwrap();
        assert_eq!(status(&read_head(&mut s).await), 101);
    }
    let answer = exchange(a, proxy.addr, request("/").as_bytes()).await;
    assert_eq!(status(&answer), 429, "{answer}");
    // One token every 2 s: the next is due in at most 2 s.
    let retry: u64 = header(&answer, "retry-after").expect("Retry-After").parse().unwrap();
    assert!((1..=2).contains(&retry), "{answer}");
    // No upstream was contacted for the refused request.
    for _ in 0..3 {
        up.next_seen().await;
    }
    assert_eq!(up.accepted(), 3);
    // Another client has its own budget.
    let mut s = connect_from(client_ip(2), proxy.addr).await;
    s.write_all(request("/").as_bytes()).await.unwrap();
    assert_eq!(status(&read_head(&mut s).await), 101);
    proxy.stop().await;
}

#[tokio::test]
async fn rule1_concurrent_connections_are_capped_per_ip_and_released() {
    let echo = echo_upstream().await;
    let extra = format!(
        "{}[limits]\nmax_connections_per_ip = 2\nrequests_per_second = 1000.0\nburst = 1000\n",
        USERSPACE
    );
    let proxy = Proxy::start(&config(&[echo], &[], &extra)).await;
    let a = client_ip(10);
    let mut first = ws_connect(a, proxy.addr).await.unwrap();
    let mut second = ws_connect(a, proxy.addr).await.unwrap();
    let answer = exchange(a, proxy.addr, request("/").as_bytes()).await;
    assert_eq!(status(&answer), 429, "{answer}");
    assert!(header(&answer, "retry-after").is_some(), "{answer}");
    echo_roundtrip(&mut second).await;
    // Ending a connection frees its slot; the proxy notices the close asynchronously, so poll.
    first.close(None).await.unwrap();
    while within("the close", first.next()).await.is_some() {}
    drop(first);
    let mut third = within("a freed slot", async {
        loop {
            if let Ok(ws) = ws_connect(a, proxy.addr).await {
                break ws;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    echo_roundtrip(&mut third).await;
    proxy.stop().await;
}

#[tokio::test]
async fn rule1_a_network_cap_counts_every_address_of_the_prefix() {
    let echo = echo_upstream().await;
    let extra =
        format!("{USERSPACE}[limits]\nmax_connections_per_network = 2\nrequests_per_second = 1000.0\nburst = 1000\n");
    let proxy = Proxy::start(&config(&[echo], &[], &extra)).await;
    // client_ip(n) is 127.16.0.n: one /24 for all three, another for the fourth.
    let _a = ws_connect(client_ip(1), proxy.addr).await.unwrap();
    let _b = ws_connect(client_ip(2), proxy.addr).await.unwrap();
    let answer = exchange(client_ip(3), proxy.addr, request("/").as_bytes()).await;
    assert_eq!(status(&answer), 429, "{answer}");
    assert!(answer.contains("network connection limit"), "{answer}");
    let mut other = ws_connect(client_ip(256), proxy.addr).await.unwrap();
    echo_roundtrip(&mut other).await;
    proxy.stop().await;
}

#[tokio::test]
async fn rule1_ipv6_clients_are_limited_by_prefix() {
    // Loopback has a single IPv6 address, so this shows an IPv6 client is limited; that two
    // addresses of one /64 share a budget is shown by limits.rs's unit tests.
    let echo = echo_upstream().await;
    let extra = format!("{USERSPACE}[limits]\nrequests_per_second = 0.1\nburst = 1\nipv6_prefix = 64\n");
    let Ok(listener) = std::net::TcpListener::bind("[::1]:0") else {
        panic!("IPv6 loopback is needed for this test");
    };
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let proxy = Proxy::start_on(addr, &config(&[echo], &[], &extra)).await;
    let v6: IpAddr = "::1".parse().unwrap();
    let mut ws = ws_connect(v6, proxy.addr).await.unwrap();
    echo_roundtrip(&mut ws).await;
    let answer = exchange(v6, proxy.addr, request("/").as_bytes()).await;
    assert_eq!(status(&answer), 429, "{answer}");
    proxy.stop().await;
}

#[tokio::test]
async fn rule1_client_table_is_bounded() {
    let echo = echo_upstream().await;
    // Slow refill: entries cannot expire during the test, so the bound is what refuses.
    let extra = format!("{USERSPACE}[limits]\nrequests_per_second = 0.01\nburst = 5\nmax_tracked_clients = 20\n");
    let proxy = Proxy::start(&config(&[echo], &[], &extra)).await;
    let mut refused = 0;
    for n in 0..60 {
        let mut s = connect_from(client_ip(100 + n), proxy.addr).await;
        s.write_all(request("/").as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        match status(&head) {
            101 => assert!(n < 20, "client {n} admitted beyond the table's bound"),
            429 => refused += 1,
            other => panic!("unexpected {other}: {head}"),
        }
    }
    assert_eq!(refused, 40);
    proxy.stop().await;
}

#[tokio::test]
async fn rule2_oversized_heads_get_431() {
    let mut up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    let extra = format!("{}[handshake]\nmax_head_bytes = 4096\nmax_headers = 20\n", generous());
    let proxy = Proxy::start(&config(&[up.addr], &[], &extra)).await;
    let big = request("/").replace(
        "Host: test\r\n",
        &format!("Host: test\r\nX-Big: {}\r\n", "a".repeat(5000)),
    );
    let answer = exchange(client_ip(1), proxy.addr, big.as_bytes()).await;
    assert_eq!(status(&answer), 431, "{answer}");
    let many: String = (0..21).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = request("/").replace("Host: test\r\n", &format!("Host: test\r\n{many}"));
    let answer = exchange(client_ip(1), proxy.addr, many.as_bytes()).await;
    assert_eq!(status(&answer), 431, "{answer}");
    // Just under both bounds still passes.
    let fits: String = (0..14).map(|i| format!("X-H{i}: v\r\n")).collect();
    let fits = request("/").replace("Host: test\r\n", &format!("Host: test\r\n{fits}"));
    let mut s = connect_from(client_ip(1), proxy.addr).await;
    s.write_all(fits.as_bytes()).await.unwrap();
    assert_eq!(status(&read_head(&mut s).await), 101);
    drop(s);
    up.next_seen().await;
    assert_eq!(up.accepted(), 1, "refused requests reached the upstream");
    proxy.stop().await;
}

#[tokio::test]
async fn rule2_defaults_are_16k_and_100_headers() {
    let c = wsproxy::Config::parse(&config(&["127.0.0.1:1".parse().unwrap()], &[], ""), "t").unwrap();
    assert_eq!(c.services[0].handshake.max_head_bytes, 16 * 1024);
    assert_eq!(c.services[0].handshake.max_headers, 100);
    assert_eq!(c.services[0].handshake.header_timeout, Duration::from_secs(10));
}

#[tokio::test]
async fn rule2_slow_head_gets_408() {
    let up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    let extra = format!("{}[handshake]\nheader_timeout = \"300ms\"\n", generous());
    let proxy = Proxy::start(&config(&[up.addr], &[], &extra)).await;
    // Half a request, then nothing: the proxy must answer on its own.
    let answer = exchange(client_ip(1), proxy.addr, b"GET / HTTP/1.1\r\nHost: a\r\n").await;
    assert_eq!(status(&answer), 408, "{answer}");
    // Nothing at all is the same.
    let answer = exchange(client_ip(2), proxy.addr, b"").await;
    assert_eq!(status(&answer), 408, "{answer}");
    assert_eq!(up.accepted(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn rule3_rfc6455_validation() {
    let up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    let proxy = Proxy::start(&config(&[up.addr], &[], &generous())).await;
    let good = request("/chat");
    let cases: Vec<(&str, String, u16)> = vec![
        ("plain GET", "GET / HTTP/1.1\r\nHost: a\r\n\r\n".into(), 400),
        ("POST", good.replacen("GET", "POST", 1), 400),
        ("HTTP/1.0", good.replace("HTTP/1.1", "HTTP/1.0"), 400),
        ("no Host", good.replace("Host: test\r\n", ""), 400),
        ("Upgrade: h2c", good.replace("Upgrade: websocket", "Upgrade: h2c"), 400),
        ("no Upgrade", good.replace("Upgrade: websocket\r\n", ""), 400),
        (
            "no upgrade token",
            good.replace("Connection: Upgrade", "Connection: keep-alive"),
            400,
        ),
        ("key of 8 bytes", good.replace(KEY, "AAAAAAAAAAs="), 400),
        ("key not base64", good.replace(KEY, "!!!!"), 400),
        (
            "no key",
            good.replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), ""),
            400,
        ),
        ("no version", good.replace("Sec-WebSocket-Version: 13\r\n", ""), 400),
        (
            "version 8",
            good.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
            426,
        ),
        ("garbage", "\x16\x03\x01\x02\x00garbage\r\n\r\n".into(), 400),
    ];
    for (name, text, want) in cases {
        let answer = exchange(client_ip(1), proxy.addr, text.as_bytes()).await;
        assert_eq!(status(&answer), want, "{name}: {answer}");
        if want == 426 {
            assert_eq!(
                header(&answer, "sec-websocket-version").as_deref(),
                Some("13"),
                "{answer}"
            );
        }
    }
    assert_eq!(up.accepted(), 0, "an invalid request reached the upstream");
    // Case-insensitive values and token lists pass.
    let variant = good
        .replace("Upgrade: websocket", "upgrade: WebSocket")
        .replace("Connection: Upgrade", "CONNECTION: keep-alive, Upgrade");
    let mut s = connect_from(client_ip(1), proxy.addr).await;
    s.write_all(variant.as_bytes()).await.unwrap();
    assert_eq!(status(&read_head(&mut s).await), 101);
    proxy.stop().await;
}

#[tokio::test]
async fn rule3_real_client_library_gets_through() {
    let echo = echo_upstream().await;
    let proxy = Proxy::start(&config(&[echo], &[], &generous())).await;
    let mut ws = ws_connect(client_ip(1), proxy.addr).await.unwrap();
    echo_roundtrip(&mut ws).await;
    proxy.stop().await;
}

#[tokio::test]
async fn rule3_absolute_form_target_is_accepted_with_its_path() {
    let mut up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    let proxy = Proxy::start(&config(&[up.addr], &[], &generous())).await;
    // RFC 9112 section 3.2.2: a server accepts absolute-form, and the target's host is the one
    // that counts, whatever the Host field says: the upstream gets origin-form and that host.
    let cases = [
        (
            "http://example.test:8080/chat?x=1",
            "GET /chat?x=1 HTTP/1.1",
            "example.test:8080",
        ),
        ("HTTPS://other.test", "GET / HTTP/1.1", "other.test"),
    ];
    for (target, line, host) in cases {
        let req = request("/").replacen("GET / ", &format!("GET {target} "), 1);
        let mut s = connect_from(client_ip(20), proxy.addr).await;
        s.write_all(req.as_bytes()).await.unwrap();
        assert_eq!(status(&read_head(&mut s).await), 101, "{target}");
        drop(s);
        let head = up.next_seen().await.head;
        assert!(
            head.starts_with(&format!("{line}\r\nHost: {host}\r\n")),
            "{target}: {head:?}"
        );
        assert_eq!(head.matches("Host:").count(), 1, "{head:?}");
    }
    let contacted = up.accepted();
    // Malformed absolute targets, another scheme, and a Connection naming a field the
    // handshake needs get 400 and never reach the upstream.
    for target in [
        "ws://example.test/chat",
        "http:///chat",
        "http://u:p@example.test/",
        "http://ex ample/",
    ] {
        let req = request("/").replacen("GET / ", &format!("GET {target} "), 1);
        let answer = exchange(client_ip(21), proxy.addr, req.as_bytes()).await;
        assert_eq!(status(&answer), 400, "{target}: {answer}");
    }
    let req = request("/").replace("Connection: Upgrade", "Connection: Upgrade, Host");
    let answer = exchange(client_ip(21), proxy.addr, req.as_bytes()).await;
    assert_eq!(status(&answer), 400, "{answer}");
    assert_eq!(up.accepted(), contacted, "a refused request reached the upstream");
    proxy.stop().await;
}
