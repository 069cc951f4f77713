//! The admin listener: `GET /metrics` (Prometheus), `GET /healthz` (200 while accepting, 503
//! while draining), `POST /reload` (re-read the configuration file; 200 with notes, or 400 with
//! every problem of the new file). On TCP (meant for loopback or a management address) or on a
//! Unix socket (`unix:PATH`, mode 0600).
//!
//! Whoever can connect must not be able to starve the proxy or reconfigure it from a web page:
//! - at most `admin.max_connections` connections at once; past it a connection gets `503` and
//!   is closed at once, without a task of its own;
//! - a connection without a complete request for `admin.idle_timeout` (from its accept, or
//!   from the previous answer) is closed;
//! - a request with an `Origin` field (a browser's cross-site request) gets `403`;
//! - a request whose `Host` is not the listener's address (DNS rebinding) gets `421`: accepted
//!   are the address the connection came to, the configured one, `localhost:PORT` on loopback
//!   (always with the port); on a Unix socket, `localhost`;
//! - with `admin.token_file`, `POST /reload` needs `Authorization: Bearer <token>` (`401`).
//!
//! Each refusal is counted in `wsproxy_admin_refused_total{reason}`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, HOST, HeaderValue, ORIGIN, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::Server;
use crate::config::{Admin, AdminAddress, Token};
use crate::log_limit::Throttle;
use crate::metrics::AdminRefusal;

/// Pending connections the kernel may queue for the admin listener.
const BACKLOG: i32 = 1024;
/// At stop, time open admin connections get to finish the request they are answering.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// The whole answer to a connection over `admin.max_connections`.
static OVER_CAPACITY: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    crate::plain_http::closing_answer(
        503,
        "Retry-After: 1\r\n",
        "text/plain; charset=utf-8",
        "too many admin connections\n",
    )
});

/// Refusals are caused by whoever connects: bounded, so that nobody can fill the log.
static REFUSAL_LINES: Throttle = Throttle::new(20);

// ---- binding ----

/// A bound admin listener before the runtime exists (the daemon binds before it drops its
/// privileges and before the runtime starts its threads).
pub enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, SocketFile),
}

/// A bound admin listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, SocketFile),
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Listener {
        Listener::Tcp(l)
    }
}

/// Binds `address` (TCP with SO_REUSEADDR, or a Unix socket: see [`SocketFile`]).
pub fn bind_std(address: &AdminAddress) -> io::Result<StdListener> {
    match address {
        AdminAddress::Tcp(a) => crate::listener::bind_std(*a).map(StdListener::Tcp),
        AdminAddress::Unix(path) => bind_unix(path).map(|(l, f)| StdListener::Unix(l, f)),
    }
}

/// The admin listener a predecessor process handed over (`fd`), bound to `address`.
pub fn adopt_std(fd: std::os::fd::OwnedFd, address: &AdminAddress) -> io::Result<StdListener> {
    Ok(match address {
        AdminAddress::Tcp(_) => StdListener::Tcp(std::net::TcpListener::from(fd)),
        AdminAddress::Unix(path) => {
            let meta = std::fs::symlink_metadata(path)?;
            let file = SocketFile {
                path: path.clone(),
                dev: meta.dev(),
                ino: meta.ino(),
            };
            StdListener::Unix(std::os::unix::net::UnixListener::from(fd), file)
        }
    })
}

impl StdListener {
    /// A copy of the listening socket (for a successor process).
    pub fn try_clone_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        match self {
            StdListener::Tcp(l) => l.as_fd().try_clone_to_owned(),
            StdListener::Unix(l, _) => l.as_fd().try_clone_to_owned(),
        }
    }
}

/// Like [`bind_std`], in a runtime.
pub fn bind(address: &AdminAddress) -> io::Result<Listener> {
    Listener::from_std(bind_std(address)?)
}

impl Listener {
    /// Needs a tokio runtime.
    pub fn from_std(l: StdListener) -> io::Result<Listener> {
        Ok(match l {
            StdListener::Tcp(l) => Listener::Tcp(TcpListener::from_std(l)?),
            StdListener::Unix(l, f) => Listener::Unix(UnixListener::from_std(l)?, f),
        })
    }

    /// The address it listens on (the port the kernel chose, for port 0).
    pub fn address(&self) -> io::Result<AdminAddress> {
        Ok(match self {
            Listener::Tcp(l) => AdminAddress::Tcp(l.local_addr()?),
            Listener::Unix(_, f) => AdminAddress::Unix(f.path.clone()),
        })
    }

