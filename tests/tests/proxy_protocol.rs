//! The PROXY protocol on the listener (`[listen.proxy_protocol]`): the address a trusted L4
//! layer puts in its header is the client's for the forwarded headers and the per-IP limits;
//! untrusted peers, bad headers and slow headers are closed before any HTTP is read, and counted.
//! A real sender too: HAProxy (`send-proxy-v2`, installed by the set-up) in front of the proxy, in
//! both relay modes. And the other way: `upstreams.send_proxy_protocol` puts a v2 header with the
//! client's address and the request id before the request, read by a parsing upstream and by a
//! second proxy that requires one.

use std::net::SocketAddr;
use std::process::Stdio;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsproxy_tests::daemon_kit::ServerProxy;
use wsproxy_tests::exposition::Exposition;
use wsproxy_tests::ports::free_port;
use wsproxy_tests::relay_kit::{poll_until, say, upgrade_response};
use wsproxy_tests::*;

const TRUSTED_LOOPBACK: &str = "[listen.proxy_protocol]\ntrusted = [\"127.0.0.0/8\"]\nheader_timeout = \"500ms\"\n";

fn v1(source: &str, port: u16) -> String {
    format!("PROXY TCP4 {source} 127.0.0.1 {port} 8080\r\n")
}

/// A v2 header for an IPv4 source, with one TLV (the sender's unique id).
fn v2(source: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12 + 5]);
    h.extend_from_slice(&source);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&8080u16.to_be_bytes());
    h.extend_from_slice(&[0x05, 0, 2, 0xab, 0xcd]);
    h
}

/// Sends `prefix` and a handshake request (in one write, as senders do); returns the status.
async fn upgrade_with(proxy: SocketAddr, prefix: &[u8]) -> (TcpStream, u16) {
    let mut s = connect_from(client_ip(1), proxy).await;
    let mut bytes = prefix.to_vec();
    bytes.extend_from_slice(request("/").as_bytes());
    s.write_all(&bytes).await.unwrap();
    let head = read_head(&mut s).await;
    (s, status(&head))
}

fn refused(m: &Exposition, reason: &str) -> f64 {
    m.value("wsproxy_proxy_protocol_refused_total", &[("reason", reason)])
}

