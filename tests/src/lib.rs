//! Helpers for the integration tests of wsproxy: the real proxy (`wsproxy::run`) on a loopback
//! port, scripted upstreams that record what they saw, and clients bound to chosen loopback
//! source addresses (127.0.0.0/8 gives each test as many client IPs as it needs).
//!
//! Nothing here sleeps to wait for something: readiness is a bound listener, and every wait has a
//! deadline ([`within`]).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub use wsproxy;

/// Default deadline for anything a test waits on.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A request key and the accept value RFC 6455 derives from it.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Awaits `f`, failing the test if it takes longer than [`DEADLINE`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// An in-process proxy: a `wsproxy::Server` serving a listener on 127.0.0.1 (port chosen by the
/// kernel) in a task of its own, stopped gracefully on demand and aborted when dropped. The one
/// way the harness runs a proxy: [`relay_kit::RelayProxy`] and [`daemon_kit::ServerProxy`] are
/// one of these plus what their tests inspect (they dereference to it); the hardening tests use
/// it as it is ([`Proxy::try_start`]).
pub struct Proxy {
    /// The running server, for `totals()`, `metrics_text()`, `apply()`, ...
    pub server: wsproxy::Server,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy with `config_toml`; its `[listen] address` is overridden with port 0.
    pub async fn start(config_toml: &str) -> Proxy {
        Self::start_on("127.0.0.1:0".parse().unwrap(), config_toml).await
    }

    /// Starts a proxy with `config_toml` listening on `listen`.
    pub async fn start_on(listen: SocketAddr, config_toml: &str) -> Proxy {
        let mut config = wsproxy::Config::parse(config_toml, "test config").unwrap_or_else(|e| panic!("{e}"));
        // A test that stops its proxy with connections still open should not wait the default
        // 30 s drain; tests of the drain set their own, shorter one.
        config.drain_timeout = config.drain_timeout.min(Duration::from_secs(2));
        let listener = wsproxy::listener::bind(listen).unwrap();
        listen_on(&mut config, listener.local_addr().unwrap());
        Self::serve(
            wsproxy::Server::new(config).unwrap_or_else(|e| panic!("{e:#}")),
            listener,
        )
    }

    /// Starts a proxy with `config_toml` as it is (drain timeout included), without its admin
    /// listener; `Err` when the server cannot be built (e.g. `relay.mode = "kernel"` where the
    /// kernel relay cannot load).
    pub fn try_start(config_toml: &str) -> anyhow::Result<Proxy> {
        let mut config = wsproxy::Config::parse(config_toml, "test config").map_err(|e| anyhow::anyhow!("{e}"))?;
        let listener = wsproxy::listener::bind("127.0.0.1:0".parse().unwrap())?;
        listen_on(&mut config, listener.local_addr()?);
        config.admin = None;
        Ok(Self::serve(wsproxy::Server::new(config)?, listener))
    }

