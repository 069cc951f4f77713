//! Helpers of the daemon tests (`tests/daemon.rs`): a proxy on `wsproxy::Server` with its admin
//! listener, whose proxy listener can be stopped apart from the admin one ([`ServerProxy`]); a
//! tiny HTTP client for the admin endpoints; an upstream that can be switched between answering, refusing and dead
//! ([`Flaky`]); and the proxy's own sockets, found through `/proc/self/fd`, with their keepalive
//! options ([`sockets_where`], [`keepalive_opts`]).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use wsproxy::config::AdminAddress;

use crate::exposition::Exposition;
use crate::{DEADLINE, Proxy, Script, Seen, connect_from, read_head, read_to_close, request, serve_script, within};

// ---- the proxy ----

/// A `wsproxy::Server` serving a listener on 127.0.0.1 (port chosen by the kernel) and, when its
/// configuration has an `[admin]` address, an admin listener: a TCP one on 127.0.0.1 (port chosen
/// by the kernel too; the configuration is given the real address), or the Unix socket it names.
pub struct ServerProxy {
    /// The proxy listener (the struct dereferences to it: `server`, `addr`, `begin_stop`, ...).
    proxy: Proxy,
    /// The TCP admin listener.
    pub admin: Option<SocketAddr>,
    /// The Unix socket admin listener.
    pub admin_path: Option<PathBuf>,
    admin_stop: Option<oneshot::Sender<()>>,
    admin_task: Option<JoinHandle<()>>,
}

impl std::ops::Deref for ServerProxy {
    type Target = Proxy;

    fn deref(&self) -> &Proxy {
        &self.proxy
    }
}

impl std::ops::DerefMut for ServerProxy {
    fn deref_mut(&mut self) -> &mut Proxy {
        &mut self.proxy
    }
}

impl ServerProxy {
    /// Parses `config_toml` and serves it (see [`ServerProxy::start_config`]).
    pub async fn start(config_toml: &str) -> ServerProxy {
        let config = wsproxy::Config::parse(config_toml, "test config").unwrap_or_else(|e| panic!("{e}"));
        Self::start_config(config).await
    }

    /// A proxy whose relay mode is `mode` ("kernel", "userspace", "auto") in front of `upstream`,
    /// with generous rate limits and `limits` (more `[limits]` lines); `None` (after saying why,
    /// or failing under CI=true) when the mode needs the kernel relay and it cannot load.
    pub async fn in_mode(mode: &str, upstream: SocketAddr, limits: &str) -> Option<ServerProxy> {
        let text = format!(
            "[limits]\nrequests_per_second = 1000.0\nburst = 1000\n{limits}\n[relay]\nmode = \"{mode}\"\n\
             [upstreams]\nmain = [{{ address = \"{upstream}\" }}]\ntimeout = \"5s\"\n"
        );
        let config = wsproxy::Config::parse(&text, "test config").unwrap_or_else(|e| panic!("{e}"));
        let server = crate::relay_kit::server_in_mode(config, mode, mode == "kernel")?;
        Some(Self::start_server(server).await)
    }

    /// Serves `config`; a TCP admin address in it is replaced by 127.0.0.1 with a kernel-chosen
    /// port.
    pub async fn start_config(mut config: wsproxy::Config) -> ServerProxy {
        let admin = config.admin.as_ref().map(|a| bind_admin(&a.address));
        if let (Some(c), Some(l)) = (config.admin.as_mut(), &admin) {
            c.address = l.address().unwrap();
        }
        let listener = wsproxy::listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        crate::listen_on(&mut config, listener.local_addr().unwrap());
        let server = wsproxy::Server::new(config).unwrap();
        Self::serve(server, listener, admin)
    }

    /// Serves a server made elsewhere (e.g. `Server::from_file`) on fresh loopback listeners; an
    /// admin listener only when its configuration has an admin address (a TCP one on a fresh
    /// loopback port).
    pub async fn start_server(server: wsproxy::Server) -> ServerProxy {
        let admin = server.config().admin.map(|a| bind_admin(&a.address));
        let listener = wsproxy::listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        Self::serve(server, listener, admin)
    }

    fn serve(server: wsproxy::Server, listener: TcpListener, admin: Option<wsproxy::admin::Listener>) -> ServerProxy {
        let (mut admin_addr, mut admin_path, mut admin_stop, mut admin_task) = (None, None, None, None);
        if let Some(l) = admin {
            match l.address().unwrap() {
                AdminAddress::Tcp(a) => admin_addr = Some(a),
                AdminAddress::Unix(p) => admin_path = Some(p),
            }
            let (tx, rx) = oneshot::channel::<()>();
            let s = server.clone();
            admin_task = Some(tokio::spawn(async move {
                s.serve_admin(l, async move {
                    let _ = rx.await;
                })
                .await
            }));
            admin_stop = Some(tx);
        }
        ServerProxy {
            proxy: Proxy::serve(server, listener),
            admin: admin_addr,
            admin_path,
            admin_stop,
            admin_task,
        }
    }