#[tokio::test]
async fn the_header_s_source_is_the_client_for_forwarded_headers() {
    let mut up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    let proxy = Proxy::start(&config(&[up.addr], &[], TRUSTED_LOOPBACK)).await;
    for (prefix, want) in [
        (v1("192.0.2.7", 40000).into_bytes(), "192.0.2.7"),
        (v2([198, 51, 100, 9], 40001), "198.51.100.9"),
        // LOCAL (the sender's own health check): the connection's peer is the client.
        (b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00".to_vec(), "127.16.0.1"),
    ] {
        let (mut s, code) = upgrade_with(proxy.addr, &prefix).await;
        assert_eq!(code, 101, "{want}");
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        within("the echo", s.read_exact(&mut back)).await.unwrap();
        assert_eq!(&back, b"ping");
        drop(s);
        let seen = up.next_seen().await;
        assert_eq!(header(&seen.head, "x-real-ip").as_deref(), Some(want), "{}", seen.head);
        assert_eq!(
            header(&seen.head, "x-forwarded-for").as_deref(),
            Some(want),
            "{}",
            seen.head
        );
        assert!(
            !seen.head.contains("PROXY"),
            "the header is not forwarded: {}",
            seen.head
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn per_ip_limits_count_the_header_s_address() {
    let up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    let extra = format!("{TRUSTED_LOOPBACK}[limits]\nmax_connections_per_ip = 1\n");
    let proxy = Proxy::start(&config(&[up.addr], &[], &extra)).await;
    // All from the same peer (the sender), for two clients.
    let (_a, first) = upgrade_with(proxy.addr, v1("192.0.2.1", 1).as_bytes()).await;
    let (_b, other) = upgrade_with(proxy.addr, v1("192.0.2.2", 1).as_bytes()).await;
    let (_c, again) = upgrade_with(proxy.addr, v1("192.0.2.1", 2).as_bytes()).await;
    assert_eq!((first, other, again), (101, 101, 429));
    proxy.stop().await;
}

/// Reads until the proxy closes; the bytes it sent (none for a refusal).
async fn closed_unanswered(mut s: TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    within("the proxy to close", async {
        let mut b = [0u8; 512];
        while let Ok(n) = s.read(&mut b).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&b[..n]);
        }
    })
    .await;
    got
}

#[tokio::test]
async fn untrusted_peers_bad_and_slow_headers_are_closed_unanswered_and_counted() {
    let up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    let only_tens = "[listen.proxy_protocol]\ntrusted = [\"10.0.0.0/8\"]\n";
    let elsewhere = Proxy::start(&config(&[up.addr], &[], only_tens)).await;
    let mut s = connect_from(client_ip(1), elsewhere.addr).await;
    // One write: the proxy refuses an untrusted peer without reading, and may have closed (and
    // reset the connection for the unread bytes) before a second write.
    s.write_all(format!("{}{}", v1("192.0.2.7", 1), request("/")).as_bytes())
        .await
        .unwrap();
    assert_eq!(closed_unanswered(s).await, b"", "an untrusted peer");
    let m = Exposition::parse(&elsewhere.server.metrics_text());
    assert_eq!(refused(&m, "untrusted"), 1.0);
    elsewhere.stop().await;

    let proxy = Proxy::start(&config(&[up.addr], &[], TRUSTED_LOOPBACK)).await;
    // Plain HTTP where a header must be.
    let mut s = connect_from(client_ip(1), proxy.addr).await;
    s.write_all(request("/").as_bytes()).await.unwrap();
    assert_eq!(closed_unanswered(s).await, b"", "no header");
    // Half a header, then silence: closed at the header timeout.
    let mut s = connect_from(client_ip(1), proxy.addr).await;
    s.write_all(b"PROXY TCP4 192.0.2.7 ").await.unwrap();
    assert_eq!(closed_unanswered(s).await, b"", "a slow header");
    // A v2 header announcing more than the proxy accepts.
    let mut s = connect_from(client_ip(1), proxy.addr).await;
    let mut long = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x08\x00".to_vec();
    long.extend(std::iter::repeat_n(0u8, 2048));
    s.write_all(&long).await.unwrap();
    assert_eq!(closed_unanswered(s).await, b"", "a header over the cap");
    let m = poll_until(DEADLINE, || {
        let m = Exposition::parse(&proxy.server.metrics_text());
        (refused(&m, "bad_header") + refused(&m, "timeout") == 3.0).then_some(m)
    })
    .await
    .expect("three refusals counted");
    assert_eq!((refused(&m, "bad_header"), refused(&m, "timeout")), (2.0, 1.0));
    assert_eq!(up.accepted(), 0, "no upstream contacted");
    proxy.stop().await;
}

/// HAProxy in TCP mode on `listen`, sending PROXY protocol v2 to `to`. Killed on drop.
async fn haproxy(listen: SocketAddr, to: SocketAddr) -> Option<tokio::process::Child> {
    if !interop_kit::installed(std::process::Command::new("haproxy").arg("-v"), "HAProxy") {
        return None;
    }
    let dir = std::env::temp_dir().join(format!("wsproxy-pp-{}-{}", std::process::id(), listen.port()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 200\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  \
             timeout server 30s\nfrontend edge\n  bind {listen}\n  default_backend proxy\nbackend proxy\n  \
             server wsproxy {to} send-proxy-v2\n"
        ),
    )
    .unwrap();
    let child = tokio::process::Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let up = poll_until(DEADLINE, || std::net::TcpStream::connect(listen).ok()).await;
    assert!(up.is_some(), "HAProxy did not listen on {listen}");
    let _ = std::fs::remove_dir_all(&dir);
    Some(child)
}

#[tokio::test]
async fn haproxy_send_proxy_v2_in_front_in_both_relay_modes() {
    for mode in ["userspace", "kernel"] {
        let mut up = Upstream::start(Script::Upgrade { after: vec![] }).await;
        let Some(p) = ServerProxy::in_mode(mode, up.addr, &format!("\n{TRUSTED_LOOPBACK}")).await else {
            continue;
        };
        let edge = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let Some(_haproxy) = haproxy(edge, p.addr).await else {
            return;
        };
        // The client's own address, through HAProxy: what the upstream must be told.
        let from = client_ip(7);
        let mut s = connect_from(from, edge).await;
        s.write_all(request("/").as_bytes()).await.unwrap();
        assert_eq!(status(&read_head(&mut s).await), 101, "{mode}");
        let payload: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        s.write_all(&payload).await.unwrap();
        let mut back = vec![0u8; payload.len()];
        within("the echo", s.read_exact(&mut back)).await.unwrap();
        assert!(back == payload, "{mode}: the echo");
        drop(s);
        let seen = up.next_seen().await;
        assert_eq!(
            header(&seen.head, "x-real-ip"),
            Some(from.to_string()),
            "{mode}: {}",
            seen.head
        );
        say(&format!(
            "proxy protocol {mode}: HAProxy send-proxy-v2 in front, the upstream told {from}"
        ));
        p.stop().await;
    }
}

/// One upstream connection that must begin with a PROXY protocol v2 header: returns the header's
/// source and unique-id TLV and the request head, after answering 101 and echoing 4 bytes.
async fn parsing_upstream(listener: tokio::net::TcpListener) -> (SocketAddr, Vec<u8>, String) {
    use wsproxy::proxy_protocol::{Parsed, parse};
    let (mut s, _) = within("the proxy to connect", listener.accept()).await.unwrap();
    let mut buf = Vec::new();
    let (len, source) = loop {
        if let Parsed::Complete { len, source } = parse(&buf) {
            break (len, source.expect("a client address"));
        }
        assert_ne!(parse(&buf), Parsed::Invalid, "not a PROXY header: {buf:?}");
        let mut chunk = [0u8; 512];
        let n = within("the header", s.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "closed before the header");
        buf.extend_from_slice(&chunk[..n]);
    };
    let ppp::HeaderResult::V2(Ok(h)) = ppp::HeaderResult::parse(&buf[..len]) else {
        panic!("not a v2 header");
    };
    let id = h
        .tlvs()
        .filter_map(Result::ok)
        .find(|t| t.kind == 0x05)
        .map(|t| t.value.to_vec())
        .unwrap_or_default();
    let mut rest = buf.split_off(len);
    while !rest.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 512];
        let n = within("the request", s.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "closed before the request");
        rest.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&rest).into_owned();
    s.write_all(upgrade_response(&head).as_bytes()).await.unwrap();
    let mut four = [0u8; 4];
    within("the client's bytes", s.read_exact(&mut four)).await.unwrap();
    s.write_all(&four).await.unwrap();
    (source, id, head)
}

