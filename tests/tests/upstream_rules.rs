//! Rules 4 to 10 of the issue, through the real proxy on loopback: the choice of upstream by client
//! IP, the forwarded request, upstream timeouts and failover, the upstream's answer, the relay and
//! the way connections close.
//!
//! Every test starts its own proxy and upstreams. Upstreams that need to be told apart answer the
//! 101 with a fixed identity (`Script::Upgrade { after: id }`), which the client reads right after
//! the 101. The relay and close tests drive their upstream's socket directly ([`accept_upgraded`]).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use wsproxy::balance::Balancer;
use wsproxy_tests::*;

// ---- helpers of this file ----

/// Generous limits (no test here is about them) and the userspace relay.
const BASE: &str = "[limits]\nrequests_per_second = 10000.0\nburst = 10000\nmax_connections_per_ip = 0\n\
                    [relay]\nmode = \"userspace\"\n";

/// Config text with weighted main and backup upstreams, an upstream timeout and extra sections.
fn config_text(main: &[(SocketAddr, u32)], backup: &[(SocketAddr, u32)], timeout: &str, extra: &str) -> String {
    format!(
        "{BASE}{extra}\n[upstreams]\nmain = [{}]\nbackup = [{}]\ntimeout = \"{timeout}\"\n",
        weighted(main),
        weighted(backup)
    )
}

fn weight1(addrs: &[SocketAddr]) -> Vec<(SocketAddr, u32)> {
    addrs.iter().map(|&a| (a, 1)).collect()
}

/// The order in which the proxy's own balancer tries upstreams for `ip` under `text`.
fn order(text: &str, ip: IpAddr) -> Vec<SocketAddr> {
    let cfg = wsproxy::Config::parse(text, "test config").unwrap_or_else(|e| panic!("{e}"));
    Balancer::new(&cfg.services[0].upstreams).order(ip)
}

/// The first client (by `client_ip(n)`, n from `from`) whose order under `text` satisfies `pred`.
fn client_where(text: &str, from: u32, pred: impl Fn(&[SocketAddr]) -> bool) -> IpAddr {
    (from..from + 2000)
        .map(client_ip)
        .find(|&ip| pred(&order(text, ip)))
        .expect("no client among 2000 has the wanted upstream order")
}

const ID_LEN: usize = 12;

/// Upstreams that identify themselves: each sends `upstream-NNN` right after its 101.
struct Named {
    ups: Vec<Upstream>,
    by_id: HashMap<Vec<u8>, SocketAddr>,
}

impl Named {
    async fn start(n: usize) -> Named {
        let mut ups = Vec::new();
        let mut by_id = HashMap::new();
        for i in 0..n {
            let id = format!("upstream-{i:03}").into_bytes();
            assert_eq!(id.len(), ID_LEN);
            let u = Upstream::start(Script::Upgrade { after: id.clone() }).await;
            by_id.insert(id, u.addr);
            ups.push(u);
        }
        Named { ups, by_id }
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.ups.iter().map(|u| u.addr).collect()
    }

    fn accepted(&self, addr: SocketAddr) -> usize {
        self.ups
            .iter()
            .find(|u| u.addr == addr)
            .expect("not one of these upstreams")
            .accepted()
    }

    /// The upstream the proxy at `proxy` connects the client `ip` to.
    async fn landing(&self, proxy: SocketAddr, ip: IpAddr) -> SocketAddr {
        let mut s = connect_from(ip, proxy).await;
        s.write_all(request("/who").as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        assert_eq!(status(&head), 101, "client {ip} got {head:?}");
        let mut id = vec![0u8; ID_LEN];
        within("the upstream's identity", s.read_exact(&mut id)).await.unwrap();
        *self
            .by_id
            .get(&id)
            .unwrap_or_else(|| panic!("unknown identity {:?}", String::from_utf8_lossy(&id)))
    }

    async fn landings(&self, proxy: SocketAddr, ips: &[IpAddr]) -> Vec<SocketAddr> {
        let mut out = Vec::with_capacity(ips.len());
        for &ip in ips {
            out.push(self.landing(proxy, ip).await);
        }
        out
    }
}

fn clients(n: u32) -> Vec<IpAddr> {
    (1..=n).map(client_ip).collect()
}

/// A raw handshake through the proxy from `ip`; returns the stream right after the 101's head.
async fn raw_handshake(ip: IpAddr, proxy: SocketAddr) -> TcpStream {
    let mut s = connect_from(ip, proxy).await;
    s.write_all(request("/raw").as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status(&head), 101, "{head:?}");
    s
}

/// Accepts the proxy's connection on `listener`, reads the forwarded request head and answers a
/// valid 101. Returns the stream, the request head and bytes that came after the head.
async fn accept_upgraded(listener: &TcpListener) -> (TcpStream, String, Vec<u8>) {
    let (mut s, _) = within("the proxy to connect to the upstream", listener.accept())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let head_len = within("the forwarded request head", async {
        for _ in 0..1024 {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                return p + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the proxy closed before sending the whole request");
            buf.extend_from_slice(&chunk[..n]);
        }
        panic!("no end of the request head");
    })
    .await;
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let accept = wsproxy::upstream::accept_key(&header(&head, "sec-websocket-key").expect("no key"));
    let r = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    s.write_all(r.as_bytes()).await.unwrap();
    (s, head, buf[head_len..].to_vec())
}

/// A client connected through the proxy to a raw upstream, both right after the 101.
async fn raw_pair(ip: IpAddr) -> (Proxy, TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let text = config_text(&[(listener.local_addr().unwrap(), 1)], &[], "2s", "");
    let proxy = Proxy::start(&text).await;
    let (client, (upstream, _, rest)) = tokio::join!(raw_handshake(ip, proxy.addr), accept_upgraded(&listener));
    assert!(rest.is_empty());
    (proxy, client, upstream)
}

/// Reads until EOF or an error (at most `limit` bytes); returns the bytes and how the stream
/// ended: `Ok(())` for a clean EOF.
async fn read_until_end<R: AsyncRead + Unpin>(s: &mut R, limit: usize) -> (Vec<u8>, io::Result<()>) {
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 65536];
    loop {
        match s.read(&mut chunk).await {
            Ok(0) => return (out, Ok(())),
            Ok(n) => {
                out.extend_from_slice(&chunk[..n]);
                assert!(out.len() <= limit, "more than {limit} bytes");
            }
            Err(e) => return (out, Err(e)),
        }
    }
}

/// Sends `bytes` as a client from `ip` and reads to the end; asserts a clean EOF and returns what
/// came before it.
async fn exchange_raw(ip: IpAddr, proxy: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = connect_from(ip, proxy).await;
    s.write_all(bytes).await.unwrap();
    let (got, end) = within("the proxy to close", read_until_end(&mut s, 1 << 20)).await;
    end.unwrap_or_else(|e| {
        panic!(
            "expected a clean EOF, got {e} after {:?}",
            String::from_utf8_lossy(&got)
        )
    });
    got
}

/// Deterministic pseudo-random bytes (xorshift64), generated in blocks.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
    }

    fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        Pattern(seed | 1).fill(&mut v);
        v
    }
}

/// A checksum (FNV-1a over 64-bit words) of a byte stream, independent of how it was chunked:
/// bytes are regrouped into fixed blocks before they are mixed in.
struct Checksum {
    hash: u64,
    len: u64,
    block: Vec<u8>,
}

impl Checksum {
    const BLOCK: usize = 64 * 1024;

    fn new() -> Self {
        Checksum {
            hash: 0xcbf2_9ce4_8422_2325,
            len: 0,
            block: Vec::with_capacity(Self::BLOCK),
        }
    }

    fn feed(&mut self, mut b: &[u8]) {
        self.len += b.len() as u64;
        while !b.is_empty() {
            let take = (Self::BLOCK - self.block.len()).min(b.len());
            self.block.extend_from_slice(&b[..take]);
            b = &b[take..];
            if self.block.len() == Self::BLOCK {
                self.mix();
            }
        }
    }

