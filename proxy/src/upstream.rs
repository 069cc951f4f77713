//! The upstream's side of the handshake: connect, send the forwarded request, read the response
//! head, and check it is a valid 101 for this request's key.
//!
//! Connect, send and receive share one deadline. Errors say whether another upstream may be tried:
//! only when the upstream saw nothing it could act on, or never answered (a connect error, a
//! timeout, a close or a reset before any response byte). An upstream that answered, even
//! wrongly, is not retried elsewhere. They also say whether the failure is the upstream's own
//! (it counts towards marking it down) or an answer any client could provoke (it does not).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use sha1::{Digest, Sha1};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config;
use crate::head::{self, HeadError, RawHead};
use crate::stream::{Prefixed, Stream};

/// TLS towards an upstream: the service's client configuration and the name to send and verify.
pub type Tls = (Arc<rustls::ClientConfig>, ServerName<'static>);

/// Most header fields accepted in an upstream response.
const MAX_RESPONSE_HEADERS: usize = 100;

/// The TLS of a handshake with the upstream at `addr` of `up`, when it has TLS: the name is
/// `upstreams.tls.server_name`, else the host name the address was resolved from, else the
/// address itself.
pub fn tls_for(up: &config::Upstreams, addr: SocketAddr) -> Option<Tls> {
    let t = up.tls.as_ref()?;
    let name = t.server_name.clone().unwrap_or_else(|| {
        up.main
            .iter()
            .chain(&up.backup)
            .find(|s| s.address == addr)
            .and_then(|s| s.name.clone())
            .and_then(|n| ServerName::try_from(n).ok())
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
    });
    Some((Arc::clone(&t.client), name))
}

/// A connection on which the upstream accepted the upgrade.
pub struct Upgraded {
    pub stream: Stream,
    /// The 101 head exactly as received, followed by any payload bytes the upstream sent after it.
    pub response: RawHead,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect failed: {0}")]
    Connect(io::Error),
    /// The TLS handshake with the upstream failed (its certificate, its versions).
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("closed before answering")]
    ClosedBeforeAnswer,
    #[error("closed mid-head after {0} bytes")]
    ClosedMidHead(usize),
    /// Sending the request or reading the answer failed after `read` response bytes.
    #[error("i/o error after {read} response bytes: {error}")]
    Io { read: usize, error: io::Error },
    #[error("invalid response head: {0}")]
    Malformed(String),
    /// A final answer other than 101; with it the answer itself when it was asked for
    /// (`upstreams.on_refusal = "forward"`).
    #[error("answered {0} instead of 101")]
    Status(u16, Option<Box<NotUpgraded>>),
    #[error("invalid 101: {0}")]
    BadUpgrade(&'static str),
}

impl UpstreamError {
    /// True when trying the next upstream is safe and useful: this one never answered. A reset
    /// before the first response byte is no answer, like a close.
    pub fn retryable(&self) -> bool {
        match self {
            UpstreamError::Connect(_)
            | UpstreamError::Tls(_)
            | UpstreamError::Timeout(_)
            | UpstreamError::ClosedBeforeAnswer => true,
            UpstreamError::Io { read: 0, error } => is_reset(error),
            _ => false,
        }
    }

    /// True when the failure is the upstream's own and counts towards marking it down. An answer,
    /// whatever its status, is something a client can provoke (a path that redirects, a 404, a
    /// 403 for an Origin) and must not move everyone to the next upstream; a 5xx counts only
    /// when `upstreams.health.count_5xx` says so.
    pub fn counts_against_health(&self, cfg: &config::Health) -> bool {
        match self {
            UpstreamError::Status(s, _) => cfg.count_5xx && (500..600).contains(s),
            // Out of descriptors or memory here: the proxy's trouble, not the upstream's.
            UpstreamError::Connect(e) => !matches!(
                e.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
            ),
            _ => true,
        }
    }

    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Tls(_) => "tls",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::ClosedBeforeAnswer | UpstreamError::ClosedMidHead(_) => "closed",
            UpstreamError::Io { error, .. } if is_reset(error) => "reset",
            UpstreamError::Io { .. } => "io",
            UpstreamError::Malformed(_) => "malformed",
            UpstreamError::Status(..) => "status",
            UpstreamError::BadUpgrade(_) => "bad_upgrade",
        }
    }
}

/// A reset (or a write into a connection the upstream already reset or aborted).
fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted
    )
}

/// A final answer other than 101, kept to be forwarded to the client: its head as received, and
/// its body when the head gives a `Content-Length` of at most [`MAX_FORWARDED_BODY`] (otherwise
/// none: a client is told the status and the fields, not a stream of unknown length).
#[derive(Debug, Default)]
pub struct NotUpgraded {
    pub head: Vec<u8>,
    pub body: Vec<u8>,
}

/// The largest body of a non-101 answer forwarded to the client.
pub const MAX_FORWARDED_BODY: usize = 64 * 1024;