    async fn accept(&self) -> io::Result<Conn> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                Conn::Tcp(s, peer)
            }
            Listener::Unix(l, _) => Conn::Unix(l.accept().await?.0),
        })
    }
}

/// The socket file of a Unix admin listener: created with mode 0600 (before the socket listens,
/// so that nobody connects while it is wider), and removed when this is dropped, unless another
/// file took its place meanwhile.
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

/// Set once a successor took this process's admin socket over: its file is the successor's.
static SOCKET_FILE_HANDED_OVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The admin socket's file stays when this process ends (a successor serves on it).
pub fn keep_socket_file() {
    SOCKET_FILE_HANDED_OVER.store(true, std::sync::atomic::Ordering::SeqCst);
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if SOCKET_FILE_HANDED_OVER.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn bind_unix(path: &Path) -> io::Result<(std::os::unix::net::UnixListener, SocketFile)> {
    use socket2::{Domain, SockAddr, Socket, Type};
    remove_stale(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&SockAddr::unix(path)?)?;
    let meta = std::fs::symlink_metadata(path)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok((socket.into(), file))
}

/// A socket file left by a proxy that did not stop cleanly is removed; a live one (something
/// accepts on it) or a file that is not a socket is an error.
fn remove_stale(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        r => r?,
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another process listens on {}", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

// ---- serving ----

enum Conn {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

impl Conn {
    /// The 503 past `admin.max_connections`, with no wait: input already there is read first
    /// (closing on unread input would reset the connection and lose the answer), the answer
    /// fits the empty socket buffer, and the socket is closed when `self` is dropped.
    fn refuse_over_capacity(self) {
        let mut sink = [0u8; 4096];
        match &self {
            Conn::Tcp(s, _) => {
                while matches!(s.try_read(&mut sink), Ok(n) if n > 0) {}
                let _ = s.try_write(&OVER_CAPACITY);
            }
            Conn::Unix(s) => {
                while matches!(s.try_read(&mut sink), Ok(n) if n > 0) {}
                let _ = s.try_write(&OVER_CAPACITY);
            }
        }
    }

    fn peer(&self) -> String {
        match self {
            Conn::Tcp(_, peer) => peer.to_string(),
            Conn::Unix(_) => "unix".into(),
        }
    }
}

/// Serves until `shutdown` completes; then stops accepting, closes the connections still open
/// (after [`STOP_GRACE`] for a request being answered) and, for a Unix socket, removes its file.
pub async fn serve(listener: Listener, server: Server, shutdown: impl Future<Output = ()>) {
    let address = match listener.address() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "admin listener: cannot read its address; not serving");
            return;
        }
    };
    let settings = server.admin_config().unwrap_or_else(|| Admin::new(address.clone()));
    info!(admin = %address, "admin endpoints: /metrics /healthz /reload");
    if let AdminAddress::Tcp(a) = &address
        && !a.ip().to_canonical().is_loopback()
        && settings.token.is_none()
    {
        warn!(
            admin = %a,
            "admin listener reachable beyond loopback without a token: whoever reaches it can POST /reload; \
             set admin.token_file, or listen on loopback or a unix: socket"
        );
    }
    let listen_hosts = address_hosts(&address);
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let tasks = TaskTracker::new();
    let cancel = CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => match a {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors (the reserve should prevent it): wait, do not spin.
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            refused(&server, AdminRefusal::OverCapacity, &conn.peer());
            conn.refuse_over_capacity();
            continue;
        };
        let (server, cancel, listen_hosts) = (server.clone(), cancel.clone(), listen_hosts.clone());
        let idle_timeout = server.admin_config().map_or(settings.idle_timeout, |a| a.idle_timeout);
        tasks.spawn(async move {
            match conn {
                Conn::Tcp(s, peer) => {
                    let hosts = match (listen_hosts, s.local_addr()) {
                        (Hosts::Tcp(mut h), Ok(local)) => {
                            h.extend(tcp_hosts(local));
                            Hosts::Tcp(h)
                        }
                        (h, _) => h,
                    };
                    let ctx = Ctx {
                        server,
                        hosts,
                        peer: peer.to_string(),
                    };
                    serve_connection(s, ctx, idle_timeout, cancel).await;
                }
                Conn::Unix(s) => {
                    let ctx = Ctx {
                        server,
                        hosts: Hosts::Unix,
                        peer: "unix".into(),
                    };
                    serve_connection(s, ctx, idle_timeout, cancel).await;
                }
            }
            drop(slot);
        });
    }
    // The socket file goes with the listener.
    drop(listener);
    cancel.cancel();
    tasks.close();
    if tokio::time::timeout(STOP_GRACE + Duration::from_secs(1), tasks.wait())
        .await
        .is_err()
    {
        warn!(open = tasks.len(), "admin connections did not end at stop");
    }
}

