//! The daemon features of the `wsproxy` binary (the in-process side is in
//! `tests/tests/daemon.rs`): the admin listener (1), reload by SIGHUP and by `wsproxy reload`
//! without dropping connections, and refusal of a broken file (2), graceful stop on SIGTERM (3),
//! and the structured log line of every connection end (7).
//!
//! The upstreams run in the test's own runtime; the proxy is the real binary, with the userspace
//! relay, on loopback ports. Waits are on its log lines, on sockets, or bounded polls.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{BIN, DAEMON_DEADLINE, Daemon, free_port, reload_command, temp_config, temp_path};

use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use wsproxy::balance::Balancer;
use wsproxy_tests::daemon_kit::try_http;
use wsproxy_tests::fleet::{Fleet, PER_ROUND, echo_check, ws_close};
use wsproxy_tests::relay_kit::{linger_zero, poll_every_async};
use wsproxy_tests::{
    client_ip, connect_from, echo_upstream, header, read_head, read_to_close, request, status, weighted, within,
    ws_connect,
};

/// Where a test's proxy listens.
#[derive(Clone, Copy)]
struct Ports {
    listen: u16,
    admin: u16,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            listen: free_port(),
            admin: free_port(),
        }
    }

    fn proxy(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.listen))
    }

    fn admin(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin))
    }
}

const OPEN_LIMITS: &str = "[limits]\nrequests_per_second = 10000.0\nburst = 10000\nmax_connections_per_ip = 0\n";

/// Config text: listen and admin addresses (and `listen_extra` keys of `[listen]`), the userspace
/// relay (and `relay_extra` keys of `[relay]`), `extra` sections, the weighted upstreams.
fn conf(
    ports: Ports,
    listen_extra: &str,
    relay_extra: &str,
    extra: &str,
    main: &[(SocketAddr, u32)],
    backup: &[(SocketAddr, u32)],
) -> String {
    format!(
        "[listen]\naddress = \"127.0.0.1:{}\"\n{listen_extra}\n[admin]\naddress = \"127.0.0.1:{}\"\n\
         [relay]\nmode = \"userspace\"\n{relay_extra}\n{extra}\n[upstreams]\nmain = [{}]\nbackup = [{}]\ntimeout = \"2s\"\n",
        ports.listen,
        ports.admin,
        weighted(main),
        weighted(backup)
    )
}

/// The binary (ports of its own, [`OPEN_LIMITS`]) in front of the one upstream `up`, from the
/// file `name` with `listen_extra` keys of `[listen]` and `relay_extra` keys of `[relay]`; JSON
/// log lines when `json`. Waited for until it accepts.
async fn start_in_front_of(
    name: &str,
    up: SocketAddr,
    listen_extra: &str,
    relay_extra: &str,
    json: bool,
) -> (Daemon, Ports) {
    let ports = Ports::new();
    let path = temp_config(
        name,
        &conf(ports, listen_extra, relay_extra, OPEN_LIMITS, &[(up, 1)], &[]),
    );
    let proxy = if json {
        Daemon::run_json(&path).await
    } else {
        Daemon::run(&path, None).await
    };
    (proxy, ports)
}

/// [`start_in_front_of`] an echo upstream with the drain timeout `drain`, and a WebSocket through
/// it that has echoed a message.
async fn echo_proxy_with_a_websocket(name: &str, drain: &str) -> (Daemon, Ports, WebSocketStream<TcpStream>) {
    let echo = echo_upstream().await;
    let (proxy, ports) = start_in_front_of(name, echo, &format!("drain_timeout = \"{drain}\""), "", false).await;
    let mut ws = ws_connect(client_ip(1), ports.proxy()).await.unwrap();
    echo_check(&mut ws, "before").await;
    (proxy, ports, ws)
}

fn x_gen(generation: &str) -> String {
    format!("[headers]\nadd = [{{ name = \"X-Gen\", value = \"{generation}\" }}]\n")
}

fn upstreams_of(text: &str) -> wsproxy::config::Upstreams {
    wsproxy::Config::parse(text, "test")
        .unwrap_or_else(|e| panic!("{e}"))
        .services
        .remove(0)
        .upstreams
}

/// A client (among `client_ip(1000..3000)`) whose first choice under the config `text` is `up`.
fn first_choice_of(text: &str, up: SocketAddr) -> IpAddr {
    let b = Balancer::new(&upstreams_of(text));
    (1000..3000).map(client_ip).find(|&ip| b.order(ip)[0] == up).unwrap()
}

