//! The admin listener against whoever can connect to it (issue 10, point 4), in process: idle
//! connections are closed after `admin.idle_timeout`; past `admin.max_connections` a connection
//! gets 503; a request with an `Origin` gets 403 and one whose `Host` is not the listener's
//! address 421, on every endpoint; with `admin.token_file`, `POST /reload` needs the bearer
//! token; the listener on a Unix socket (mode 0600, a stale file replaced, removed at stop).
//! Every refusal is counted in `wsproxy_admin_refused_total{reason}`.
//!
//! The binary's side (`wsproxy reload` with a token and over a Unix socket, the warning for an
//! address beyond loopback, idle admin connections under a low descriptor limit) is in
//! `proxy/tests/admin_cli.rs` and `proxy/tests/emfile.rs`.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsproxy::config::{Admin, AdminAddress, Token};
use wsproxy_tests::daemon_kit::{HttpResponse, ServerProxy, http, http_raw, http_unix};
use wsproxy_tests::*;

const REFUSED: &str = "wsproxy_admin_refused_total";

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wsproxy-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A proxy (echo upstream) with an admin listener and these `[admin]` keys besides the address.
async fn proxy_with(admin_keys: &str) -> ServerProxy {
    let echo = echo_upstream().await;
    let extra = format!("[admin]\naddress = \"127.0.0.1:9090\"\n{admin_keys}\n");
    ServerProxy::start(&config(&[echo], &[], &extra)).await
}

/// A request with these header lines (each ending in CRLF), closing the connection after it.
fn req(method: &str, path: &str, headers: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n")
}

fn host(addr: SocketAddr) -> String {
    format!("Host: {addr}\r\n")
}

async fn refused(proxy: &ServerProxy, reason: &str) -> f64 {
    proxy.scrape().await.value(REFUSED, &[("reason", reason)])
}

/// One request on a kept-alive connection: the status and body of its answer.
async fn keep_alive_request(s: &mut TcpStream, addr: SocketAddr, path: &str) -> (u16, String) {
    let r = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    s.write_all(r.as_bytes()).await.unwrap();
    let head = read_head(s).await;
    let len: usize = header(&head, "content-length")
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"))
        .parse()
        .unwrap();
    let mut body = vec![0u8; len];
    within("an answer's body", s.read_exact(&mut body)).await.unwrap();
    (status(&head), String::from_utf8_lossy(&body).into_owned())
}

/// Waits (deadline [`DEADLINE`]) until the peer closes `s`; returns what it sent first.
async fn closed(s: &mut TcpStream) -> String {
    read_to_close(s).await
}

// ---- idle connections ----

#[tokio::test]
async fn idle_admin_connections_are_closed_after_the_idle_timeout() {
    let idle = Duration::from_millis(300);
    let proxy = proxy_with("idle_timeout = \"300ms\"\n").await;
    let admin = proxy.admin.unwrap();

    // Nothing sent: closed, without an answer, once the timeout has passed.
    let start = Instant::now();
    let mut silent = TcpStream::connect(admin).await.unwrap();
    assert_eq!(closed(&mut silent).await, "");
    assert!(start.elapsed() >= idle, "closed after {:?}", start.elapsed());

    // Part of a head (a slow client): closed too; trickling bytes does not keep it open, only a
    // complete request does.
    let start = Instant::now();
    let mut partial = TcpStream::connect(admin).await.unwrap();
    partial
        .write_all(format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(closed(&mut partial).await, "");
    assert!(start.elapsed() >= idle, "closed after {:?}", start.elapsed());

    // Kept alive: requests closer together than the timeout are all answered, over more than
    // the timeout in all; after the last answer the connection is closed once it has been idle
    // for the timeout.
    let mut talking = TcpStream::connect(admin).await.unwrap();
    let start = Instant::now();
    for i in 0..8 {
        if i > 0 {
            // Pacing of the requests, well inside the timeout (not a wait for anything).
            tokio::time::sleep(idle / 3).await;
        }
        let (code, body) = keep_alive_request(&mut talking, admin, "/healthz").await;
        assert_eq!((code, body.as_str()), (200, "ok\n"));
    }
    assert!(start.elapsed() > idle);
    let answered = Instant::now();
    assert_eq!(closed(&mut talking).await, "");
    // Idle from its last answer on, not from its accept (which was longer ago than the timeout).
    assert!(
        answered.elapsed() >= idle / 2,
        "closed {:?} after the last answer",
        answered.elapsed()
    );

    assert_eq!(refused(&proxy, "idle_timeout").await, 3.0);
    proxy.stop().await;
}

// ---- the connection cap ----

#[tokio::test]
async fn connections_past_the_cap_get_503_and_are_counted() {
    let proxy = proxy_with("max_connections = 2\nidle_timeout = \"1m\"\n").await;
    let admin = proxy.admin.unwrap();
    // Two idle connections hold both slots (they are accepted in order, before the third).
    let mut first = TcpStream::connect(admin).await.unwrap();
    let _second = TcpStream::connect(admin).await.unwrap();
    let mut third = TcpStream::connect(admin).await.unwrap();
    let answer = HttpResponse::parse(&read_to_close(&mut third).await);
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.body, "too many admin connections\n");
    assert_eq!(answer.header("connection").as_deref(), Some("close"));
    // The held ones are still served.
    let (code, _) = keep_alive_request(&mut first, admin, "/healthz").await;
    assert_eq!(code, 200);
    drop(first);

    // A slot frees once the listener has seen the close: poll until a scrape gets through,
    // counting the 503s met meanwhile.
    let end = Instant::now() + DEADLINE;
    let mut more = 0.0;
    let scrape = loop {
        let r = http(admin, "GET", "/metrics").await;
        if r.status == 200 {
            break r;
        }
        assert_eq!(r.status, 503, "{r:?}");
        more += 1.0;
        assert!(Instant::now() < end, "no slot freed after a close");
        tokio::task::yield_now().await;
    };
    let e = wsproxy_tests::exposition::Exposition::parse(&scrape.body);
    assert_eq!(e.value(REFUSED, &[("reason", "over_capacity")]), 1.0 + more);
    proxy.stop().await;
}