/// Counts a refusal and logs it (bounded).
fn refused(server: &Server, reason: AdminRefusal, peer: &str) {
    server.admin_refused(reason);
    if let Some(suppressed) = REFUSAL_LINES.admit(Instant::now()) {
        info!(reason = reason.as_str(), peer, suppressed, "admin request refused");
    }
}

/// What a request's `Host` may be.
#[derive(Clone)]
enum Hosts {
    Tcp(Vec<String>),
    Unix,
}

fn address_hosts(a: &AdminAddress) -> Hosts {
    match a {
        AdminAddress::Tcp(a) => Hosts::Tcp(tcp_hosts(*a)),
        AdminAddress::Unix(_) => Hosts::Unix,
    }
}

/// `IP:PORT` as written in a `Host` field, and `localhost:PORT` for a loopback address.
fn tcp_hosts(a: SocketAddr) -> Vec<String> {
    let a = SocketAddr::new(a.ip().to_canonical(), a.port());
    let mut hosts = vec![a.to_string()];
    if a.ip().is_loopback() {
        hosts.push(format!("localhost:{}", a.port()));
    }
    hosts
}

impl Hosts {
    fn allow(&self, host: &str) -> bool {
        match self {
            Hosts::Tcp(hosts) => hosts.iter().any(|h| h.eq_ignore_ascii_case(host)),
            Hosts::Unix => host.eq_ignore_ascii_case("localhost"),
        }
    }
}

/// What the requests of one connection are checked against.
struct Ctx {
    server: Server,
    hosts: Hosts,
    peer: String,
}

/// Serves one connection with HTTP/1.1 keep-alive, closed after `idle` without a complete
/// request, or at stop.
async fn serve_connection<S>(stream: S, ctx: Ctx, idle: Duration, cancel: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Arc::new(ctx);
    // Since when the connection has waited for a request: its accept, then each answer.
    let waiting_since = Arc::new(Mutex::new(tokio::time::Instant::now()));
    let service = {
        let (ctx, waiting_since) = (Arc::clone(&ctx), Arc::clone(&waiting_since));
        service_fn(move |req: Request<Incoming>| {
            let (ctx, waiting_since) = (Arc::clone(&ctx), Arc::clone(&waiting_since));
            async move {
                let response = handle(&req, &ctx);
                *crate::lock::lock(&waiting_since) = tokio::time::Instant::now();
                Ok::<_, Infallible>(response)
            }
        })
    };
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    loop {
        let deadline = *crate::lock::lock(&waiting_since) + idle;
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    debug!(error = %e, "admin connection failed");
                }
                return;
            }
            _ = tokio::time::sleep_until(deadline) => {
                let since = *crate::lock::lock(&waiting_since);
                if since + idle <= tokio::time::Instant::now() {
                    refused(&ctx.server, AdminRefusal::IdleTimeout, &ctx.peer);
                    return;
                }
            }
            _ = cancel.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(STOP_GRACE, conn).await;
                return;
            }
        }
    }
}

fn handle(req: &Request<Incoming>, ctx: &Ctx) -> Response<Full<Bytes>> {
    if let Some((reason, response)) = check(req, ctx) {
        refused(&ctx.server, reason, &ctx.peer);
        return response;
    }
    let server = &ctx.server;
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => response(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            server.metrics_text(),
        ),
        (&Method::GET, "/services") => response(
            StatusCode::OK,
            "application/json",
            server.services_json().to_string() + "\n",
        ),
        (&Method::GET, "/healthz") if server.accepting() => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/healthz") => text(StatusCode::SERVICE_UNAVAILABLE, "not accepting connections\n"),
        (&Method::POST, "/reload") => {
            let token = server.admin_config().and_then(|a| a.token);
            if let Some(token) = token
                && !authorized(req, &token)
            {
                refused(server, AdminRefusal::Unauthorized, &ctx.peer);
                let mut r = text(StatusCode::UNAUTHORIZED, "POST /reload needs the admin token\n");
                r.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            }
            reload(server)
        }
        (_, "/metrics" | "/healthz" | "/reload" | "/services") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /services or POST /reload\n",
        ),
    }
}