/// Performs the upstream half of the handshake under one deadline. With `keep_answer`, a
/// non-101 answer comes back whole in [`UpstreamError::Status`] (its body read under the same
/// deadline).
pub async fn handshake(
    addr: SocketAddr,
    tls: Option<Tls>,
    request: &[u8],
    key: &str,
    timeout: Duration,
    max_head: usize,
    keep_answer: bool,
) -> Result<Upgraded, UpstreamError> {
    let exchange = exchange(addr, tls, request, key, max_head, keep_answer);
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(UpstreamError::Timeout(timeout)),
    }
}

/// The body of a non-101 answer whose head is `head`: `Content-Length` bytes (at most
/// [`MAX_FORWARDED_BODY`]), starting with `behind`, the bytes read past the head.
async fn answer_body(stream: &mut (impl AsyncRead + Unpin), head: &[u8], mut behind: Vec<u8>) -> Vec<u8> {
    let mut h = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut h);
    let _ = resp.parse(head);
    let length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok());
    let chunked = resp
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
    let Some(length) = length.filter(|&l| l <= MAX_FORWARDED_BODY && !chunked) else {
        return Vec::new();
    };
    behind.truncate(length);
    while behind.len() < length {
        let mut chunk = [0u8; 4096];
        let want = (length - behind.len()).min(chunk.len());
        match stream.read(&mut chunk[..want]).await {
            Ok(0) | Err(_) => return Vec::new(),
            Ok(n) => behind.extend_from_slice(&chunk[..n]),
        }
    }
    behind
}

/// A TCP connection to `addr`, with the options an upstream socket needs before its connect
/// (`socket_options::connecting`).
pub(crate) async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    crate::socket_options::connecting(&socket);
    socket.connect(addr).await
}

async fn exchange(
    addr: SocketAddr,
    tls: Option<Tls>,
    request: &[u8],
    key: &str,
    max_head: usize,
    keep_answer: bool,
) -> Result<Upgraded, UpstreamError> {
    let tcp = connect(addr).await.map_err(UpstreamError::Connect)?;
    let io = |read| move |error| UpstreamError::Io { read, error };
    let mut stream = match tls {
        None => Stream::plain(tcp, Vec::new()),
        Some((config, name)) => {
            let connector = tokio_rustls::TlsConnector::from(config);
            let s = connector
                .connect(name, Prefixed::new(Vec::new(), tcp))
                .await
                .map_err(UpstreamError::Tls)?;
            Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(s)))
        }
    };
    stream.write_all(request).await.map_err(io(0))?;
    stream.flush().await.map_err(io(0))?;
    let parse = |b: &[u8]| {
        let mut h = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        head::from_httparse(httparse::Response::new(&mut h).parse(b), MAX_RESPONSE_HEADERS)
    };
    // Interim responses (1xx other than 101, such as 100 or 103) may precede the final one
    // (RFC 9110 section 15.2): they are read and dropped, never forwarded to the client.
    let mut behind = Vec::new();
    // Bytes of the interim heads read before this one: an answer, even if the final one fails.
    let mut interim_bytes = 0;
    for _ in 0..=MAX_INTERIM_RESPONSES {
        let response = match head::read_head_after(&mut stream, behind, max_head, parse).await {
            Ok(r) => r,
            Err(HeadError::Closed(0)) if interim_bytes == 0 => return Err(UpstreamError::ClosedBeforeAnswer),
            Err(HeadError::Closed(n)) => return Err(UpstreamError::ClosedMidHead(interim_bytes + n)),
            Err(HeadError::Io { read, error }) => return Err(io(interim_bytes + read)(error)),
            Err(e) => return Err(UpstreamError::Malformed(e.to_string())),
        };
        if is_interim(response.head()) {
            interim_bytes += response.head_len;
            behind = response.rest().to_vec();
            continue;
        }
        return match check_101(response.head(), key) {
            Ok(()) => Ok(Upgraded { stream, response }),
            Err(UpstreamError::Status(code, None)) if keep_answer => {
                let head = response.head().to_vec();
                let body = answer_body(&mut stream, &head, response.rest().to_vec()).await;
                Err(UpstreamError::Status(code, Some(Box::new(NotUpgraded { head, body }))))
            }
            Err(e) => Err(e),
        };
    }
    Err(UpstreamError::Malformed(format!(
        "more than {MAX_INTERIM_RESPONSES} interim responses"
    )))
}

/// Most interim (1xx) responses accepted before the 101.
const MAX_INTERIM_RESPONSES: usize = 8;

/// True for a 1xx response other than 101.
fn is_interim(head_bytes: &[u8]) -> bool {
    let mut h = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut h);
    resp.parse(head_bytes).is_ok() && resp.code.is_some_and(|c| (100..200).contains(&c) && c != 101)
}