    /// A configuration for [`wsproxy::Server::apply`]: `config_toml` with this proxy's listen and
    /// admin addresses, so that applying it changes nothing a restart would be needed for.
    pub fn config(&self, config_toml: &str) -> wsproxy::Config {
        let c = wsproxy::Config::parse(config_toml, "test config").unwrap_or_else(|e| panic!("{e}"));
        let mut c = crate::on_running_listener(&self.server, c);
        c.admin = self.server.config().admin;
        c
    }

    /// Applies `config_toml` and checks no setting was held back for a restart.
    pub fn apply(&self, config_toml: &str) {
        let notes = self
            .server
            .apply(self.config(config_toml))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(notes.is_empty(), "apply held settings back: {notes:?}");
    }

    /// Stops both listeners and waits for them (the proxy listener's graceful stop, begun with
    /// `begin_stop` and waited for with `wait_stopped`, leaves the admin listener serving).
    pub async fn stop(mut self) {
        self.proxy.begin_stop();
        if self.proxy.running() {
            self.proxy.wait_stopped(DEADLINE).await;
        }
        if let Some(s) = self.admin_stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.admin_task.take() {
            within("the admin listener to stop", t).await.unwrap();
        }
    }

    /// `GET /metrics` on the admin listener, checked for status, type and end marker.
    pub async fn scrape(&self) -> Exposition {
        let admin = self.admin.expect("this proxy has no admin listener");
        let r = http(admin, "GET", "/metrics").await;
        assert_eq!(r.status, 200, "{r:?}");
        let ct = r.header("content-type").unwrap_or_default();
        assert!(
            ct.starts_with("application/openmetrics-text") || ct.starts_with("text/plain"),
            "{ct}"
        );
        assert!(r.body.ends_with("# EOF\n"), "no OpenMetrics end marker:\n{}", r.body);
        Exposition::parse(&r.body)
    }

    /// Scrapes until `f` holds for the exposition (deadline [`DEADLINE`]); returns that scrape.
    pub async fn scrape_until(&self, what: &str, f: impl Fn(&Exposition) -> bool) -> Exposition {
        // State only visible by scraping: polled, within the deadline.
        let every = Duration::from_millis(20);
        let found = crate::relay_kit::poll_every_async(DEADLINE, every, || async {
            let e = self.scrape().await;
            f(&e).then_some(e)
        })
        .await;
        match found {
            Some(e) => e,
            None => panic!(
                "timed out waiting for {what}; last scrape:\n{}",
                self.scrape().await.text
            ),
        }
    }
}

/// A TCP admin address becomes 127.0.0.1 with a kernel-chosen port; a Unix one is bound as it is.
fn bind_admin(address: &AdminAddress) -> wsproxy::admin::Listener {
    match address {
        AdminAddress::Tcp(_) => wsproxy::admin::bind(&AdminAddress::Tcp("127.0.0.1:0".parse().unwrap())),
        a => wsproxy::admin::bind(a),
    }
    .unwrap_or_else(|e| panic!("admin listener on {address}: {e}"))
}

impl Drop for ServerProxy {
    fn drop(&mut self) {
        if let Some(t) = &self.admin_task {
            t.abort();
        }
    }
}

// ---- HTTP ----

/// An HTTP response as text.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        crate::header(&self.head, name)
    }
}

/// One request (`Connection: close`, empty body) and its whole response.
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> HttpResponse {
    try_http(addr, method, path)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"))
}