    /// Serves `server` on `listener` until [`Proxy::begin_stop`].
    pub fn serve(server: wsproxy::Server, listener: TcpListener) -> Proxy {
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let s = server.clone();
        let task = tokio::spawn(async move {
            s.serve(listener, async move {
                let _ = stopped.await;
            })
            .await
        });
        Proxy {
            server,
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Starts a proxy with `config_toml`, whose `[[service]]` blocks name their listeners (such
    /// as "127.0.0.2:0": the server binds each, the kernel chooses the port); returns once every
    /// listener is bound. [`Proxy::bound`] tells where each went; `addr` is the first one's.
    pub async fn start_services(config_toml: &str) -> Proxy {
        let mut config = wsproxy::Config::parse(config_toml, "test config").unwrap_or_else(|e| panic!("{e}"));
        config.drain_timeout = config.drain_timeout.min(Duration::from_secs(2));
        let server = wsproxy::Server::new(config).unwrap_or_else(|e| panic!("{e:#}"));
        let (stop, stopped) = oneshot::channel::<()>();
        let s = server.clone();
        let task = tokio::spawn(async move {
            s.serve_all(Default::default(), async move {
                let _ = stopped.await;
            })
            .await
        });
        let wanted = server.config().listeners();
        let first = wanted[0];
        let mut proxy = Proxy {
            server,
            addr: first,
            stop: Some(stop),
            task: Some(task),
        };
        proxy.addr = proxy.bound(&first.to_string()).await;
        for a in wanted {
            proxy.bound(&a.to_string()).await;
        }
        proxy
    }

    /// Where the listener configured as `configured` (such as "127.0.0.2:0") is bound, waiting
    /// (within [`DEADLINE`]) until it is.
    pub async fn bound(&self, configured: &str) -> SocketAddr {
        let configured: SocketAddr = configured.parse().unwrap();
        let found = relay_kit::poll_until(DEADLINE, || {
            self.server
                .listening()
                .into_iter()
                .find(|(c, _)| *c == configured)
                .map(|(_, local)| local)
        })
        .await;
        found.unwrap_or_else(|| panic!("no listener for {configured} within {DEADLINE:?}"))
    }

    /// Starts the graceful stop: no more accepts; open connections get the drain timeout.
    pub fn begin_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Waits (within `limit`) until `serve` has returned: drain done and connections closed.
    pub async fn wait_stopped(&mut self, limit: Duration) {
        let task = self.task.take().expect("already waited for");
        match tokio::time::timeout(limit, task).await {
            Ok(r) => r.unwrap(),
            Err(_) => panic!("the proxy did not stop within {limit:?}"),
        }
    }

    /// Whether [`Proxy::wait_stopped`] is still to be done.
    pub fn running(&self) -> bool {
        self.task.is_some()
    }

    /// Stops the proxy and waits (within [`DEADLINE`]) until `serve` has returned.
    pub async fn stop(self) {
        self.stop_within(DEADLINE).await;
    }

    /// Stops accepting, closes what is still open (after the drain timeout) and waits until
    /// `serve` returned, for at most `limit`.
    pub async fn stop_within(mut self, limit: Duration) {
        self.begin_stop();
        self.wait_stopped(limit).await;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Points every service of `config` at the one listener `addr` (a test's listener on a
/// kernel-chosen port), so that serving and applying it binds nothing else.
pub fn listen_on(config: &mut wsproxy::Config, addr: SocketAddr) {
    for s in &mut config.services {
        s.listen = vec![addr];
    }
}

/// `config` as [`wsproxy::Server::apply`] should get it on `server`: on the listener the server
/// serves now (the one of a single-listener test proxy).
pub fn on_running_listener(server: &wsproxy::Server, mut config: wsproxy::Config) -> wsproxy::Config {
    if let [addr] = server.config().listeners()[..] {
        listen_on(&mut config, addr);
    }
    config
}

/// Config text with the given upstreams and extra sections. `main` and `backup` are addresses.
pub fn config(main: &[SocketAddr], backup: &[SocketAddr], extra: &str) -> String {
    let list = |a: &[SocketAddr]| {
        a.iter()
            .map(|a| format!("{{ address = \"{a}\" }}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{extra}\n[upstreams]\nmain = [{}]\nbackup = [{}]\ntimeout = \"2s\"\n",
        list(main),
        list(backup)
    )
}

/// The inside of a TOML array of weighted upstreams, `{ address = "A", weight = W }, ...`, for
/// `main = [...]` and `backup = [...]`.
pub fn weighted(upstreams: &[(SocketAddr, u32)]) -> String {
    upstreams
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An address where nothing listens: a listener's address after the listener is gone.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A WebSocket echo upstream (the proxy's own `echo-server`).
pub async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(wsproxy::echo::serve(listener, std::future::pending()));
    addr
}

/// Reads a request head from `s` and answers it with a valid 101 for its key; false when the
/// peer closed (or failed) first.
pub async fn accept_upgrade(s: &mut (impl AsyncRead + AsyncWrite + Unpin)) -> bool {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while find(&head, b"\r\n\r\n").is_none() {
        if s.read(&mut b).await.unwrap_or(0) == 0 {
            return false;
        }
        head.push(b[0]);
    }
    let key = header(&String::from_utf8_lossy(&head), "sec-websocket-key").unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        wsproxy::upstream::accept_key(&key)
    );
    s.write_all(answer.as_bytes()).await.is_ok() && s.flush().await.is_ok()
}

/// An upstream that upgrades every request, then echoes raw bytes without keeping them (for
/// many long connections; [`Upstream`] keeps what it saw).
pub async fn raw_echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if accept_upgrade(&mut s).await {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// How a scripted upstream answers the request head it reads.
#[derive(Clone)]
pub enum Script {
    /// A valid 101 for the request's key, then these bytes, then echo everything back raw.
    Upgrade { after: Vec<u8> },
    /// This exact response (`{accept}` is replaced by the right accept value), then echo raw.
    Respond(String),
    /// Read the request and never answer.
    Silent,
    /// Close without answering.
    Close,
    /// Write these bytes (`{accept}` replaced), then reset the connection (`SO_LINGER` 0, close);
    /// empty: reset right after reading the request.
    ResetAfter(String),
}

/// What a scripted upstream saw of one connection.
#[derive(Debug)]
pub struct Seen {
    /// The request head, as received.
    pub head: String,
    /// Everything received after the head until the proxy closed the connection.
    pub rest: Vec<u8>,
}

/// An upstream that follows a [`Script`] and reports what it saw.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: mpsc::UnboundedReceiver<Seen>,
    accepted: Arc<AtomicUsize>,
}

impl Upstream {
    pub async fn start(script: Script) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_script(stream, script.clone(), tx.clone()));
            }
        });
        Upstream { addr, seen, accepted }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The next connection's record (complete once the proxy closed it).
    pub async fn next_seen(&mut self) -> Seen {
        within("the upstream to see a connection", self.seen.recv())
            .await
            .expect("upstream task ended")
    }
}

async fn serve_script(mut s: TcpStream, script: Script, tx: mpsc::UnboundedSender<Seen>) {
    let mut buf = Vec::new();
    let head_len = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let mut rest = buf[head_len..].to_vec();
    let key = header(&head, "sec-websocket-key").unwrap_or_default();
    let accept = wsproxy::upstream::accept_key(&key);
    match script {
        Script::Upgrade { after } => {
            let r = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            let _ = s.write_all(r.as_bytes()).await;
            let _ = s.write_all(&after).await;
            let _ = s.write_all(&rest).await;
            echo_raw(&mut s, &mut rest).await;
        }
        Script::Respond(text) => {
            let _ = s.write_all(text.replace("{accept}", &accept).as_bytes()).await;
            let _ = s.write_all(&rest).await;
            echo_raw(&mut s, &mut rest).await;
        }
        Script::Silent => {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = s.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                rest.extend_from_slice(&chunk[..n]);
            }
        }
        Script::Close => {}
        Script::ResetAfter(text) => {
            let _ = s.write_all(text.replace("{accept}", &accept).as_bytes()).await;
            relay_kit::reset(s);
            let _ = tx.send(Seen { head, rest });
            return;
        }
    }
    let _ = tx.send(Seen { head, rest });
}

/// Echoes raw bytes until EOF, keeping a copy; then shuts down its side.
async fn echo_raw(s: &mut TcpStream, seen: &mut Vec<u8>) {
    let mut chunk = vec![0u8; 65536];
    loop {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                seen.extend_from_slice(&chunk[..n]);
                if s.write_all(&chunk[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = s.shutdown().await;
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// First value of a header field in a head (case-insensitive name).
pub fn header(head: &str, name: &str) -> Option<String> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
}

/// Connects to `to` from the loopback address `from` (any address of 127.0.0.0/8, or ::1).
pub async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = if from.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    within("connect", socket.connect(to)).await.unwrap()
}

/// A valid handshake request for `path`.
pub fn request(path: &str) -> String {
    request_for("test", path, "")
}

/// A valid handshake request for `path` with this `Host` and `extra` header lines.
pub fn request_for(host: &str, path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Sends the handshake for `host` (with `extra` header lines) on `s` and reads the answer head,
/// within [`DEADLINE`]: its status (0 when the proxy closed first); nothing past the head is read.
pub async fn upgrade_status(s: &mut (impl AsyncRead + AsyncWrite + Unpin), host: &str, extra: &str) -> u16 {
    if s.write_all(request_for(host, "/ws", extra).as_bytes()).await.is_err() {
        return 0;
    }
    let mut head = Vec::new();
    within("an answer head", async {
        let mut b = [0u8; 1];
        while find(&head, b"\r\n\r\n").is_none() {
            match s.read(&mut b).await {
                Ok(1) => head.push(b[0]),
                _ => break,
            }
        }
    })
    .await;
    status(&String::from_utf8_lossy(&head))
}

/// Sends `bytes` and reads until the proxy closes; returns everything received (lossy text).
pub async fn exchange(from: IpAddr, to: SocketAddr, bytes: &[u8]) -> String {
    let mut s = connect_from(from, to).await;
    s.write_all(bytes).await.unwrap();
    read_to_close(&mut s).await
}

/// Reads until EOF or reset; a reset after a response still counts as the end.
pub async fn read_to_close(s: &mut (impl AsyncRead + Unpin)) -> String {
    let mut out = Vec::new();
    within("the proxy to close", async {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = s.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads a response head (up to the blank line) and returns it; the rest stays unread.
pub async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    within("a response head", async {
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await.unwrap() == 0 {
                break;
            }
            head.push(b[0]);
        }
    })
    .await;
    String::from_utf8_lossy(&head).into_owned()
}

/// Sends the handshake for `path` on `s` and reads the answer head; `Err` (no panic: the soak
/// and the bulk runs count failures) unless it is a 101 with nothing behind it. The head is read
/// in buffered chunks: nothing may follow a 101 before the client sends (an echo upstream).
pub async fn try_upgrade(s: &mut TcpStream, path: &str) -> Result<(), String> {
    s.write_all(request(path).as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while find(&buf, b"\r\n\r\n").is_none() {
        match s.read(&mut chunk).await {
            Ok(0) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&buf))),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("handshake read: {e}")),
        }
        if buf.len() > 16 * 1024 {
            return Err("answer head too long".into());
        }
    }
    let end = find(&buf, b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&buf[..end]);
    if status(&head) != 101 || end != buf.len() {
        return Err(format!("answer {head:?} + {:?}", String::from_utf8_lossy(&buf[end..])));
    }
    Ok(())
}

/// The status code of a response.
pub fn status(response: &str) -> u16 {
    response.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// A WebSocket client (tokio-tungstenite) through the proxy from the source address `from`.
pub async fn ws_connect(
    from: IpAddr,
    to: SocketAddr,
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, tokio_tungstenite::tungstenite::Error> {
    let stream = connect_from(from, to).await;
    let url = format!("ws://{to}/ws");
    within("a WebSocket handshake", tokio_tungstenite::client_async(url, stream))
        .await
        .map(|(ws, _)| ws)
}

/// Loopback address 127.x.y.z for client number `n` (never 127.0.0.1, which tests keep for
/// "another client").
pub fn client_ip(n: u32) -> IpAddr {
    IpAddr::from(std::net::Ipv4Addr::from(0x7f10_0000u32 + n))
}

pub mod fleet;
pub mod ports;
pub mod redis_kit;
pub mod relay_kit;
pub mod tls_kit;

// ---- daemon tests block (tests/tests/daemon.rs): wsproxy::Server with its admin listener, ----
// ---- the Prometheus exposition, a switchable upstream and the proxy's socket options.    ----
pub mod daemon_kit;
pub mod exposition;
// ---- end of the daemon tests block ----

// ---- hardening block (tests/tests/hostile_input.rs, tests/tests/floods.rs, src/bin/soak.rs): ----
// ---- process memory and descriptors, a proxy on wsproxy::Server, a raw echo upstream.      ----
pub mod hardening_kit;
// ---- end of the hardening block ----
pub mod bulk_kit;

// Interop tests with independent clients (tests/tests/interop_*.rs).
pub mod interop_kit;