/// Checks a response head: status 101, `Upgrade: websocket`, `Connection: upgrade` and the
/// `Sec-WebSocket-Accept` that RFC 6455 section 4.2.2 derives from the request's key.
pub fn check_101(head_bytes: &[u8], key: &str) -> Result<(), UpstreamError> {
    let mut h = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut h);
    resp.parse(head_bytes)
        .map_err(|e| UpstreamError::Malformed(e.to_string()))?;
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        return Err(UpstreamError::Status(code, None));
    }
    if resp.version != Some(1) {
        return Err(UpstreamError::BadUpgrade("HTTP version is not 1.1"));
    }
    let all = |name: &'static str| resp.headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name));
    if !all("upgrade").any(|h| head::has_token(h.value, "websocket")) {
        return Err(UpstreamError::BadUpgrade("no Upgrade: websocket"));
    }
    if !all("connection").any(|h| head::has_token(h.value, "upgrade")) {
        return Err(UpstreamError::BadUpgrade("no upgrade token in Connection"));
    }
    let mut accepts = all("sec-websocket-accept");
    let accept = accepts
        .next()
        .ok_or(UpstreamError::BadUpgrade("no Sec-WebSocket-Accept"))?;
    if accepts.next().is_some() {
        return Err(UpstreamError::BadUpgrade("repeated Sec-WebSocket-Accept"));
    }
    if accept.value.trim_ascii() != accept_key(key).as_bytes() {
        return Err(UpstreamError::BadUpgrade("wrong Sec-WebSocket-Accept"));
    }
    Ok(())
}

/// base64(SHA-1(key + GUID)), RFC 6455 section 4.2.2.
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    #[test]
    fn rfc_example_accept() {
        assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn response_checks() {
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert!(check_101(ok.as_bytes(), KEY).is_ok());
        let cases = [
            (
                ok.replace("101 Switching Protocols", "200 OK"),
                "answered 200 instead of 101",
            ),
            (
                ok.replace("Upgrade: websocket\r\n", ""),
                "invalid 101: no Upgrade: websocket",
            ),
            (
                ok.replace("Connection: Upgrade", "Connection: close"),
                "invalid 101: no upgrade token in Connection",
            ),
            (
                ok.replace("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n", ""),
                "invalid 101: no Sec-WebSocket-Accept",
            ),
            (
                ok.replace("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", "AAAAAAAAAAAAAAAAAAAAAAAAAAA="),
                "invalid 101: wrong Sec-WebSocket-Accept",
            ),
            (
                ok.replace("HTTP/1.1", "HTTP/1.0"),
                "invalid 101: HTTP version is not 1.1",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(check_101(text.as_bytes(), KEY).unwrap_err().to_string(), want);
        }
    }

    #[test]
    fn only_unanswered_attempts_are_retried() {
        assert!(UpstreamError::Connect(io::ErrorKind::ConnectionRefused.into()).retryable());
        assert!(UpstreamError::Timeout(Duration::from_secs(1)).retryable());
        assert!(UpstreamError::ClosedBeforeAnswer.retryable());
        assert!(!UpstreamError::Status(503, None).retryable());
        assert!(!UpstreamError::BadUpgrade("x").retryable());
        assert!(!UpstreamError::ClosedMidHead(3).retryable());
    }

    #[test]
    fn a_reset_before_any_response_byte_is_no_answer() {
        let reset = |read, kind: io::ErrorKind| UpstreamError::Io {
            read,
            error: kind.into(),
        };
        let cfg = config::Health::default();
        for kind in [
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::ConnectionAborted,
        ] {
            let e = reset(0, kind);
            assert!(e.retryable() && e.counts_against_health(&cfg), "{e}");
            assert_eq!(e.reason(), "reset");
            // After part of an answer it is like a close mid-head: not retried, still counted.
            let e = reset(12, kind);
            assert!(!e.retryable() && e.counts_against_health(&cfg), "{e}");
        }
        let other = reset(0, io::ErrorKind::InvalidInput);
        assert!(!other.retryable());
        assert_eq!(other.reason(), "io");
    }

    #[test]
    fn only_the_upstreams_own_failures_count_against_its_health() {
        let default = config::Health::default();
        let count_5xx = config::Health {
            count_5xx: true,
            ..Default::default()
        };
        for s in [200, 204, 301, 302, 307, 400, 403, 404, 426, 429] {
            let e = UpstreamError::Status(s, None);
            assert!(
                !e.counts_against_health(&default) && !e.counts_against_health(&count_5xx),
                "{s}"
            );
        }
        for s in [500, 502, 503, 599] {
            let e = UpstreamError::Status(s, None);
            assert!(
                !e.counts_against_health(&default),
                "{s} counts although count_5xx is off"
            );
            assert!(e.counts_against_health(&count_5xx), "{s}");
        }
        for e in [
            UpstreamError::Connect(io::ErrorKind::ConnectionRefused.into()),
            UpstreamError::Timeout(Duration::from_secs(1)),
            UpstreamError::ClosedBeforeAnswer,
            UpstreamError::ClosedMidHead(3),
            UpstreamError::Malformed("x".into()),
            UpstreamError::BadUpgrade("x"),
        ] {
            assert!(e.counts_against_health(&default), "{e}");
        }
        let emfile = UpstreamError::Connect(io::Error::from_raw_os_error(libc::EMFILE));
        assert!(!emfile.counts_against_health(&default));
    }
}