/// The rules every request meets, whatever its endpoint: its `Host` names this listener, and it
/// has no `Origin`.
fn check(req: &Request<Incoming>, ctx: &Ctx) -> Option<(AdminRefusal, Response<Full<Bytes>>)> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let host_ok = match (hosts.next().map(HeaderValue::to_str), hosts.next()) {
        (Some(Ok(h)), None) => ctx.hosts.allow(h),
        _ => false,
    } && req.uri().authority().is_none_or(|a| ctx.hosts.allow(a.as_str()));
    if !host_ok {
        return Some((
            AdminRefusal::Host,
            text(
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected request: Host must be the admin listener's address\n",
            ),
        ));
    }
    if req.headers().contains_key(ORIGIN) {
        return Some((
            AdminRefusal::Origin,
            text(StatusCode::FORBIDDEN, "requests with an Origin field are refused\n"),
        ));
    }
    None
}

/// `Authorization: Bearer <token>` with this token (compared in constant time).
fn authorized(req: &Request<Incoming>, token: &Token) -> bool {
    let mut values = req.headers().get_all(AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let value = value.as_bytes();
    let Some(scheme) = value.get(..7) else {
        return false;
    };
    scheme.eq_ignore_ascii_case(b"bearer ")
        && constant_time_eq::constant_time_eq(value[7..].trim_ascii(), token.as_str().as_bytes())
}

fn reload(server: &Server) -> Response<Full<Bytes>> {
    match server.reload() {
        Ok(notes) => {
            info!(notes = notes.len(), "configuration reloaded (admin endpoint)");
            for n in &notes {
                warn!("reload: {n}");
            }
            let mut body = String::from("reloaded\n");
            for n in notes {
                body.push_str(&format!("note: {n}\n"));
            }
            text(StatusCode::OK, body)
        }
        Err(e) => {
            warn!("reload refused, keeping the running configuration: {e}");
            text(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body.into())
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

// ---- the client side: `wsproxy reload` ----

/// `POST /reload` to the admin listener `admin` (with its token, when it has one), blocking:
/// the status and the body of the answer.
pub fn request_reload(admin: &Admin) -> io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let host = match &admin.address {
        AdminAddress::Tcp(a) => a.to_string(),
        AdminAddress::Unix(_) => "localhost".to_string(),
    };
    let auth = admin
        .token
        .as_ref()
        .map(|t| format!("Authorization: Bearer {}\r\n", t.as_str()))
        .unwrap_or_default();
    let request =
        format!("POST /reload HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n");
    let timeout = Some(Duration::from_secs(10));
    let mut answer = Vec::new();
    match &admin.address {
        AdminAddress::Tcp(a) => {
            let mut s = std::net::TcpStream::connect_timeout(a, Duration::from_secs(5))?;
            s.set_read_timeout(timeout)?;
            s.set_write_timeout(timeout)?;
            s.write_all(request.as_bytes())?;
            s.read_to_end(&mut answer)?;
        }
        AdminAddress::Unix(p) => {
            let mut s = std::os::unix::net::UnixStream::connect(p)?;
            s.set_read_timeout(timeout)?;
            s.set_write_timeout(timeout)?;
            s.write_all(request.as_bytes())?;
            s.read_to_end(&mut answer)?;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP answer"))?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_the_address_and_localhost_on_loopback_always_with_the_port() {
        let h = Hosts::Tcp(tcp_hosts("127.0.0.1:9090".parse().unwrap()));
        for ok in ["127.0.0.1:9090", "localhost:9090", "LOCALHOST:9090"] {
            assert!(h.allow(ok), "{ok}");
        }
        for bad in [
            "127.0.0.1",
            "localhost",
            "localhost:9091",
            "evil.example:9090",
            "127.0.0.2:9090",
            "",
        ] {
            assert!(!h.allow(bad), "{bad}");
        }
        let v6 = Hosts::Tcp(tcp_hosts("[::1]:9090".parse().unwrap()));
        assert!(v6.allow("[::1]:9090") && v6.allow("localhost:9090") && !v6.allow("::1"));
        let mapped = Hosts::Tcp(tcp_hosts("[::ffff:127.0.0.1]:9090".parse().unwrap()));
        assert!(mapped.allow("127.0.0.1:9090"));
        let public = Hosts::Tcp(tcp_hosts("192.0.2.7:9090".parse().unwrap()));
        assert!(public.allow("192.0.2.7:9090") && !public.allow("localhost:9090"));
        assert!(Hosts::Unix.allow("localhost") && !Hosts::Unix.allow("localhost:80"));
    }
}