// ---- Origin and Host ----

const ENDPOINTS: [(&str, &str); 4] = [
    ("GET", "/metrics"),
    ("GET", "/healthz"),
    ("POST", "/reload"),
    ("GET", "/nowhere"),
];

#[tokio::test]
async fn a_request_with_an_origin_gets_403_on_every_endpoint() {
    let proxy = proxy_with("").await;
    let admin = proxy.admin.unwrap();
    for (method, path) in ENDPOINTS {
        for origin in ["http://evil.example", "null", &format!("http://{admin}")] {
            let headers = format!("{}Origin: {origin}\r\n", host(admin));
            let r = http_raw(admin, &req(method, path, &headers)).await;
            assert_eq!(r.status, 403, "{method} {path} from {origin}: {r:?}");
        }
    }
    assert_eq!(refused(&proxy, "origin").await, 12.0);
    // Without one, the same requests are served.
    assert_eq!(http(admin, "GET", "/healthz").await.status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn a_foreign_host_gets_421_and_the_admin_address_is_served() {
    let proxy = proxy_with("").await;
    let admin = proxy.admin.unwrap();
    let port = admin.port();
    let foreign = [
        format!("Host: evil.example:{port}\r\n"),
        "Host: evil.example\r\n".to_string(),
        // Port-less forms of the right names are not the address either.
        "Host: 127.0.0.1\r\n".to_string(),
        "Host: localhost\r\n".to_string(),
        format!("Host: 127.0.0.1:{}\r\n", port.wrapping_add(1)),
        format!("Host: 127.0.0.2:{port}\r\n"),
        String::new(),
        format!("Host: 127.0.0.1:{port}\r\nHost: evil.example\r\n"),
    ];
    for (method, path) in ENDPOINTS {
        for h in &foreign {
            let r = http_raw(admin, &req(method, path, h)).await;
            assert_eq!(r.status, 421, "{method} {path} with {h:?}: {r:?}");
        }
    }
    assert_eq!(refused(&proxy, "host").await, (ENDPOINTS.len() * foreign.len()) as f64);
    // An absolute-form target names the host too.
    let r = http_raw(
        admin,
        &req("GET", &format!("http://evil.example:{port}/healthz"), &host(admin)),
    )
    .await;
    assert_eq!(r.status, 421, "{r:?}");
    for h in [
        format!("Host: 127.0.0.1:{port}\r\n"),
        format!("Host: localhost:{port}\r\n"),
        format!("Host: LocalHost:{port}\r\n"),
    ] {
        let r = http_raw(admin, &req("GET", "/healthz", &h)).await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"), "{h:?}");
    }
    proxy.stop().await;
}

// ---- the token ----

/// A token file and a configuration file naming it (with `address` as the admin address):
/// `(config path, token)`.
fn token_setup(name: &str, echo: SocketAddr, address: &str) -> (PathBuf, String) {
    let dir = temp_dir();
    let token = format!("t0ken-{name}-{}", std::process::id());
    let token_path = dir.join(format!("{name}.token"));
    std::fs::write(&token_path, format!("{token}\n")).unwrap();
    let extra = format!(
        "[admin]\naddress = \"{address}\"\ntoken_file = \"{}\"\n",
        token_path.display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config(&[echo], &[], &extra)).unwrap();
    (path, token)
}

#[tokio::test]
async fn with_a_token_file_reload_needs_the_bearer_token() {
    let echo = echo_upstream().await;
    let (path, token) = token_setup("bearer", echo, "127.0.0.1:9090");
    let proxy = ServerProxy::start_server(wsproxy::Server::from_file(path).unwrap()).await;
    let admin = proxy.admin.unwrap();
    let reload = |auth: String| {
        let r = req("POST", "/reload", &format!("{}{auth}", host(admin)));
        async move { http_raw(admin, &r).await }
    };
    for auth in [
        String::new(),
        "Authorization: Bearer wrong\r\n".to_string(),
        format!("Authorization: Bearer {token}x\r\n"),
        format!("Authorization: Basic {token}\r\n"),
        format!("Authorization: Bearer{token}\r\n"),
    ] {
        let r = reload(auth.clone()).await;
        assert_eq!(r.status, 401, "{auth:?}: {r:?}");
        assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"), "{r:?}");
    }
    assert_eq!(refused(&proxy, "unauthorized").await, 5.0);
    for auth in [
        format!("Authorization: Bearer {token}\r\n"),
        format!("Authorization: bearer {token}\r\n"),
    ] {
        let r = reload(auth.clone()).await;
        assert_eq!(r.status, 200, "{auth:?}: {r:?}");
        assert!(r.body.starts_with("reloaded"), "{r:?}");
    }
    // The token guards reloads only.
    assert_eq!(http(admin, "GET", "/metrics").await.status, 200);
    assert_eq!(http(admin, "GET", "/healthz").await.status, 200);

    // The client of `wsproxy reload` sends the token of its configuration.
    let mut client = Admin::new(AdminAddress::Tcp(admin));
    let ask = |c: Admin| tokio::task::spawn_blocking(move || wsproxy::admin::request_reload(&c));
    assert_eq!(ask(client.clone()).await.unwrap().unwrap().0, 401);
    client.token = Some(Token::new(token.clone()));
    let (code, body) = ask(client).await.unwrap().unwrap();
    assert_eq!(code, 200, "{body}");
    proxy.stop().await;
}

// ---- a Unix socket ----

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn admin_listener_on_a_unix_socket() {
    let echo = echo_upstream().await;
    let sock = temp_dir().join("admin.sock");
    let _ = std::fs::remove_file(&sock);
    // A file left by a proxy that did not stop cleanly: nothing listens on it any more.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let address = format!("unix:{}", sock.display());
    let (path, token) = token_setup("unix", echo, &address);
    let proxy = ServerProxy::start_server(wsproxy::Server::from_file(path).unwrap()).await;
    assert_eq!(proxy.admin_path.as_deref(), Some(sock.as_path()));
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(mode(&sock), 0o600, "socket file mode {:o}", mode(&sock));

    let local = "Host: localhost\r\n";
    let r = http_unix(&sock, &req("GET", "/metrics", local)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("# TYPE wsproxy_admin_refused counter"), "{}", r.body);
    assert_eq!(http_unix(&sock, &req("GET", "/healthz", local)).await.status, 200);
    // The same rules as on TCP.
    let r = http_unix(&sock, &req("GET", "/healthz", "Host: evil.example\r\n")).await;
    assert_eq!(r.status, 421, "{r:?}");
    let r = http_unix(
        &sock,
        &req("GET", "/healthz", "Host: localhost\r\nOrigin: http://evil.example\r\n"),
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(http_unix(&sock, &req("POST", "/reload", local)).await.status, 401);

    // `wsproxy reload`'s client over the socket, with the token.
    let mut client = Admin::new(AdminAddress::Unix(sock.clone()));
    client.token = Some(Token::new(token));
    let (code, body) = tokio::task::spawn_blocking(move || wsproxy::admin::request_reload(&client))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, 200, "{body}");

    // A second listener on the same path while this one lives is refused, not stolen.
    let e = wsproxy::admin::bind(&AdminAddress::Unix(sock.clone())).err().unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    proxy.stop().await;
    assert!(!sock.exists(), "the socket file outlived the listener");

    // A path that holds something else than a socket is left alone.
    std::fs::write(&sock, "not a socket").unwrap();
    let e = wsproxy::admin::bind(&AdminAddress::Unix(sock.clone())).err().unwrap();
    assert!(e.to_string().contains("is not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "not a socket");
    std::fs::remove_file(&sock).unwrap();
}

// ---- reload ----

#[tokio::test]
async fn a_reload_keeps_the_admin_address_and_cap_and_applies_token_and_idle_timeout() {
    let proxy = proxy_with("max_connections = 4\n").await;
    let mut c = proxy.config(&config(
        &[echo_upstream().await],
        &[],
        "[admin]\naddress = \"127.0.0.1:1\"\n",
    ));
    let mut admin = proxy.server.config().admin.unwrap();
    admin.max_connections = 5;
    admin.idle_timeout = Duration::from_secs(3);
    admin.address = AdminAddress::Tcp("127.0.0.1:1".parse().unwrap());
    c.admin = Some(admin);
    let notes = proxy.server.apply(c).unwrap();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes[0].starts_with("admin.address: stays 127.0.0.1:"), "{notes:?}");
    assert_eq!(notes[1], "admin.max_connections: stays 4 until a restart");
    let now = proxy.server.config().admin.unwrap();
    assert_eq!(now.address, AdminAddress::Tcp(proxy.admin.unwrap()));
    assert_eq!((now.max_connections, now.idle_timeout), (4, Duration::from_secs(3)));
    proxy.stop().await;
}