// ---- clients and upstreams ----

/// A raw upstream: a valid 101 followed by its one-byte `id` if it has one, then it echoes raw
/// bytes; at the client's EOF it sends `bye` and closes. Every request head it gets arrives on `heads`.
struct Recorder {
    addr: SocketAddr,
    heads: mpsc::UnboundedReceiver<String>,
    accepted: Arc<AtomicUsize>,
}

impl Recorder {
    async fn start(id: Option<u8>) -> Recorder {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, heads) = mpsc::unbounded_channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let head = read_head(&mut s).await;
                    let accept = wsproxy::upstream::accept_key(&header(&head, "sec-websocket-key").unwrap_or_default());
                    let _ = tx.send(head);
                    let r = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                         Sec-WebSocket-Accept: {accept}\r\n\r\n"
                    );
                    s.write_all(r.as_bytes()).await?;
                    if let Some(id) = id {
                        s.write_all(&[id]).await?;
                    }
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = s.read(&mut buf).await?;
                        if n == 0 {
                            break;
                        }
                        s.write_all(&buf[..n]).await?;
                    }
                    s.write_all(b"bye").await?;
                    s.shutdown().await?;
                    Ok::<_, std::io::Error>(())
                });
            }
        });
        Recorder { addr, heads, accepted }
    }

    async fn next_head(&mut self) -> String {
        within("an upstream request", self.heads.recv()).await.unwrap()
    }
}

/// A raw handshake through the proxy; Ok: the stream right after the 101.
async fn raw_upgrade(from: IpAddr, proxy: SocketAddr) -> Result<TcpStream, String> {
    let mut s = connect_from(from, proxy).await;
    s.write_all(request("/").as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    if status(&head) != 101 {
        let rest = read_to_close(&mut s).await;
        return Err(format!("{head}{rest}"));
    }
    Ok(s)
}

/// [`raw_upgrade`], then the upstream's id byte.
async fn upgrade_id(from: IpAddr, proxy: SocketAddr) -> Result<(TcpStream, u8), String> {
    let mut s = raw_upgrade(from, proxy).await?;
    let mut id = [0u8; 1];
    within("the upstream id", s.read_exact(&mut id)).await.unwrap();
    Ok((s, id[0]))
}

/// A new connection from `ip`: the id of the upstream that took it and the X-Gen it forwarded.
async fn landing(proxy: SocketAddr, ip: IpAddr, ups: [&mut Recorder; 2], ids: [u8; 2]) -> (u8, Option<String>) {
    let (s, id) = upgrade_id(ip, proxy).await.unwrap_or_else(|e| panic!("{ip}: {e}"));
    drop(s);
    let [a, b] = ups;
    let up = if id == ids[0] { a } else { b };
    (id, header(&up.next_head().await, "x-gen"))
}

/// One request to the admin listener: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    try_http(addr, method, path).await.map(|r| (r.status, r.body))
}

/// The value of one sample of the admin listener's `/metrics` (exact series text).
async fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let (code, body) = http(admin, "GET", "/metrics").await.unwrap();
    assert_eq!(code, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

// ---- many WebSockets talking in rounds ----

const CONNS: usize = 100;
/// Every `connection closed` line of a JSON log, parsed.
fn closed_lines(d: &Daemon) -> Vec<Value> {
    d.seen
        .iter()
        .map(|(_, l)| l)
        .filter(|l| l.contains("connection closed"))
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|j| j["message"] == "connection closed")
        .collect()
}

// ---- 1: the admin listener of the binary ----

/// `/healthz` is meant to answer 503 while the proxy drains (admin.rs), so that a load balancer
/// sees the instance leave while its connections finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req1_binary_healthz_503_while_draining() {
    let echo = echo_upstream().await;
    let (mut proxy, ports) = start_in_front_of("healthz.toml", echo, "drain_timeout = \"10s\"", "", false).await;
    proxy.wait_for("admin endpoints").await;
    assert_eq!(
        http(ports.admin(), "GET", "/healthz").await.unwrap(),
        (200, "ok\n".to_string())
    );

    let mut ws = ws_connect(client_ip(1), ports.proxy()).await.unwrap();
    echo_check(&mut ws, "hello").await;
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    proxy.wait_for("stopped accepting").await;
    let during = http(ports.admin(), "GET", "/healthz").await;
    // Let the proxy finish before asserting, so that a failure does not leave it draining.
    echo_check(&mut ws, "during the drain").await;
    ws_close(ws).await;
    assert!(proxy.wait_exit(Duration::from_secs(5)).await.success());
    match during {
        Ok((code, body)) => assert_eq!(
            code, 503,
            "/healthz during the drain answered {code} {body:?} (0: reset)"
        ),
        Err(e) => panic!("/healthz during the drain: the admin listener is gone ({e}); expected 503"),
    }
}