    fn mix(&mut self) {
        for c in self.block.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.hash = (self.hash ^ u64::from_le_bytes(w)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.block.clear();
    }

    fn finish(mut self) -> (u64, u64) {
        self.mix();
        (self.len, self.hash)
    }
}

/// Writes `total` pattern bytes from `seed`, then shuts the write side down; returns the checksum.
async fn send_pattern<W: AsyncWrite + Unpin>(w: &mut W, seed: u64, total: usize) -> (u64, u64) {
    let mut p = Pattern(seed | 1);
    let mut sum = Checksum::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut sent = 0;
    while sent < total {
        let n = buf.len().min(total - sent);
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await.unwrap();
        sum.feed(&buf[..n]);
        sent += n;
    }
    w.shutdown().await.unwrap();
    sum.finish()
}

/// Reads to a clean EOF; returns the checksum of what was read.
async fn receive_checksum<R: AsyncRead + Unpin>(r: &mut R, limit: u64) -> (u64, u64) {
    let mut sum = Checksum::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            return sum.finish();
        }
        sum.feed(&buf[..n]);
        assert!(sum.len <= limit, "more bytes than were sent");
    }
}

/// The header lines of a head (request/status line excluded).
fn field_lines(head: &str) -> Vec<&str> {
    head.trim_end_matches("\r\n").split("\r\n").skip(1).collect()
}

/// Every value of the fields named `name` (any case).
fn values(head: &str, name: &str) -> Vec<String> {
    field_lines(head)
        .into_iter()
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

/// The single value of `name`, failing when it is missing or repeated.
fn single(head: &str, name: &str) -> String {
    let v = values(head, name);
    assert_eq!(v.len(), 1, "expected exactly one {name} in {head:?}");
    v.into_iter().next().unwrap()
}

/// Sends `req` as a client from `ip`, expects a 101 and returns the head the upstream received.
async fn forwarded_head(proxy: SocketAddr, up: &mut Upstream, ip: IpAddr, req: &str) -> String {
    let mut s = connect_from(ip, proxy).await;
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status(&head), 101, "{head:?}");
    drop(s);
    up.next_seen().await.head
}

// ---- rule 4: upstream choice by client IP ----

#[tokio::test]
async fn rule4_each_client_gets_the_first_upstream_of_its_weighted_hash_order() {
    let named = Named::start(3).await;
    let a = named.addrs();
    let weighted = [(a[0], 1), (a[1], 2), (a[2], 3)];
    let text = config_text(&weighted, &[], "2s", "");
    let proxy = Proxy::start(&text).await;
    let ips = clients(40);

    let got = named.landings(proxy.addr, &ips).await;
    for (ip, up) in ips.iter().zip(&got) {
        assert_eq!(*up, order(&text, *ip)[0], "client {ip}");
    }
    let used: std::collections::BTreeSet<_> = got.iter().collect();
    assert!(used.len() >= 2, "40 clients all on one upstream: {got:?}");
    // The weights matter: with equal weights some client would have been elsewhere, so a proxy
    // that ignored them would have failed the comparison above.
    let unweighted = config_text(&weight1(&a), &[], "2s", "");
    assert!(ips.iter().any(|&ip| order(&unweighted, ip)[0] != order(&text, ip)[0]));
    // Asked again, the same proxy gives the same answers.
    assert_eq!(named.landings(proxy.addr, &ips).await, got);
    proxy.stop().await;
}

#[tokio::test]
async fn rule4_same_mapping_from_another_instance_a_reordered_config_and_after_a_restart() {
    let named = Named::start(3).await;
    let a = named.addrs();
    let text = config_text(&[(a[0], 2), (a[1], 1), (a[2], 1)], &[], "2s", "");
    let reordered = config_text(&[(a[2], 1), (a[0], 2), (a[1], 1)], &[], "2s", "");
    let ips = clients(40);

    let first = Proxy::start(&text).await;
    let second = Proxy::start(&text).await;
    let third = Proxy::start(&reordered).await;
    let want = named.landings(first.addr, &ips).await;
    assert_eq!(named.landings(second.addr, &ips).await, want, "another instance");
    assert_eq!(
        named.landings(third.addr, &ips).await,
        want,
        "the same upstreams listed in another order"
    );

    let addr = first.addr;
    first.stop().await;
    let restarted = Proxy::start_on(addr, &text).await;
    assert_eq!(restarted.addr, addr);
    assert_eq!(named.landings(restarted.addr, &ips).await, want, "after a restart");
    for p in [second, third, restarted] {
        p.stop().await;
    }
}

#[tokio::test]
async fn rule4_removing_an_upstream_moves_only_its_clients_to_their_second_choice() {
    let named = Named::start(3).await;
    let a = named.addrs();
    let full = config_text(&weight1(&a), &[], "2s", "");
    let ips = clients(40);
    let proxy = Proxy::start(&full).await;
    let before = named.landings(proxy.addr, &ips).await;
    proxy.stop().await;

    // Remove the upstream with the most clients.
    let removed = *a
        .iter()
        .max_by_key(|&&u| before.iter().filter(|&&b| b == u).count())
        .unwrap();
    let rest: Vec<SocketAddr> = a.iter().copied().filter(|&u| u != removed).collect();
    let less = config_text(&weight1(&rest), &[], "2s", "");
    let proxy = Proxy::start(&less).await;
    let after = named.landings(proxy.addr, &ips).await;
    let mut moved = 0;
    for (i, ip) in ips.iter().enumerate() {
        if before[i] == removed {
            moved += 1;
            assert_eq!(
                after[i],
                order(&full, *ip)[1],
                "client {ip} should go to its second choice"
            );
        } else {
            assert_eq!(after[i], before[i], "client {ip} moved although its upstream stayed");
        }
    }
    assert!(moved > 0);
    proxy.stop().await;
}

#[tokio::test]
async fn rule4_failover_follows_the_hash_order() {
    // One main upstream is down: its clients go to their second choice, the others stay put.
    let named = Named::start(2).await;
    let a = named.addrs();
    let dead = dead_addr().await;
    let text = config_text(&weight1(&[a[0], dead, a[1]]), &[], "2s", "");
    let ips = clients(40);
    let proxy = Proxy::start(&text).await;
    let got = named.landings(proxy.addr, &ips).await;
    let mut failed_over = 0;
    for (ip, up) in ips.iter().zip(&got) {
        let o = order(&text, *ip);
        if o[0] == dead {
            failed_over += 1;
            assert_eq!(*up, o[1], "client {ip}");
        } else {
            assert_eq!(*up, o[0], "client {ip}");
        }
    }
    assert!(failed_over > 0, "no client had the dead upstream first");
    proxy.stop().await;
}

#[tokio::test]
async fn rule4_weight_zero_is_never_chosen() {
    let named = Named::start(4).await;
    let a = named.addrs();
    let ips = clients(40);

    let text = config_text(&[(a[0], 1), (a[1], 1), (a[2], 0)], &[], "2s", "");
    let proxy = Proxy::start(&text).await;
    let got = named.landings(proxy.addr, &ips).await;
    for (ip, up) in ips.iter().zip(&got) {
        assert_eq!(*up, order(&text, *ip)[0], "client {ip}");
    }
    assert_eq!(named.accepted(a[2]), 0, "the weight-0 upstream was contacted");
    proxy.stop().await;

    // Not even as a failover target: with the only other main upstream down, clients go to the
    // backup and the weight-0 one is still never contacted.
    let dead = dead_addr().await;
    let text = config_text(&[(dead, 1), (a[2], 0)], &[(a[3], 1)], "2s", "");
    let proxy = Proxy::start(&text).await;
    let got = named.landings(proxy.addr, &ips[..10]).await;
    assert!(got.iter().all(|&u| u == a[3]), "{got:?}");
    assert_eq!(named.accepted(a[2]), 0, "the weight-0 upstream was contacted");
    proxy.stop().await;
}