/// Like [`http`], with a connect error returned instead of failing the test.
pub async fn try_http(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<HttpResponse> {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    try_http_raw(addr, &req).await
}

/// Sends `request` as it is on a new connection and reads the whole response (to the close).
pub async fn http_raw(addr: SocketAddr, request: &str) -> HttpResponse {
    try_http_raw(addr, request)
        .await
        .unwrap_or_else(|e| panic!("{request:?} to {addr}: {e}"))
}

async fn try_http_raw(addr: SocketAddr, request: &str) -> std::io::Result<HttpResponse> {
    let mut s = within("an admin connect", TcpStream::connect(addr)).await?;
    s.write_all(request.as_bytes()).await?;
    Ok(HttpResponse::parse(&read_to_close(&mut s).await))
}

/// Like [`http_raw`], on a Unix socket.
pub async fn http_unix(path: &std::path::Path, request: &str) -> HttpResponse {
    let mut s = within("an admin connect", tokio::net::UnixStream::connect(path))
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
    s.write_all(request.as_bytes()).await.unwrap();
    HttpResponse::parse(&read_to_close(&mut s).await)
}

impl HttpResponse {
    /// A whole response as text: head, blank line, body.
    pub fn parse(text: &str) -> HttpResponse {
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
        HttpResponse {
            status: crate::status(head),
            head: head.to_string(),
            body: body.to_string(),
        }
    }
}

// ---- an upstream that fails on demand ----

/// An upstream that answers a valid 101 followed by its `id` and then echoes raw, or (switched
/// off with [`Flaky::answering`]) accepts and closes without answering, or is dead ([`Flaky::kill`]:
/// nothing listens on its port, connects are refused) until [`Flaky::revive`] listens again on
/// the same port.
pub struct Flaky {
    pub addr: SocketAddr,
    pub id: &'static str,
    answer: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    tx: mpsc::UnboundedSender<Seen>,
    pub seen: mpsc::UnboundedReceiver<Seen>,
    task: Option<JoinHandle<()>>,
}

impl Flaky {
    pub async fn start(id: &'static str) -> Flaky {
        let listener = wsproxy::listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        let mut f = Flaky {
            addr: listener.local_addr().unwrap(),
            id,
            answer: Arc::new(AtomicBool::new(true)),
            accepted: Arc::new(AtomicUsize::new(0)),
            tx,
            seen,
            task: None,
        };
        f.task = Some(f.spawn(listener));
        f
    }

    fn spawn(&self, listener: TcpListener) -> JoinHandle<()> {
        let (answer, accepted, tx, id) = (
            Arc::clone(&self.answer),
            Arc::clone(&self.accepted),
            self.tx.clone(),
            self.id,
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let script = if answer.load(Ordering::SeqCst) {
                    Script::Upgrade {
                        after: id.as_bytes().to_vec(),
                    }
                } else {
                    Script::Close
                };
                tokio::spawn(serve_script(stream, script, tx.clone()));
            }
        })
    }

    /// true: answer 101 (the default); false: accept and close without answering.
    pub fn answering(&self, yes: bool) {
        self.answer.store(yes, Ordering::SeqCst);
    }

    /// Connections accepted so far (over every life of the port).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes the listener: connects to the port are refused from when this returns.
    pub async fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            // A cancelled task's future (and so the listener) is dropped before its handle completes.
            let _ = t.await;
        }
    }

    /// Listens on the same port again.
    pub async fn revive(&mut self) {
        assert!(self.task.is_none(), "not dead");
        let listener = wsproxy::listener::bind(self.addr).unwrap();
        self.task = Some(self.spawn(listener));
    }
}

impl Drop for Flaky {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Opens a WebSocket handshake through the proxy from `from` and returns the stream after the
/// 101 and the first `id_len` bytes behind it (a [`Flaky`] upstream's id), or the refusal head.
pub async fn upgrade_and_id(from: IpAddr, proxy: SocketAddr, id_len: usize) -> Result<(TcpStream, String), String> {
    let mut s = connect_from(from, proxy).await;
    s.write_all(request("/").as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    if crate::status(&head) != 101 {
        return Err(head);
    }
    let mut id = vec![0u8; id_len];
    within("the upstream id", s.read_exact(&mut id)).await.unwrap();
    Ok((s, String::from_utf8_lossy(&id).into_owned()))
}

// ---- the proxy's sockets ----

fn sockaddr(fd: RawFd, peer: bool) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain old data; zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&raw mut ss).cast::<libc::sockaddr>();
    // SAFETY: an out-buffer of the length passed; a bad fd only makes the call fail.
    let rc = unsafe {
        if peer {
            libc::getpeername(fd, p, &raw mut len)
        } else {
            libc::getsockname(fd, p, &raw mut len)
        }
    };
    if rc != 0 {
        return None;
    }
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in.
            let sin = unsafe { *(&raw const ss).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((
                u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6.
            let sin6 = unsafe { *(&raw const ss).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::from((sin6.sin6_addr.s6_addr, u16::from_be(sin6.sin6_port))))
        }
        _ => None,
    }
}

/// Connected TCP sockets of this process whose (local, peer) addresses satisfy `pred`. In-process
/// proxies' sockets are this process's, so their options can be read with getsockopt.
pub fn sockets_where(pred: impl Fn(SocketAddr, SocketAddr) -> bool) -> Vec<RawFd> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:")))
        .filter_map(|e| e.file_name().to_str()?.parse::<RawFd>().ok())
        .filter(|&fd| matches!((sockaddr(fd, false), sockaddr(fd, true)), (Some(l), Some(p)) if pred(l, p)))
        .collect()
}

/// Keepalive and Nagle options of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveOpts {
    pub keepalive: bool,
    pub idle_s: i32,
    pub interval_s: i32,
    pub count: i32,
    pub nodelay: bool,
}

fn int_opt(fd: RawFd, level: i32, name: i32) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an out-buffer of the length passed.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut v).cast(), &raw mut len) };
    assert_eq!(
        rc,
        0,
        "getsockopt({level}, {name}): {}",
        std::io::Error::last_os_error()
    );
    v
}

pub fn keepalive_opts(fd: RawFd) -> KeepaliveOpts {
    KeepaliveOpts {
        keepalive: int_opt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE) != 0,
        idle_s: int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
        interval_s: int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
        count: int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
        nodelay: int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY) != 0,
    }
}