#[tokio::test]
async fn upstreams_get_a_v2_header_with_the_client_and_the_request_id() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let seen = tokio::spawn(parsing_upstream(listener));
    let text = format!("{}send_proxy_protocol = true\n", config(&[up], &[], ""));
    let proxy = Proxy::start(&text).await;
    let from = client_ip(3);
    let mut s = connect_from(from, proxy.addr).await;
    s.write_all(request("/").as_bytes()).await.unwrap();
    assert_eq!(status(&read_head(&mut s).await), 101);
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    within("the echo", s.read_exact(&mut back)).await.unwrap();
    let (source, id, head) = within("the upstream", seen).await.unwrap();
    assert_eq!(source.ip(), from);
    let id = String::from_utf8(id).unwrap();
    assert_eq!(header(&head, "x-request-id"), Some(id.clone()), "{head}");
    assert_eq!(id.len(), 32);
    proxy.stop().await;
}

#[tokio::test]
async fn a_second_proxy_requiring_the_header_learns_the_client_from_the_first() {
    let mut up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    let inner = Proxy::start(&config(&[up.addr], &[], TRUSTED_LOOPBACK)).await;
    let outer_text = format!("{}send_proxy_protocol = true\n", config(&[inner.addr], &[], ""));
    let outer = Proxy::start(&outer_text).await;
    let from = client_ip(4);
    let mut s = connect_from(from, outer.addr).await;
    s.write_all(request("/").as_bytes()).await.unwrap();
    assert_eq!(status(&read_head(&mut s).await), 101);
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    within("the echo", s.read_exact(&mut back)).await.unwrap();
    drop(s);
    let seen = up.next_seen().await;
    assert_eq!(header(&seen.head, "x-real-ip"), Some(from.to_string()), "{}", seen.head);
    outer.stop().await;
    inner.stop().await;
}

#[tokio::test]
async fn active_websocket_probes_send_a_local_header() {
    let up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    let inner = Proxy::start(&config(&[up.addr], &[], TRUSTED_LOOPBACK)).await;
    let outer_text = format!(
        "{}send_proxy_protocol = true\n[upstreams.health]\nprobe_interval = \"100ms\"\nprobe = \"websocket\"\n",
        config(&[inner.addr], &[], "")
    );
    let outer = Proxy::start(&outer_text).await;
    // Probes reach the inner proxy's upstream only if the inner proxy took their header.
    let probed = poll_until(DEADLINE, || (up.accepted() >= 2).then_some(())).await;
    let m = Exposition::parse(&inner.server.metrics_text());
    assert!(probed.is_some(), "no probe got through: {}", m.text);
    assert_eq!(refused(&m, "bad_header") + refused(&m, "untrusted"), 0.0);
    outer.stop().await;
    inner.stop().await;
}