#[tokio::test]
async fn rule4_backup_only_when_every_main_upstream_failed() {
    let named = Named::start(4).await;
    let a = named.addrs();
    let (main, backup) = ([a[0], a[1]], [a[2], a[3]]);
    let ips = clients(40);

    // All main upstreams up: the backups see nobody.
    let text = config_text(&weight1(&main), &weight1(&backup), "2s", "");
    let proxy = Proxy::start(&text).await;
    let got = named.landings(proxy.addr, &ips).await;
    assert!(got.iter().all(|u| main.contains(u)), "{got:?}");
    proxy.stop().await;

    // One main upstream down: the other main takes its clients, still no backup.
    let dead = [dead_addr().await, dead_addr().await];
    let text = config_text(&weight1(&[dead[0], main[0]]), &weight1(&backup), "2s", "");
    let proxy = Proxy::start(&text).await;
    let got = named.landings(proxy.addr, &ips).await;
    assert!(got.iter().all(|&u| u == main[0]), "{got:?}");
    assert_eq!(
        named.accepted(backup[0]) + named.accepted(backup[1]),
        0,
        "a backup was used while a main one was up"
    );
    proxy.stop().await;

    // Every main upstream down: each client goes to its first backup by hash.
    let text = config_text(&weight1(&dead), &weight1(&backup), "2s", "");
    let proxy = Proxy::start(&text).await;
    let got = named.landings(proxy.addr, &ips).await;
    for (ip, up) in ips.iter().zip(&got) {
        let o = order(&text, *ip);
        assert!(backup.contains(&o[2]));
        assert_eq!(*up, o[2], "client {ip}");
    }
    assert!(
        backup.iter().all(|b| got.contains(b)),
        "both backups should get some of 40 clients: {got:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn rule4_ipv6_client_gets_its_hash_choice() {
    let named = Named::start(3).await;
    let text = config_text(&weight1(&named.addrs()), &[], "2s", "");
    let proxy = Proxy::start_on("[::1]:0".parse().unwrap(), &text).await;
    let ip: IpAddr = "::1".parse().unwrap();
    let want = order(&text, ip)[0];
    for _ in 0..3 {
        assert_eq!(named.landing(proxy.addr, ip).await, want);
    }
    proxy.stop().await;
}

// ---- rule 5: the forwarded request ----

#[tokio::test]
async fn rule5_request_forwarded_as_sent_with_the_proxy_fields() {
    let mut up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    // The client is a trusted proxy: its X-Forwarded-For chain is appended to.
    let ip = client_ip(5);
    let trusted = format!("[headers]\ntrusted_proxies = [\"{ip}\"]\n");
    let proxy = Proxy::start(&config_text(&[(up.addr, 1)], &[], "2s", &trusted)).await;
    let line = "GET /chat/room?x=1&y=%20z HTTP/1.1";
    let kept = [
        "hOsT: example.test:8443".to_string(),
        "Sec-WebSocket-Version: 13".into(),
        "x-custom-ORDER: first".into(),
        "Upgrade: websocket".into(),
        "Origin: http://example.test".into(),
        "connection: Upgrade".into(),
        format!("Sec-WebSocket-Key: {KEY}"),
        "Sec-WebSocket-Protocol: chat, superchat".into(),
        "Cookie: a=1; b=2".into(),
        "x-custom-order: second".into(),
    ];
    // The client's own claims, interleaved with the fields that are kept.
    let claims = [
        (2, "X-Forwarded-For: 203.0.113.7"),
        (4, "X-Real-IP: 6.6.6.6"),
        (5, "My_Secret: underscore"),
        (6, "X-Forwarded-Proto: https"),
        (7, "X-Request-ID: forged-id"),
    ];
    // Connection is the one kept field whose value changes: the upgrade is all this hop asks of
    // the next (keep-alive is the client's connection's business).
    let mut lines: Vec<String> = kept
        .iter()
        .map(|l| l.replace("connection: Upgrade", "connection: keep-alive, Upgrade"))
        .collect();
    for (at, c) in claims.iter().rev() {
        lines.insert(*at, c.to_string());
    }
    let req = format!("{line}\r\n{}\r\n\r\n", lines.join("\r\n"));

    let head = forwarded_head(proxy.addr, &mut up, ip, &req).await;
    assert!(head.starts_with(&format!("{line}\r\n")), "{head:?}");
    assert!(
        head.ends_with("\r\n\r\n") && !head.ends_with("\r\n\r\n\r\n"),
        "{head:?}"
    );
    // The client's fields, minus the dropped and the proxy's own, come in order and case as sent.
    let own = [
        "x-forwarded-for",
        "x-real-ip",
        "x-forwarded-proto",
        "x-request-id",
        "forwarded",
    ];
    let theirs: Vec<&str> = field_lines(&head)
        .into_iter()
        .filter(|l| {
            !own.iter()
                .any(|o| l.split_once(':').is_some_and(|(n, _)| n.eq_ignore_ascii_case(o)))
        })
        .collect();
    assert_eq!(theirs, kept, "client fields as forwarded, in {head:?}");
    assert!(
        !head.contains("My_Secret") && !head.contains("underscore"),
        "underscore field not dropped: {head:?}"
    );
    assert_eq!(single(&head, "X-Forwarded-For"), format!("203.0.113.7, {ip}"));
    assert_eq!(single(&head, "X-Real-IP"), ip.to_string());
    assert_eq!(single(&head, "X-Forwarded-Proto"), "http");
    let id1 = single(&head, "X-Request-ID");
    assert!(!id1.is_empty() && id1 != "forged-id", "{head:?}");
    assert!(
        values(&head, "Forwarded").is_empty(),
        "Forwarded is off by default: {head:?}"
    );

    // A request without X-Forwarded-For gets one; every request gets its own id.
    let head = forwarded_head(proxy.addr, &mut up, ip, &request("/plain")).await;
    assert!(head.starts_with("GET /plain HTTP/1.1\r\nHost: test\r\n"), "{head:?}");
    assert_eq!(single(&head, "X-Forwarded-For"), ip.to_string());
    assert_eq!(single(&head, "X-Real-IP"), ip.to_string());
    let id2 = single(&head, "X-Request-ID");
    assert!(!id2.is_empty());
    assert_ne!(id1, id2, "two requests got the same X-Request-ID");

    // Any other client's chain starts at the client.
    let other = client_ip(6);
    let head = forwarded_head(proxy.addr, &mut up, other, &req).await;
    assert_eq!(single(&head, "X-Forwarded-For"), other.to_string());
    proxy.stop().await;
}

#[tokio::test]
async fn rule5_underscore_headers_drop_keep_and_reject() {
    let req = request("/u").replace("Host: test\r\n", "Host: test\r\nMy_Header: 1\r\nX-Plain: 2\r\n");
    let ip = client_ip(6);
    let mut up = Upstream::start(Script::Upgrade { after: vec![] }).await;

    let drop = Proxy::start(&config_text(
        &[(up.addr, 1)],
        &[],
        "2s",
        "[headers]\nunderscore_headers = \"drop\"\n",
    ))
    .await;
    let head = forwarded_head(drop.addr, &mut up, ip, &req).await;
    assert!(
        !head.contains("My_Header") && head.contains("\r\nX-Plain: 2\r\n"),
        "{head:?}"
    );
    drop.stop().await;

    let keep = Proxy::start(&config_text(
        &[(up.addr, 1)],
        &[],
        "2s",
        "[headers]\nunderscore_headers = \"keep\"\n",
    ))
    .await;
    let head = forwarded_head(keep.addr, &mut up, ip, &req).await;
    assert!(
        head.contains("\r\nHost: test\r\nMy_Header: 1\r\nX-Plain: 2\r\n"),
        "{head:?}"
    );
    keep.stop().await;

    let contacted = up.accepted();
    let reject = Proxy::start(&config_text(
        &[(up.addr, 1)],
        &[],
        "2s",
        "[headers]\nunderscore_headers = \"reject\"\n",
    ))
    .await;
    let answer = exchange(ip, reject.addr, req.as_bytes()).await;
    assert_eq!(status(&answer), 400, "{answer:?}");
    assert_eq!(up.accepted(), contacted, "a rejected request reached the upstream");
    // Without an underscore field the same proxy forwards.
    let head = forwarded_head(reject.addr, &mut up, ip, &request("/ok")).await;
    assert!(head.starts_with("GET /ok "), "{head:?}");
    reject.stop().await;
}

#[tokio::test]
async fn rule5_connection_named_fields_are_removed_and_proxy_fields_kept() {
    let mut up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    let extra = "[headers]\nforwarded = true\nadd = [{ name = \"X-Edge\", value = \"edge-1\" }]\n";
    let proxy = Proxy::start(&config_text(&[(up.addr, 1)], &[], "2s", extra)).await;
    let ip = client_ip(8);
    // The client asks the next hop to drop the proxy's own fields, and some of its own.
    let req = request("/hop")
        .replace(
            "Connection: Upgrade\r\n",
            "Connection: Upgrade, X-Real-IP, X-Forwarded-For\r\nconnection: forwarded,x-request-id , X-Edge, Cookie\r\n",
        )
        .replace(
            "Host: test\r\n",
            "Host: test\r\nX-Forwarded-For: 203.0.113.7\r\nCookie: a=1\r\nKeep-Alive: timeout=5\r\n\
             TE: trailers\r\nX-Kept: yes\r\n",
        );
    let head = forwarded_head(proxy.addr, &mut up, ip, &req).await;
    assert_eq!(single(&head, "Connection"), "Upgrade", "{head:?}");
    assert_eq!(single(&head, "Upgrade"), "websocket");
    for gone in ["Cookie", "Keep-Alive", "TE"] {
        assert!(values(&head, gone).is_empty(), "{gone} forwarded: {head:?}");
    }
    assert!(
        !head.contains("203.0.113.7"),
        "the client's hop-by-hop X-Forwarded-For: {head:?}"
    );
    assert_eq!(single(&head, "X-Real-IP"), ip.to_string());
    assert_eq!(single(&head, "X-Forwarded-For"), ip.to_string());
    assert_eq!(single(&head, "Forwarded"), format!("for={ip};proto=http"));
    assert_eq!(single(&head, "X-Edge"), "edge-1");
    assert!(!single(&head, "X-Request-ID").is_empty());
    assert_eq!(single(&head, "X-Kept"), "yes");
    proxy.stop().await;
}

#[tokio::test]
async fn rule5_forwarded_field_and_static_headers() {
    let mut up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    let ip = client_ip(7);
    let extra = format!(
        "[headers]\nforwarded = true\nforwarded_proto = \"https\"\ntrusted_proxies = [\"{ip}/32\"]\n\
         add = [{{ name = \"X-Edge-Node\", value = \"edge-1\" }}, {{ name = \"X-Env\", value = \"test env\" }}]\n"
    );
    let proxy = Proxy::start(&config_text(&[(up.addr, 1)], &[], "2s", &extra)).await;

    let req = request("/f").replace(
        "Host: test\r\n",
        "Host: test\r\nForwarded: for=198.51.100.1;proto=http\r\nx-edge-node: forged\r\n",
    );
    let head = forwarded_head(proxy.addr, &mut up, ip, &req).await;
    assert_eq!(
        single(&head, "Forwarded"),
        format!("for=198.51.100.1;proto=http, for={ip};proto=https")
    );
    assert_eq!(single(&head, "X-Forwarded-Proto"), "https");
    assert_eq!(single(&head, "X-Edge-Node"), "edge-1");
    assert_eq!(single(&head, "X-Env"), "test env");
    assert!(!head.contains("forged"), "{head:?}");

    let head = forwarded_head(proxy.addr, &mut up, ip, &request("/f")).await;
    assert_eq!(single(&head, "Forwarded"), format!("for={ip};proto=https"));
    assert_eq!(single(&head, "X-Edge-Node"), "edge-1");
    proxy.stop().await;
}

#[tokio::test]
async fn rule5_ipv6_client_in_the_proxy_fields() {
    let mut up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    let text = config_text(&[(up.addr, 1)], &[], "2s", "[headers]\nforwarded = true\n");
    let proxy = Proxy::start_on("[::1]:0".parse().unwrap(), &text).await;
    let head = forwarded_head(proxy.addr, &mut up, "::1".parse().unwrap(), &request("/v6")).await;
    assert_eq!(single(&head, "X-Forwarded-For"), "::1");
    assert_eq!(single(&head, "X-Real-IP"), "::1");
    assert_eq!(single(&head, "Forwarded"), "for=\"[::1]\";proto=http");
    proxy.stop().await;
}

// ---- rule 6: upstream timeout and failover ----

#[tokio::test]
async fn rule6_silent_upstream_times_out_and_the_next_one_answers() {
    let mut silent = Upstream::start(Script::Silent).await;
    let named = Named::start(1).await;
    let good = named.addrs()[0];
    let text = config_text(&weight1(&[silent.addr, good]), &[], "300ms", "");
    let proxy = Proxy::start(&text).await;
    let ip = client_where(&text, 100, |o| o[0] == silent.addr);

    let started = Instant::now();
    assert_eq!(named.landing(proxy.addr, ip).await, good);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "answered after {took:?}, before the silent one timed out"
    );
    assert!(
        took < Duration::from_millis(2500),
        "answered after {took:?}: the 300ms timeout was not applied"
    );
    assert_eq!(silent.accepted(), 1);
    // The proxy gave up on the silent upstream and closed that connection.
    let seen = silent.next_seen().await;
    assert!(seen.head.starts_with("GET /who HTTP/1.1\r\n"), "{:?}", seen.head);
    proxy.stop().await;
}