// ---- 2: reload without drops ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req2_binary_reloads_by_sighup_and_reload_command_keep_100_websockets() {
    let echo = echo_upstream().await;
    let (mut r1, mut r2) = (Recorder::start(Some(b'1')).await, Recorder::start(Some(b'2')).await);
    let ids = [b'1', b'2'];
    let ports = Ports::new();
    let path = temp_path("reload.toml");
    let text = |main: &[(SocketAddr, u32)], backup: &[(SocketAddr, u32)], generation: u32, limits: &str| {
        conf(
            ports,
            "",
            "",
            &format!("{limits}{}", x_gen(&generation.to_string())),
            main,
            backup,
        )
    };
    std::fs::write(&path, text(&[(echo, 1)], &[], 0, OPEN_LIMITS)).unwrap();
    let mut proxy = Daemon::run(&path, None).await;
    proxy.wait_for("admin endpoints").await;
    let addr = ports.proxy();
    let mut fleet = Fleet::open(addr, CONNS, 1).await;
    fleet.round(0).await;
    let mut reloads = 0;

    // Writes `text` to the file and reloads it: odd reloads by SIGHUP, even ones by `wsproxy
    // reload`; each applied while the fleet talks.
    async fn reload(proxy: &mut Daemon, path: &Path, text: &str, reloads: &mut usize) {
        std::fs::write(path, text).unwrap();
        *reloads += 1;
        let n = *reloads;
        if n % 2 == 1 {
            proxy.signal(nix::sys::signal::Signal::SIGHUP);
            proxy
                .wait_for_nth("SIGHUP: configuration reloaded", n.div_ceil(2))
                .await;
        } else {
            let (code, out, err) = reload_command(path).await;
            assert_eq!(code, Some(0), "wsproxy reload: {out}{err}");
            assert!(out.starts_with("reloaded"), "{out}");
            proxy
                .wait_for_nth("configuration reloaded (admin endpoint)", n / 2)
                .await;
        }
    }

    // 1: r1 joins: clients whose first choice it is go to it, with the new header.
    fleet.start_round(1);
    let t1 = text(&[(echo, 1), (r1.addr, 1)], &[], 1, OPEN_LIMITS);
    reload(&mut proxy, &path, &t1, &mut reloads).await;
    let c = first_choice_of(&t1, r1.addr);
    assert_eq!(
        landing(addr, c, [&mut r1, &mut r2], ids).await,
        (b'1', Some("1".into()))
    );
    fleet.finish_round(1).await;

    // 2: the echo upstream leaves (its connections stay), r2 joins with weight 3.
    fleet.start_round(2);
    let t2 = text(&[(r1.addr, 1), (r2.addr, 3)], &[], 2, OPEN_LIMITS);
    reload(&mut proxy, &path, &t2, &mut reloads).await;
    let c = first_choice_of(&t2, r2.addr);
    assert_eq!(
        landing(addr, c, [&mut r1, &mut r2], ids).await,
        (b'2', Some("2".into()))
    );
    fleet.finish_round(2).await;

    // 3: one connection per client.
    fleet.start_round(3);
    let capped = "[limits]\nrequests_per_second = 10000.0\nburst = 10000\nmax_connections_per_ip = 1\n";
    let t3 = text(&[(r1.addr, 1), (r2.addr, 3)], &[], 3, capped);
    reload(&mut proxy, &path, &t3, &mut reloads).await;
    let (held, id) = upgrade_id(client_ip(5000), addr).await.unwrap();
    let refused = raw_upgrade(client_ip(5000), addr).await.unwrap_err();
    assert_eq!(status(&refused), 429, "{refused}");
    drop(held);
    let up = if id == b'1' { &mut r1 } else { &mut r2 };
    assert_eq!(header(&up.next_head().await, "x-gen").as_deref(), Some("3"));
    fleet.finish_round(3).await;

    // 4: r1's weight goes to 0: its clients move to r2.
    fleet.start_round(4);
    let t4 = text(&[(r1.addr, 0), (r2.addr, 1)], &[], 4, OPEN_LIMITS);
    reload(&mut proxy, &path, &t4, &mut reloads).await;
    let r1_before = r1.accepted.load(Ordering::SeqCst);
    // Clients whose first choice r1 was before.
    let b2 = Balancer::new(&upstreams_of(&t2));
    let movers: Vec<IpAddr> = (6000..8000)
        .map(client_ip)
        .filter(|&ip| b2.order(ip)[0] == r1.addr)
        .take(5)
        .collect();
    for ip in movers {
        assert_eq!(
            landing(addr, ip, [&mut r1, &mut r2], ids).await,
            (b'2', Some("4".into()))
        );
    }
    assert_eq!(
        r1.accepted.load(Ordering::SeqCst),
        r1_before,
        "a weight-0 upstream got a new client"
    );
    fleet.finish_round(4).await;

    // 5: r1 main, r2 backup.
    fleet.start_round(5);
    let t5 = text(&[(r1.addr, 1)], &[(r2.addr, 1)], 5, OPEN_LIMITS);
    reload(&mut proxy, &path, &t5, &mut reloads).await;
    assert_eq!(
        landing(addr, client_ip(9000), [&mut r1, &mut r2], ids).await,
        (b'1', Some("5".into()))
    );
    fleet.finish_round(5).await;

    fleet.round(6).await;
    // None of the 100 ended: they are all still open (the extra connections above have ended).
    let admin = ports.admin();
    // The gauge raises no event: polled, within the deadline.
    let gauge = "wsproxy_connections_open{service=\"default\",relay=\"userspace\"}";
    let all_open = poll_every_async(DAEMON_DEADLINE, Duration::from_millis(20), || async {
        (metric(admin, gauge).await == Some(CONNS as f64)).then_some(())
    })
    .await;
    assert!(all_open.is_some(), "open connections: {:?}", metric(admin, gauge).await);
    assert_eq!(
        metric(admin, "wsproxy_config_reloads_total{result=\"ok\"}").await,
        Some(5.0)
    );
    assert_eq!(
        metric(admin, "wsproxy_config_reloads_total{result=\"error\"}").await,
        Some(0.0)
    );
    assert_eq!(http(admin, "GET", "/healthz").await.unwrap().0, 200);
    assert_eq!(proxy.count("reload refused"), 0, "{}", proxy.text());

    let counts = fleet.close().await;
    assert!(counts.iter().all(|&n| n == 7 * PER_ROUND), "{counts:?}");
    assert!(proxy.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req2_binary_refuses_a_broken_config_and_keeps_serving() {
    let mut r1 = Recorder::start(Some(b'1')).await;
    let ports = Ports::new();
    let path = temp_path("broken.toml");
    let r1_addr = r1.addr;
    let good = |generation: &str| {
        conf(
            ports,
            "",
            "",
            &format!("{OPEN_LIMITS}{}", x_gen(generation)),
            &[(r1_addr, 1)],
            &[],
        )
    };
    std::fs::write(&path, good("old")).unwrap();
    let mut proxy = Daemon::run_json(&path).await;
    proxy.wait_for("admin endpoints").await;
    let addr = ports.proxy();
    let (mut held, _) = upgrade_id(client_ip(1), addr).await.unwrap();
    assert_eq!(header(&r1.next_head().await, "x-gen").as_deref(), Some("old"));

    let fields = ["limits.burst", "upstreams.main", "upstreams.timeout"];
    let broken = format!(
        "[listen]\naddress = \"127.0.0.1:{}\"\n[admin]\naddress = \"127.0.0.1:{}\"\n[limits]\nburst = 0\n\
         [upstreams]\nmain = []\ntimeout = \"0s\"\n",
        ports.listen, ports.admin
    );
    std::fs::write(&path, &broken).unwrap();

    // SIGHUP: refused, every problem logged.
    proxy.signal(nix::sys::signal::Signal::SIGHUP);
    let line = proxy.wait_for("SIGHUP: reload refused").await;
    let j: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(j["level"].as_str(), Some("ERROR"), "{line}");
    for f in fields {
        assert!(
            j["message"].as_str().unwrap_or_default().contains(f),
            "{f} not logged: {line}"
        );
    }

    // `wsproxy reload` with the broken file: exit 2, every problem printed.
    let (code, out, err) = reload_command(&path).await;
    assert_eq!(code, Some(2), "{out}{err}");
    for f in fields {
        assert!(err.contains(f), "{f} not printed: {err}");
    }

    // POST /reload: 400 with every problem, and logged.
    let (code, body) = http(ports.admin(), "POST", "/reload").await.unwrap();
    assert_eq!(code, 400, "{body}");
    for f in fields {
        assert!(body.contains(f), "{f} not in {body}");
    }
    // The SIGHUP's line was the first; this is the admin endpoint's.
    let line = proxy
        .wait_for_nth("reload refused, keeping the running configuration", 2)
        .await;
    assert!(
        line.contains("\"level\":\"WARN\"") && line.contains("limits.burst"),
        "{line}"
    );

    // Still serving with the old configuration; the open connection still flows.
    let (s, id) = upgrade_id(client_ip(2), addr).await.unwrap();
    assert_eq!(id, b'1');
    drop(s);
    assert_eq!(header(&r1.next_head().await, "x-gen").as_deref(), Some("old"));
    held.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    within("the echo", held.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"still here");
    assert_eq!(
        metric(ports.admin(), "wsproxy_config_reloads_total{result=\"error\"}").await,
        Some(2.0)
    );

    // Fixed: the next SIGHUP applies it.
    std::fs::write(&path, good("new")).unwrap();
    proxy.signal(nix::sys::signal::Signal::SIGHUP);
    proxy.wait_for("SIGHUP: configuration reloaded").await;
    let s = raw_upgrade(client_ip(3), addr).await.unwrap();
    drop(s);
    assert_eq!(header(&r1.next_head().await, "x-gen").as_deref(), Some("new"));
    drop(held);
    assert!(proxy.terminate().await.success());
}

#[test]
fn req2_reload_command_needs_an_admin_address() {
    let path = temp_path("no-admin.toml");
    std::fs::write(&path, "[upstreams]\nmain = [{ address = \"127.0.0.1:9\" }]\n").unwrap();
    let out = Command::new(BIN)
        .args(["reload", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("admin.address is not set") && err.contains("SIGHUP"),
        "{err}"
    );
}

// ---- 3: graceful stop ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req3_sigterm_stops_accepting_and_lets_a_finishing_connection_complete() {
    let (mut proxy, ports, mut ws) = echo_proxy_with_a_websocket("drain-finish.toml", "10s").await;

    let t = Instant::now();
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    let line = proxy.wait_for("stopped accepting").await;
    assert!(line.contains("open=1"), "{line}");
    let refused = TcpStream::connect(ports.proxy()).await.map(|_| ()).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

    // Its last messages arrive, then it closes by itself; the proxy exits then, not at 10 s.
    for i in 0..3 {
        echo_check(&mut ws, &format!("last message {i}")).await;
    }
    ws_close(ws).await;
    let status = proxy.wait_exit(Duration::from_secs(8)).await;
    assert!(status.success(), "{status:?}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "exited {:?} after SIGTERM",
        t.elapsed()
    );
    let closed = proxy.wait_for("connection closed").await;
    assert!(closed.contains("end=closed"), "{closed}");
    assert_eq!(proxy.count("drain timeout"), 0, "{}", proxy.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req3_sigterm_closes_connections_still_open_at_the_drain_timeout() {
    let (mut proxy, _, mut ws) = echo_proxy_with_a_websocket("drain-timeout.toml", "1s").await;

    let t = Instant::now();
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    proxy.wait_for("stopped accepting").await;
    echo_check(&mut ws, "still open during the drain").await;
    // Silent from here: the proxy closes it when the drain timeout ends.
    let r = within("the proxy to close the connection", ws.next()).await;
    let closed_after = t.elapsed();
    assert!(!matches!(r, Some(Ok(Message::Text(_) | Message::Binary(_)))), "{r:?}");
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(4)).contains(&closed_after),
        "closed {closed_after:?} after SIGTERM, drain timeout 1 s"
    );
    let status = proxy.wait_exit(Duration::from_secs(8)).await;
    assert!(status.success(), "{status:?}");
    assert!(
        proxy.count("drain timeout: closing the connections still open") == 1,
        "{}",
        proxy.text()
    );
}

// ---- 7: the log line of every connection end ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req7_json_log_line_per_connection_end() {
    let up = Recorder::start(None).await;
    let (mut proxy, ports) = start_in_front_of("json.toml", up.addr, "", "idle_timeout = \"1s\"", true).await;
    let addr = ports.proxy();

    // Three that close cleanly: n bytes up, n + 3 down (the echo, then "bye").
    for (i, n) in [(1u32, 100usize), (2, 200), (3, 300)] {
        let mut s = raw_upgrade(client_ip(i), addr).await.unwrap();
        s.write_all(&vec![b'x'; n]).await.unwrap();
        s.shutdown().await.unwrap();
        let back = read_to_close(&mut s).await;
        assert_eq!(back.len(), n + 3);
    }
    // One reset by the client.
    let mut s = raw_upgrade(client_ip(4), addr).await.unwrap();
    s.write_all(&[b'r'; 50]).await.unwrap();
    let mut back = [0u8; 50];
    within("the echo", s.read_exact(&mut back)).await.unwrap();
    let std = s.into_std().unwrap();
    linger_zero(&std);
    drop(std);
    // One left silent: the idle timeout closes it.
    let mut s = raw_upgrade(client_ip(5), addr).await.unwrap();
    s.write_all(&[b'i'; 10]).await.unwrap();
    let mut back = [0u8; 10];
    within("the echo", s.read_exact(&mut back)).await.unwrap();
    read_to_close(&mut s).await;

    proxy.wait_for_nth("connection closed", 5).await;
    assert!(proxy.terminate().await.success());
    let lines = closed_lines(&proxy);
    assert_eq!(lines.len(), 5, "one line per connection end:\n{}", proxy.text());
    let mut ends = Vec::new();
    for j in &lines {
        for key in ["duration_ms", "client_to_upstream", "upstream_to_client"] {
            assert!(j[key].as_f64().is_some_and(|v| v >= 0.0), "{key} in {j:?}");
        }
        for key in ["client", "upstream", "request_id", "relay", "end"] {
            assert!(j[key].as_str().is_some(), "{key} in {j:?}");
        }
        assert_eq!(j["relay"].as_str(), Some("userspace"));
        assert_eq!(j["upstream"].as_str(), Some(up.addr.to_string().as_str()));
        let c2u = j["client_to_upstream"].as_f64().unwrap() as u64;
        let u2c = j["upstream_to_client"].as_f64().unwrap() as u64;
        ends.push((
            j["client"].as_str().unwrap().to_string(),
            j["end"].as_str().unwrap().to_string(),
            c2u,
            u2c,
        ));
    }
    ends.sort();
    let want = |i: u32, end: &str, c2u: u64, u2c: u64| (client_ip(i).to_string(), end.to_string(), c2u, u2c);
    assert_eq!(
        ends,
        vec![
            want(1, "closed", 100, 103),
            want(2, "closed", 200, 203),
            want(3, "closed", 300, 303),
            want(4, "client error", 50, 50),
            want(5, "idle timeout", 10, 10),
        ]
    );
    let idle = lines
        .iter()
        .find(|j| j["end"].as_str() == Some("idle timeout"))
        .unwrap();
    let ms = idle["duration_ms"].as_f64().unwrap();
    assert!((900.0..3000.0).contains(&ms), "idle connection lasted {ms} ms");
}

/// A connection the shutdown closes at the drain timeout ends too: it gets its line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn req7_connection_closed_by_the_shutdown_drain_is_logged() {
    let up = Recorder::start(None).await;
    let (mut proxy, ports) = start_in_front_of("json-drain.toml", up.addr, "drain_timeout = \"1s\"", "", true).await;
    let mut s = raw_upgrade(client_ip(1), ports.proxy()).await.unwrap();
    s.write_all(&[b'd'; 40]).await.unwrap();
    let mut back = [0u8; 40];
    within("the echo", s.read_exact(&mut back)).await.unwrap();
    assert!(proxy.terminate().await.success());
    read_to_close(&mut s).await;
    let lines = closed_lines(&proxy);
    assert_eq!(
        lines.len(),
        1,
        "no line for the connection closed at the drain timeout:\n{}",
        proxy.text()
    );
    assert_eq!(lines[0]["client_to_upstream"].as_f64(), Some(40.0));
}