#[tokio::test]
async fn rule6_refused_or_closed_upstream_fails_over_to_the_next() {
    let named = Named::start(1).await;
    let good = named.addrs()[0];

    let dead = dead_addr().await;
    let text = config_text(&weight1(&[dead, good]), &[], "300ms", "");
    let proxy = Proxy::start(&text).await;
    let ip = client_where(&text, 200, |o| o[0] == dead);
    assert_eq!(named.landing(proxy.addr, ip).await, good);
    proxy.stop().await;

    // An upstream that closes without a byte of answer is skipped too.
    let closing = Upstream::start(Script::Close).await;
    let text = config_text(&weight1(&[closing.addr, good]), &[], "300ms", "");
    let proxy = Proxy::start(&text).await;
    let ip = client_where(&text, 200, |o| o[0] == closing.addr);
    assert_eq!(named.landing(proxy.addr, ip).await, good);
    assert_eq!(closing.accepted(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn rule6_no_upstream_answering_gets_400() {
    let mut s1 = Upstream::start(Script::Silent).await;
    let mut s2 = Upstream::start(Script::Silent).await;
    let dead = dead_addr().await;
    let text = config_text(&weight1(&[s1.addr, dead]), &weight1(&[s2.addr]), "300ms", "");
    let proxy = Proxy::start(&text).await;

    let started = Instant::now();
    let answer = exchange(client_ip(8), proxy.addr, request("/none").as_bytes()).await;
    let took = started.elapsed();
    assert_eq!(status(&answer), 400, "{answer:?}");
    assert!(
        took >= Duration::from_millis(500),
        "400 after {took:?}: both silent upstreams should have been waited for"
    );
    // Every upstream was tried, and each silent one's connection was closed again.
    assert_eq!((s1.accepted(), s2.accepted()), (1, 1));
    s1.next_seen().await;
    s2.next_seen().await;
    proxy.stop().await;
}

#[tokio::test]
async fn rule6_upstream_reset_before_answering_fails_over() {
    let resetting = Upstream::start(Script::ResetAfter(String::new())).await;
    let named = Named::start(1).await;
    let good = named.addrs()[0];
    // One failure marks an upstream down: the reset must count against its health too.
    let extra = "[upstreams.health]\nmax_fails = 1\nfail_timeout = \"60s\"\n";
    let text = config_text(&weight1(&[resetting.addr, good]), &[], "2s", extra);
    let proxy = Proxy::start(&text).await;
    let ip = client_where(&text, 300, |o| o[0] == resetting.addr);
    assert_eq!(
        named.landing(proxy.addr, ip).await,
        good,
        "a reset is no answer: fail over"
    );
    assert_eq!(resetting.accepted(), 1);
    // Marked down: the next client whose first choice it is goes straight to the other one.
    let other = client_where(&text, 400, |o| o[0] == resetting.addr);
    assert_eq!(named.landing(proxy.addr, other).await, good);
    assert_eq!(
        resetting.accepted(),
        1,
        "a reset did not count against the upstream's health"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn rule6_upstream_reset_after_part_of_its_answer_is_not_retried() {
    // Part of a head is an answer that went wrong (like a close mid-head): retrying elsewhere
    // could run the request twice.
    let resetting = Upstream::start(Script::ResetAfter("HTTP/1.1 101 Switching".into())).await;
    let named = Named::start(1).await;
    let good = named.addrs()[0];
    let text = config_text(&weight1(&[resetting.addr, good]), &[], "2s", "");
    let proxy = Proxy::start(&text).await;
    let ip = client_where(&text, 500, |o| o[0] == resetting.addr);
    let got = exchange_raw(ip, proxy.addr, request("/partial").as_bytes()).await;
    assert!(got.is_empty(), "the client got {:?}", String::from_utf8_lossy(&got));
    assert_eq!(resetting.accepted(), 1);
    assert_eq!(named.accepted(good), 0, "retried after part of an answer");
    proxy.stop().await;
}

/// `requests` handshakes from `ip`, each answered `answer` by `failing` (the client's first
/// choice), under `max_fails = 2`; returns the statuses the client saw (0: closed, no answer).
async fn statuses_against(answer: &str, requests: usize, extra_health: &str) -> (Vec<u16>, usize, usize) {
    let failing = Upstream::start(Script::Respond(answer.into())).await;
    let named = Named::start(1).await;
    let backup = named.addrs()[0];
    let extra = format!("[upstreams.health]\nmax_fails = 2\nfail_timeout = \"60s\"\n{extra_health}");
    let text = config_text(&weight1(&[failing.addr]), &weight1(&[backup]), "2s", &extra);
    let proxy = Proxy::start(&text).await;
    let ip = client_ip(600);
    let mut seen = Vec::new();
    for _ in 0..requests {
        let mut s = connect_from(ip, proxy.addr).await;
        s.write_all(request("/moved").as_bytes()).await.unwrap();
        // A head (the 101), or nothing up to the close.
        seen.push(status(&read_head(&mut s).await));
    }
    proxy.stop().await;
    (seen, failing.accepted(), named.accepted(backup))
}

#[tokio::test]
async fn rule6_redirecting_upstream_is_not_marked_down() {
    // Answers any client can provoke (a path that redirects, a 200 page, a 404): however many,
    // the upstream stays up and nobody is moved to the backup.
    for answer in [
        "HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    ] {
        let (seen, failing, backup) = statuses_against(answer, 5, "").await;
        assert_eq!(seen, [0; 5], "for {answer:?}");
        assert_eq!((failing, backup), (5, 0), "for {answer:?}: marked down after max_fails");
    }
}

#[tokio::test]
async fn rule6_5xx_counts_only_when_configured() {
    let answer = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
    // By default a 5xx is an answer like any other.
    let (seen, failing, backup) = statuses_against(answer, 4, "").await;
    assert_eq!(seen, [0; 4]);
    assert_eq!((failing, backup), (4, 0), "a 503 counted although count_5xx is off");
    // With count_5xx, two 503s mark it down: the third handshake goes to the backup.
    let (seen, failing, backup) = statuses_against(answer, 3, "count_5xx = true\n").await;
    assert_eq!(seen, [0, 0, 101]);
    assert_eq!((failing, backup), (2, 1));
}

// ---- rule 7: upstream answers with another status than 101 ----

#[tokio::test]
async fn rule7_non_101_status_gives_the_client_nothing_and_closes_the_upstream() {
    let answers = [
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 5\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        "HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 404 Not Found\r\n\r\n",
    ];
    for (i, answer) in answers.into_iter().enumerate() {
        let mut up = Upstream::start(Script::Respond(answer.into())).await;
        let proxy = Proxy::start(&config_text(&[(up.addr, 1)], &[], "2s", "")).await;
        let got = exchange_raw(client_ip(10 + i as u32), proxy.addr, request("/s").as_bytes()).await;
        assert!(
            got.is_empty(),
            "for {answer:?} the client got {:?}",
            String::from_utf8_lossy(&got)
        );
        let seen = up.next_seen().await;
        assert!(seen.head.starts_with("GET /s HTTP/1.1\r\n"));
        proxy.stop().await;
    }

    // An upstream that answered is not replaced by the next one: the client still gets nothing.
    let mut up = Upstream::start(Script::Respond(answers[0].into())).await;
    let named = Named::start(1).await;
    let text = config_text(&weight1(&[up.addr, named.addrs()[0]]), &[], "2s", "");
    let proxy = Proxy::start(&text).await;
    let ip = client_where(&text, 300, |o| o[0] == up.addr);
    let got = exchange_raw(ip, proxy.addr, request("/s").as_bytes()).await;
    assert!(got.is_empty(), "the client got {:?}", String::from_utf8_lossy(&got));
    up.next_seen().await;
    assert_eq!(named.accepted(named.addrs()[0]), 0);
    proxy.stop().await;
}

/// Waits until everything written on `s` has reached the peer's socket (its send queue is empty,
/// so every byte was acknowledged by the peer's kernel).
async fn wait_delivered(s: &TcpStream) {
    let fd = s.as_raw_fd();
    within("the bytes to reach the peer's socket", async {
        for _ in 0..5000 {
            let mut queued: libc::c_int = 0;
            // SAFETY: TIOCOUTQ writes one int through the pointer, which is valid for it.
            let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
            assert_eq!(r, 0, "ioctl(TIOCOUTQ): {}", io::Error::last_os_error());
            if queued == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the send queue never emptied");
    })
    .await;
}

#[tokio::test]
async fn rule7_non_101_status_closes_the_client_cleanly_even_with_bytes_behind_its_request() {
    // The client sent payload behind its request which the proxy has not read when the upstream
    // refuses: the client must still see a clean EOF, not a reset (as with the proxy's own
    // refusals, which linger for exactly this reason).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = Proxy::start(&config_text(&[(listener.local_addr().unwrap(), 1)], &[], "2s", "")).await;
    let mut client = connect_from(client_ip(60), proxy.addr).await;
    client.write_all(request("/p").as_bytes()).await.unwrap();
    let (mut up, _) = within("the proxy to connect to the upstream", listener.accept())
        .await
        .unwrap();
    let mut got = Vec::new();
    within("the forwarded request", async {
        let mut buf = [0u8; 4096];
        while find(&got, b"\r\n\r\n").is_none() {
            let n = up.read(&mut buf).await.unwrap();
            assert!(n > 0, "the proxy closed before forwarding the request");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    // The proxy has read the whole head and now waits on the upstream; these bytes stay unread.
    client.write_all(b"\x81\x05early").await.unwrap();
    wait_delivered(&client).await;
    up.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let (bytes, end) = within("the proxy to close the client", read_until_end(&mut client, 1 << 16)).await;
    assert!(bytes.is_empty(), "the client got {:?}", String::from_utf8_lossy(&bytes));
    assert!(end.is_ok(), "the client got {end:?} instead of a clean EOF");
    let (_, end) = within("the proxy to close the upstream", read_until_end(&mut up, 1 << 16)).await;
    assert!(end.is_ok(), "{end:?}");
    proxy.stop().await;
}

// ---- rule 8: the upstream's 101 ----

#[tokio::test]
async fn rule8_valid_101_forwarded_byte_for_byte_with_the_bytes_after_it() {
    let response = "HTTP/1.1 101 Web Socket Protocol Handshake\r\nX-Upstream-Extra: kept as is\r\n\
                    sec-websocket-accept: {accept}\r\nconnection: keep-alive, UPGRADE\r\n\
                    Server:  odd   spacing\r\nUPGRADE: WebSocket\r\nSec-WebSocket-Protocol: chat\r\n\r\n";
    let up = Upstream::start(Script::Respond(response.into())).await;
    let proxy = Proxy::start(&config_text(&[(up.addr, 1)], &[], "2s", "")).await;
    let want = response.replace("{accept}", ACCEPT);
    let mut s = connect_from(client_ip(20), proxy.addr).await;
    s.write_all(request("/r").as_bytes()).await.unwrap();
    let mut got = vec![0u8; want.len()];
    within("the 101", s.read_exact(&mut got)).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&got), want);
    // Nothing was added behind it: the next bytes are the upstream's echo of ours.
    s.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    within("the echo", s.read_exact(&mut echo)).await.unwrap();
    assert_eq!(&echo, b"ping");
    proxy.stop().await;

    // Bytes the upstream sends right behind its 101 reach the client without the client sending.
    let mut after = vec![0x81, 0x05];
    after.extend_from_slice(b"hello");
    after.extend(Pattern::bytes(3, 3000));
    let up = Upstream::start(Script::Upgrade { after: after.clone() }).await;
    let proxy = Proxy::start(&config_text(&[(up.addr, 1)], &[], "2s", "")).await;
    let mut s = connect_from(client_ip(21), proxy.addr).await;
    s.write_all(request("/r").as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(
        head,
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
        )
    );
    let mut got = vec![0u8; after.len()];
    within("the bytes after the 101", s.read_exact(&mut got)).await.unwrap();
    assert_eq!(got, after);
    proxy.stop().await;
}

#[tokio::test]
async fn rule8_invalid_101_gives_the_client_nothing() {
    let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: {accept}\r\n\r\n";
    let cases = [
        (
            "missing Sec-WebSocket-Accept",
            ok.replace("Sec-WebSocket-Accept: {accept}\r\n", ""),
        ),
        (
            "wrong Sec-WebSocket-Accept",
            ok.replace("{accept}", "AAAAAAAAAAAAAAAAAAAAAAAAAAA="),
        ),
        ("missing Upgrade", ok.replace("Upgrade: websocket\r\n", "")),
        (
            "Upgrade of another protocol",
            ok.replace("Upgrade: websocket", "Upgrade: h2c"),
        ),
        (
            "Connection without upgrade",
            ok.replace("Connection: Upgrade", "Connection: keep-alive"),
        ),
        ("missing Connection", ok.replace("Connection: Upgrade\r\n", "")),
    ];
    for (i, (what, text)) in cases.into_iter().enumerate() {
        let mut up = Upstream::start(Script::Respond(text)).await;
        let proxy = Proxy::start(&config_text(&[(up.addr, 1)], &[], "2s", "")).await;
        let got = exchange_raw(client_ip(30 + i as u32), proxy.addr, request("/bad").as_bytes()).await;
        assert!(
            got.is_empty(),
            "{what}: the client got {:?}",
            String::from_utf8_lossy(&got)
        );
        up.next_seen().await;
        proxy.stop().await;
    }
}

// ---- rule 9: the relay ----

#[tokio::test]
async fn rule9_websocket_echo_text_and_binary_up_to_1mib() {
    let echo = echo_upstream().await;
    let proxy = Proxy::start(&config_text(&[(echo, 1)], &[], "2s", "")).await;
    let mut ws = ws_connect(client_ip(40), proxy.addr).await.unwrap();
    let special = [0usize, 1, 125, 126, 127, 128, 65535, 65536, 65537, 1 << 20];
    let mut total = 0;
    for i in 0..100usize {
        let size = match i {
            _ if i < special.len() => special[i],
            _ if i % 10 == 0 => 1 << 20,
            _ => (i * 7919) % 70_000,
        };
        total += size;
        let bytes = Pattern::bytes(i as u64 + 1, size);
        let msg = if i % 2 == 0 {
            Message::text(bytes.iter().map(|b| char::from(b' ' + b % 95)).collect::<String>())
        } else {
            Message::binary(bytes)
        };
        within("a message to be sent", ws.send(msg.clone())).await.unwrap();
        let back = within("the echo of a message", ws.next())
            .await
            .expect("stream ended")
            .unwrap();
        assert!(back == msg, "message {i} of {size} bytes came back different");
    }
    assert!(total > 10 << 20);
    within("the close", ws.close(None)).await.unwrap();
    within("the end of the stream", async {
        while let Some(Ok(m)) = ws.next().await {
            assert!(m.is_close(), "unexpected message after close: {m:?}");
        }
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn rule9_raw_bytes_relayed_untouched_both_ways() {
    let mut up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    let proxy = Proxy::start(&config_text(&[(up.addr, 1)], &[], "2s", "")).await;
    let s = raw_handshake(client_ip(41), proxy.addr).await;
    // Not WebSocket frames: HTTP look-alikes, zeros, 0xff runs and noise.
    let mut junk =
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n\r\n\x00\x00\xff\xff\x88\x00".to_vec();
    junk.extend(vec![0u8; 5000]);
    junk.extend(vec![0xffu8; 5000]);
    junk.extend(Pattern::bytes(7, 1 << 20));
    let (mut r, mut w) = s.into_split();
    let to_send = junk.clone();
    let writer = tokio::spawn(async move {
        let sizes = [1usize, 7, 1000, 65536, 3, 200_000];
        let (mut at, mut k) = (0, 0);
        while at < to_send.len() {
            let n = sizes[k % sizes.len()].min(to_send.len() - at);
            w.write_all(&to_send[at..at + n]).await.unwrap();
            at += n;
            k += 1;
        }
        w.shutdown().await.unwrap();
    });
    let (back, end) = within("the echo and the close", read_until_end(&mut r, junk.len())).await;
    end.unwrap();
    assert!(
        back == junk,
        "echo differs: {} bytes back of {}",
        back.len(),
        junk.len()
    );
    within("the writer", writer).await.unwrap();
    let seen = up.next_seen().await;
    assert!(
        seen.rest == junk,
        "the upstream received {} bytes, different from the {} sent",
        seen.rest.len(),
        junk.len()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn rule9_bytes_sent_with_the_request_follow_it_in_order() {
    let mut up = Upstream::start(Script::Upgrade {
        after: b"AFTER".to_vec(),
    })
    .await;
    let proxy = Proxy::start(&config_text(&[(up.addr, 1)], &[], "2s", "")).await;
    let early = b"\x81\x8cEARLY-PAYLOAD\x00\xff\r\n\r\nmore".to_vec();
    let mut first = request("/early").into_bytes();
    first.extend_from_slice(&early);
    let mut s = connect_from(client_ip(42), proxy.addr).await;
    s.write_all(&first).await.unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(status(&head), 101, "{head:?}");
    let mut got = vec![0u8; 5 + early.len()];
    within("the upstream's bytes and the echo", s.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got[..5], b"AFTER");
    assert_eq!(&got[5..], &early[..]);
    s.write_all(b"LATER").await.unwrap();
    let mut later = [0u8; 5];
    within("the echo of later bytes", s.read_exact(&mut later))
        .await
        .unwrap();
    assert_eq!(&later, b"LATER");
    drop(s);
    let seen = up.next_seen().await;
    assert!(
        seen.head.starts_with("GET /early HTTP/1.1\r\n") && !seen.head.contains("EARLY"),
        "{:?}",
        seen.head
    );
    let mut want = early.clone();
    want.extend_from_slice(b"LATER");
    assert_eq!(seen.rest, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule9_bulk_32mib_each_way_with_checksums() {
    const SIZE: usize = 32 << 20;
    let (proxy, client, upstream) = raw_pair(client_ip(43)).await;
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let c_send = tokio::spawn(async move { send_pattern(&mut cw, 11, SIZE).await });
    let u_send = tokio::spawn(async move { send_pattern(&mut uw, 22, SIZE).await });
    let c_recv = tokio::spawn(async move { receive_checksum(&mut cr, SIZE as u64).await });
    let u_recv = tokio::spawn(async move { receive_checksum(&mut ur, SIZE as u64).await });
    let (up_sent, down_sent, down_got, up_got) = within("the bulk transfer", async {
        (
            c_send.await.unwrap(),
            u_send.await.unwrap(),
            c_recv.await.unwrap(),
            u_recv.await.unwrap(),
        )
    })
    .await;
    assert_eq!(up_sent.0, SIZE as u64);
    assert_eq!(up_got, up_sent, "client to upstream: (length, checksum) differ");
    assert_eq!(down_got, down_sent, "upstream to client: (length, checksum) differ");
    assert_ne!(up_sent.1, down_sent.1);
    proxy.stop().await;
}

// ---- rule 10: close ----

#[tokio::test]
async fn rule10_client_half_close() {
    let (proxy, mut client, mut upstream) = raw_pair(client_ip(50)).await;
    let sent = Pattern::bytes(5, 100_000);
    client.write_all(&sent).await.unwrap();
    client.shutdown().await.unwrap();
    // The upstream gets every byte, then EOF.
    let (got, end) = within(
        "the upstream to see the client's EOF",
        read_until_end(&mut upstream, sent.len()),
    )
    .await;
    end.unwrap();
    assert!(got == sent, "upstream got {} of {} bytes", got.len(), sent.len());
    // It can still answer; the client gets that, then EOF.
    let back = Pattern::bytes(6, 50_000);
    upstream.write_all(&back).await.unwrap();
    upstream.shutdown().await.unwrap();
    let (got, end) = within(
        "the client to see the upstream's EOF",
        read_until_end(&mut client, back.len()),
    )
    .await;
    end.unwrap();
    assert!(got == back, "client got {} of {} bytes", got.len(), back.len());
    proxy.stop().await;
}

#[tokio::test]
async fn rule10_upstream_half_close() {
    let (proxy, mut client, mut upstream) = raw_pair(client_ip(51)).await;
    let sent = Pattern::bytes(7, 100_000);
    upstream.write_all(&sent).await.unwrap();
    upstream.shutdown().await.unwrap();
    let (got, end) = within(
        "the client to see the upstream's EOF",
        read_until_end(&mut client, sent.len()),
    )
    .await;
    end.unwrap();
    assert!(got == sent, "client got {} of {} bytes", got.len(), sent.len());
    let back = Pattern::bytes(8, 50_000);
    client.write_all(&back).await.unwrap();
    client.shutdown().await.unwrap();
    let (got, end) = within(
        "the upstream to see the client's EOF",
        read_until_end(&mut upstream, back.len()),
    )
    .await;
    end.unwrap();
    assert!(got == back, "upstream got {} of {} bytes", got.len(), back.len());
    proxy.stop().await;
}

#[tokio::test]
async fn rule10_client_half_close_right_behind_the_request() {
    // Request, payload and FIN leave the client before the upstream has even answered.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = Proxy::start(&config_text(&[(listener.local_addr().unwrap(), 1)], &[], "2s", "")).await;
    let payload = Pattern::bytes(9, 20_000);
    let mut first = request("/hc").into_bytes();
    first.extend_from_slice(&payload);
    let mut client = connect_from(client_ip(52), proxy.addr).await;
    client.write_all(&first).await.unwrap();
    client.shutdown().await.unwrap();
    let (mut upstream, head, rest) = accept_upgraded(&listener).await;
    assert!(head.starts_with("GET /hc HTTP/1.1\r\n"));
    let (more, end) = within(
        "the payload and the client's EOF",
        read_until_end(&mut upstream, payload.len()),
    )
    .await;
    end.unwrap();
    assert!(
        [rest, more].concat() == payload,
        "the upstream did not get the payload intact"
    );
    upstream.write_all(b"bye").await.unwrap();
    upstream.shutdown().await.unwrap();
    let head = read_head(&mut client).await;
    assert_eq!(status(&head), 101, "{head:?}");
    let (got, end) = within("the client to see the upstream's EOF", read_until_end(&mut client, 3)).await;
    end.unwrap();
    assert_eq!(got, b"bye");
    proxy.stop().await;
}

/// How long a reset may take to reach the other side.
const PROMPT: Duration = Duration::from_secs(3);

#[tokio::test]
async fn rule10_upstream_reset_closes_the_client() {
    let (proxy, mut client, mut upstream) = raw_pair(client_ip(53)).await;
    // The relay is live.
    client.write_all(b"hi").await.unwrap();
    let mut b = [0u8; 2];
    within("the relayed bytes", upstream.read_exact(&mut b)).await.unwrap();
    upstream.set_zero_linger().unwrap();
    drop(upstream);
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(PROMPT, client.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("the client side stayed open {PROMPT:?} after the upstream reset"));
    assert!(matches!(r, Ok(0) | Err(_)), "the client read {r:?} instead of the end");
    proxy.stop().await;
}

#[tokio::test]
async fn rule10_client_reset_closes_the_upstream() {
    let (proxy, mut client, mut upstream) = raw_pair(client_ip(54)).await;
    upstream.write_all(b"hi").await.unwrap();
    let mut b = [0u8; 2];
    within("the relayed bytes", client.read_exact(&mut b)).await.unwrap();
    client.set_zero_linger().unwrap();
    drop(client);
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(PROMPT, upstream.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("the upstream side stayed open {PROMPT:?} after the client reset"));
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "the upstream read {r:?} instead of the end"
    );
    proxy.stop().await;
}

// ---- upstreams.on_refusal = "forward" ----

#[tokio::test]
async fn forward_passes_a_non_101_answer_on_with_its_body_and_fields() {
    let answer = "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nX-Why: origin\r\nConnection: keep-alive\r\n\
                  Content-Length: 7\r\n\r\ndenied\n";
    let up = Upstream::start(Script::Respond(answer.into())).await;
    let text = format!(
        "{}on_refusal = \"forward\"\n",
        config_text(&[(up.addr, 1)], &[], "2s", "")
    );
    let proxy = Proxy::start(&text).await;
    let got = exchange(client_ip(1), proxy.addr, request("/").as_bytes()).await;
    assert_eq!(
        got,
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nX-Why: origin\r\nContent-Length: 7\r\n\
         Connection: close\r\n\r\ndenied\n"
    );
    // A redirect with a body of unknown length: its status and fields, no body.
    let answer = "HTTP/1.1 302 Found\r\nLocation: /login\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let up = Upstream::start(Script::Respond(answer.into())).await;
    let text = format!(
        "{}on_refusal = \"forward\"\n",
        config_text(&[(up.addr, 1)], &[], "2s", "")
    );
    let proxy2 = Proxy::start(&text).await;
    let got = exchange(client_ip(2), proxy2.addr, request("/").as_bytes()).await;
    assert_eq!(
        got,
        "HTTP/1.1 302 Found\r\nLocation: /login\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    proxy.stop().await;
    proxy2.stop().await;
}

#[tokio::test]
async fn drop_the_default_tells_the_client_nothing() {
    let answer = "HTTP/1.1 403 Forbidden\r\nContent-Length: 7\r\n\r\ndenied\n";
    let up = Upstream::start(Script::Respond(answer.into())).await;
    let proxy = Proxy::start(&config_text(&[(up.addr, 1)], &[], "2s", "")).await;
    assert_eq!(exchange(client_ip(1), proxy.addr, request("/").as_bytes()).await, "");
    proxy.stop().await;
}

// ---- upstreams.balance ----

/// Opens a relayed connection from `client_ip(n)`; returns it with the upstream that took it.
async fn held(proxy: SocketAddr, n: u32, ups: &[&Upstream]) -> (tokio::net::TcpStream, usize) {
    let before: Vec<usize> = ups.iter().map(|u| u.accepted()).collect();
    let mut s = connect_from(client_ip(n), proxy).await;
    s.write_all(request("/").as_bytes()).await.unwrap();
    assert_eq!(status(&read_head(&mut s).await), 101);
    let which = ups
        .iter()
        .zip(&before)
        .position(|(u, b)| u.accepted() > *b)
        .expect("an upstream took it");
    (s, which)
}

#[tokio::test]
async fn round_robin_takes_turns_whatever_the_client() {
    let (a, b) = (
        Upstream::start(Script::Upgrade { after: vec![] }).await,
        Upstream::start(Script::Upgrade { after: vec![] }).await,
    );
    let text = format!(
        "{}balance = \"round-robin\"\n",
        config_text(&[(a.addr, 1), (b.addr, 1)], &[], "2s", "")
    );
    let proxy = Proxy::start(&text).await;
    let mut took = Vec::new();
    for _ in 0..4 {
        // The same client every time: a hash would send it to one upstream.
        let (_s, which) = held(proxy.addr, 1, &[&a, &b]).await;
        took.push(which);
    }
    assert!(took == [0, 1, 0, 1] || took == [1, 0, 1, 0], "{took:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn least_connections_fills_the_emptiest_and_keeps_its_counts_across_a_reload() {
    let ups = [
        Upstream::start(Script::Upgrade { after: vec![] }).await,
        Upstream::start(Script::Upgrade { after: vec![] }).await,
        Upstream::start(Script::Upgrade { after: vec![] }).await,
    ];
    let refs: Vec<&Upstream> = ups.iter().collect();
    let two = |balance: &str| {
        format!(
            "{}balance = \"{balance}\"\n",
            config_text(&[(ups[0].addr, 1), (ups[1].addr, 1)], &[], "2s", "")
        )
    };
    let proxy = Proxy::start(&two("least-connections")).await;
    // Six long-lived connections from one client spread three and three.
    let mut open = Vec::new();
    for _ in 0..6 {
        open.push(held(proxy.addr, 1, &refs).await);
    }
    let on = |open: &[(tokio::net::TcpStream, usize)], i| open.iter().filter(|(_, w)| *w == i).count();
    assert_eq!((on(&open, 0), on(&open, 1)), (3, 3));
    // The first one's connections end: the next two go to it.
    open.retain(|(_, w)| *w != 0);
    let proxy_totals = || proxy.server.totals();
    let ended = wsproxy_tests::relay_kit::poll_until(DEADLINE, || (proxy_totals().ended[1] >= 3).then_some(())).await;
    assert!(ended.is_some(), "{:?}", proxy_totals());
    for _ in 0..2 {
        let (s, which) = held(proxy.addr, 1, &refs).await;
        assert_eq!(which, 0);
        open.push((s, which));
    }
    // A reload that adds a third upstream keeps the counts (2, 3): the new one, empty, is next.
    // (Its drain timeout is short, like the one the test proxy starts with.)
    let three = format!(
        "{}balance = \"least-connections\"\n",
        config_text(
            &[(ups[0].addr, 1), (ups[1].addr, 1), (ups[2].addr, 1)],
            &[],
            "2s",
            "[listen]\ndrain_timeout = \"1s\"\n"
        )
    );
    let three = wsproxy_tests::on_running_listener(&proxy.server, wsproxy::Config::parse(&three, "t").unwrap());
    proxy.server.apply(three).unwrap();
    let (_s, which) = held(proxy.addr, 1, &refs).await;
    assert_eq!(which, 2, "the added upstream, with no connection yet");
    let (_t, which) = held(proxy.addr, 1, &refs).await;
    assert_eq!(which, 2, "still the emptiest (1 against 2 and 3)");
    drop(open);
    proxy.stop().await;
}

// ---- upstreams by name ----

#[tokio::test]
async fn a_name_is_resolved_again_and_a_failed_resolution_keeps_the_last_addresses() {
    use std::sync::{Arc, Mutex};
    let (a, b) = (
        Upstream::start(Script::Upgrade { after: vec![] }).await,
        Upstream::start(Script::Upgrade { after: vec![] }).await,
    );
    // The test's resolver: what "chat.test" resolves to, or an error while it is `None`.
    let answer: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(Some(a.addr)));
    let lookups = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let resolver: wsproxy::resolve::Resolver = {
        let (answer, lookups) = (Arc::clone(&answer), Arc::clone(&lookups));
        Arc::new(move |host, _port| {
            assert_eq!(host, "chat.test");
            lookups.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let now = *answer.lock().unwrap();
            Box::pin(async move {
                now.map(|a| vec![a])
                    .ok_or_else(|| std::io::Error::other("resolver down"))
            })
        })
    };
    let text = "[listen]\ndrain_timeout = \"1s\"\n[upstreams]\nmain = [{ address = \"chat.test:9\" }]\ntimeout = \"2s\"\n\
                resolve_interval = \"1s\"\n";
    let config = wsproxy::Config::parse(text, "t").unwrap();
    let server = wsproxy::Server::with_resolver(config, resolver).unwrap();
    let proxy = Proxy::serve(server, wsproxy::listener::bind("127.0.0.1:0".parse().unwrap()).unwrap());
    let (_s, which) = held(proxy.addr, 1, &[&a, &b]).await;
    assert_eq!(which, 0, "resolved at start");

    // The name moves: within an interval, new connections follow it.
    *answer.lock().unwrap() = Some(b.addr);
    let moved = wsproxy_tests::relay_kit::poll_until(Duration::from_secs(5), || {
        (proxy.server.config().services[0]
            .upstreams
            .main
            .first()
            .map(|s| s.address)
            == Some(b.addr))
        .then_some(())
    })
    .await;
    assert!(
        moved.is_some(),
        "not resolved again: {:?}",
        proxy.server.config().services[0].upstreams.main
    );
    let (_t, which) = held(proxy.addr, 2, &[&a, &b]).await;
    assert_eq!(which, 1);

    // The resolver fails: the last addresses stay, and the failures are counted.
    *answer.lock().unwrap() = None;
    let seen = lookups.load(std::sync::atomic::Ordering::SeqCst);
    let failed = wsproxy_tests::relay_kit::poll_until(Duration::from_secs(5), || {
        let m = wsproxy_tests::exposition::Exposition::parse(&proxy.server.metrics_text());
        (m.sum("wsproxy_upstream_resolve_failures_total", &[("name", "chat.test:9")]) >= 1.0).then_some(())
    })
    .await;
    assert!(failed.is_some() && lookups.load(std::sync::atomic::Ordering::SeqCst) > seen);
    let (_u, which) = held(proxy.addr, 3, &[&a, &b]).await;
    assert_eq!(which, 1, "still the last good address");
    proxy.stop().await;
}

#[test]
fn upstream_names_and_addresses_are_checked() {
    let bad = "[upstreams]\nmain = [{ address = \"no port\" }, { address = \"bad_name:80\" }, { address = \"ok.example:80\" }]\n\
               resolve_interval = \"100ms\"\n";
    let e = wsproxy::Config::parse(bad, "t").unwrap_err();
    assert_eq!(e.problems.len(), 3, "{e}");
    assert!(e.problems[0].starts_with("upstreams.main[0].address"), "{e}");
    assert!(e.problems[1].starts_with("upstreams.main[1].address"), "{e}");
    assert!(e.problems[2].starts_with("upstreams.resolve_interval"), "{e}");
}
