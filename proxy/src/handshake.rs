//! The client's side of the handshake: read the request head within its bounds, and check it is a
//! WebSocket opening handshake (RFC 6455 section 4.2.1) the proxy is willing to forward.
//!
//! Every way a request can be refused is a [`Rejection`], which knows its HTTP status; the
//! connection code writes it in one place. Checks that guard against request smuggling live here
//! too: an upgrade request never carries a body, so any `Transfer-Encoding` or non-zero
//! `Content-Length` is refused instead of being forwarded for the upstream to interpret.
//!
//! The request target may be in origin-form (`/path?q`) or, as RFC 9112 section 3.2.2 requires a
//! server to accept, in absolute-form (`http://host/path?q`); the upstream always gets origin-form.

use std::ops::Range;

use base64::Engine;
use tokio::io::AsyncRead;

use crate::config::{self, UnderscoreHeaders};
use crate::head::{self, HeadError, Parsed, RawHead};

/// Why a client's request is answered with an error instead of being forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// 400: not a WebSocket handshake this proxy forwards; the reason says which rule failed.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// 426: a WebSocket handshake for another protocol version.
    #[error("unsupported WebSocket version")]
    UnsupportedVersion,
    /// 431: head larger than allowed, or too many header fields.
    #[error("request head too large: {0}")]
    HeadTooLarge(&'static str),
    /// 408: the head was not complete in time.
    #[error("request head not complete in time")]
    Timeout,
    /// 403: the client's network or the request's `Origin` is not allowed (`[access]`).
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    /// 421: no service of the listener answers for the request's host. (421 Misdirected Request,
    /// rather than 404: the request reached a server that is not the host's, and a client or an
    /// L4 layer that knows the code may try another connection.)
    #[error("no service for this host")]
    UnknownHost,
}

impl Rejection {
    pub fn status(&self) -> u16 {
        match self {
            Rejection::BadRequest(_) => 400,
            Rejection::UnsupportedVersion => 426,
            Rejection::HeadTooLarge(_) => 431,
            Rejection::Timeout => 408,
            Rejection::Forbidden(_) => 403,
            Rejection::UnknownHost => 421,
        }
    }
}

/// A client's request head that passed validation.
#[derive(Debug)]
pub struct Request {
    raw: RawHead,
    request_line: Range<usize>,
    headers: Vec<(Range<usize>, Range<usize>)>,
    /// `Sec-WebSocket-Key` as sent, to check the upstream's `Sec-WebSocket-Accept`.
    pub key: String,
    /// Set when the target was in absolute-form.
    absolute: Option<Absolute>,
}

/// An absolute-form request target, taken apart.
#[derive(Debug)]
struct Absolute {
    /// The request line with the target in origin-form.
    line: Vec<u8>,
    /// The target's `host[:port]`.
    authority: String,
}

impl Request {
    /// The request line to forward, without its line end: as the client sent it, except that an
    /// absolute-form target is given in origin-form (its path and query).
    pub fn request_line(&self) -> &[u8] {
        match &self.absolute {
            Some(a) => &a.line,
            None => &self.raw.buf[self.request_line.clone()],
        }
    }

    /// The authority of an absolute-form target, which replaces the value of `Host`: RFC 9112
    /// section 3.2.2 has a server ignore the Host field then and use the target's host instead.
    /// `None` for origin-form, where the client's Host is forwarded as sent.
    pub fn target_authority(&self) -> Option<&str> {
        self.absolute.as_ref().map(|a| a.authority.as_str())
    }

    /// Header fields in the client's order, names in the client's case, values trimmed.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers.iter().map(|(n, v)| {
            // Names were checked to be tokens by httparse, hence ASCII.
            let name = std::str::from_utf8(&self.raw.buf[n.clone()]).unwrap_or("");
            (name, &self.raw.buf[v.clone()])
        })
    }

    /// Bytes the client sent after its head: relayed to the upstream right after the request.
    pub fn rest(&self) -> &[u8] {
        self.raw.rest()
    }

    /// The host the request is for: an absolute-form target's authority, else the `Host` field
    /// (present: [`validate`] checks it), as sent (port included).
    pub fn host(&self) -> &str {
        if let Some(a) = self.target_authority() {
            return a;
        }
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case("host"))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .unwrap_or("")
    }

    /// Checks a request read under a shared listener's bounds against the bounds of the service
    /// it turned out to be for: what [`read_request`] would have refused with that service's
    /// settings is refused the same way.
    pub fn conforms(&self, cfg: &config::Handshake, underscore: UnderscoreHeaders) -> Result<(), Rejection> {
        if self.raw.head_len > cfg.max_head_bytes {
            return Err(Rejection::HeadTooLarge("head size"));
        }
        if self.headers.len() > cfg.max_headers {
            return Err(Rejection::HeadTooLarge("header count"));
        }
        if underscore == UnderscoreHeaders::Reject && self.headers().any(|(n, _)| n.contains('_')) {
            return Err(Rejection::BadRequest("header name with an underscore"));
        }
        Ok(())
    }
}

/// Reads and validates a request head. The caller bounds the time (→ [`Rejection::Timeout`]).
/// `Ok(None)` means the client closed or failed before sending a complete head: there is nobody
/// to answer.
pub async fn read_request<R: AsyncRead + Unpin>(
    io: &mut R,
    cfg: &config::Handshake,
    underscore: UnderscoreHeaders,
) -> Result<Option<Request>, Rejection> {
    let max_headers = cfg.max_headers;
    let parse = |b: &[u8]| -> Result<Parsed, HeadError> {
        let mut h = vec![httparse::EMPTY_HEADER; max_headers];
        head::from_httparse(httparse::Request::new(&mut h).parse(b), max_headers)
    };
    match head::read_head(io, cfg.max_head_bytes, parse).await {
        Ok(raw) => validate(raw, max_headers, underscore).map(Some),
        Err(HeadError::TooLarge(_)) => Err(Rejection::HeadTooLarge("head size")),
        Err(HeadError::TooManyHeaders(_)) => Err(Rejection::HeadTooLarge("header count")),
        Err(HeadError::Malformed(_)) => Err(Rejection::BadRequest("malformed request head")),
        Err(HeadError::Closed(_) | HeadError::Io { .. }) => Ok(None),
    }
}

/// A valid handshake request for `GET /a` with `extra` header lines after `Host: h`, for the
/// tests of the modules that read a [`Request`].
#[cfg(test)]
pub(crate) fn test_request(extra: &str) -> Request {
    let text = format!(
        "GET /a HTTP/1.1\r\nHost: h\r\n{extra}Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let head_len = text.len();
    let raw = RawHead {
        buf: text.into_bytes(),
        head_len,
    };
    validate(raw, 100, UnderscoreHeaders::Keep).expect("a valid request")
}

/// Checks a complete head against RFC 6455 section 4.2.1 and the proxy's own rules.
pub fn validate(raw: RawHead, max_headers: usize, underscore: UnderscoreHeaders) -> Result<Request, Rejection> {
    let mut hs = vec![httparse::EMPTY_HEADER; max_headers];
    let mut req = httparse::Request::new(&mut hs);
    // Parsed before, so this cannot fail; the error arm keeps it total anyway.
    if !matches!(req.parse(raw.head()), Ok(httparse::Status::Complete(_))) {
        return Err(Rejection::BadRequest("malformed request head"));
    }
    let method = req.method.unwrap_or("");
    let path = req.path.unwrap_or("");
    if method != "GET" {
        return Err(Rejection::BadRequest("method is not GET"));
    }
    if req.version != Some(1) {
        return Err(Rejection::BadRequest("HTTP version is not 1.1"));
    }
    let absolute = if path.starts_with('/') {
        None
    } else {
        let (authority, origin_form) = absolute_form(path)?;
        let line = format!("{method} {origin_form} HTTP/1.1").into_bytes();
        Some(Absolute { line, authority })
    };

    let headers: &[httparse::Header] = req.headers;
    let all = |name: &'static str| headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name));
    let only = |name: &'static str| -> Result<Option<&[u8]>, Rejection> {
        let mut it = all(name);
        let first = it.next().map(|h| h.value);
        if it.next().is_some() {
            return Err(Rejection::BadRequest("a header field that must be unique is repeated"));
        }
        Ok(first)
    };

    if only("host")?.is_none_or(|v| v.trim_ascii().is_empty()) {
        return Err(Rejection::BadRequest("no Host"));
    }
    if !all("upgrade").any(|h| head::has_token(h.value, "websocket")) {
        return Err(Rejection::BadRequest("not a WebSocket upgrade (Upgrade)"));
    }
    if !all("connection").any(|h| head::has_token(h.value, "upgrade")) {
        return Err(Rejection::BadRequest("not a WebSocket upgrade (Connection)"));
    }
    // Fields named in Connection are removed before forwarding (RFC 9110 section 7.6.1); naming
    // one the upstream's handshake needs would forward a request it can only refuse.
    if all("connection").any(|h| {
        ["host", "sec-websocket-key", "sec-websocket-version"]
            .iter()
            .any(|f| head::has_token(h.value, f))
    }) {
        return Err(Rejection::BadRequest("Connection names a field the handshake needs"));
    }
    if all("transfer-encoding").next().is_some() {
        return Err(Rejection::BadRequest(
            "an upgrade request has no body (Transfer-Encoding)",
        ));
    }
    if only("content-length")?.is_some_and(|v| v.trim_ascii() != b"0") {
        return Err(Rejection::BadRequest("an upgrade request has no body (Content-Length)"));
    }
    match only("sec-websocket-version")? {
        None => return Err(Rejection::BadRequest("no Sec-WebSocket-Version")),
        Some(v) if v.trim_ascii() != b"13" => return Err(Rejection::UnsupportedVersion),
        Some(_) => {}
    }
    let key = only("sec-websocket-key")?.ok_or(Rejection::BadRequest("no Sec-WebSocket-Key"))?;
    let key = key.trim_ascii();
    // Decoded onto the stack: 16 bytes are 24 characters, so a key that does not fit is wrong.
    if base64::engine::general_purpose::STANDARD.decode_slice(key, &mut [0u8; 32]) != Ok(16) {
        return Err(Rejection::BadRequest("Sec-WebSocket-Key is not 16 bytes in base64"));
    }
    if underscore == UnderscoreHeaders::Reject && headers.iter().any(|h| h.name.contains('_')) {
        return Err(Rejection::BadRequest("header name with an underscore"));
    }

    let buf = &raw.buf;
    let line_start = head::offset_in(buf, method.as_bytes());
    let line_end = line_start + buf[line_start..].iter().position(|&b| b == b'\n').unwrap_or(0);
    let line_end = if line_end > line_start && buf[line_end - 1] == b'\r' {
        line_end - 1
    } else {
        line_end
    };
    let ranges = headers
        .iter()
        .map(|h| {
            let n = head::offset_in(buf, h.name.as_bytes());
            let v = head::offset_in(buf, h.value);
            (n..n + h.name.len(), v..v + h.value.len())
        })
        .collect();
    let key = String::from_utf8_lossy(key).into_owned();
    Ok(Request {
        request_line: line_start..line_end,
        headers: ranges,
        key,
        absolute,
        raw,
    })
}

/// Takes an absolute-form target (RFC 9112 section 3.2.2) apart: `http://host[:port]/path?q` →
/// (`host[:port]`, `/path?q`); an empty path is `/`. Only the http and https schemes name this
/// server (RFC 9110 section 4.2); userinfo is refused as section 4.2.4 advises, and so is an
/// authority that is not a host with an optional port.
fn absolute_form(target: &str) -> Result<(String, String), Rejection> {
    let bad = Rejection::BadRequest;
    let (scheme, rest) = target
        .split_once("://")
        .ok_or(bad("request target is neither a path nor an http(s) URI"))?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(bad("request target is neither a path nor an http(s) URI"));
    }
    if rest.contains('#') {
        return Err(bad("request target has a fragment"));
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.contains('@') {
        return Err(bad("request target has userinfo"));
    }
    let host = match authority.strip_prefix('[') {
        // An IP literal: `[...]`, then nothing or `:port`.
        Some(inner) => {
            let (lit, after) = inner.split_once(']').ok_or(bad("request target has an invalid host"))?;
            if lit.is_empty() || !lit.bytes().all(|b| b.is_ascii_hexdigit() || b":.".contains(&b)) {
                return Err(bad("request target has an invalid host"));
            }
            port_ok(after)?;
            lit
        }
        None => {
            let (host, port) = authority.split_at(authority.find(':').unwrap_or(authority.len()));
            port_ok(port)?;
            host
        }
    };
    // A reg-name or IPv4 address (RFC 3986 section 3.2.2), and not empty, as Host must not be.
    let reg_name = |b: u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b);
    if host.is_empty() || (!authority.starts_with('[') && !host.bytes().all(reg_name)) {
        return Err(bad("request target has an invalid host"));
    }
    let path = if tail.starts_with('/') {
        tail.to_string()
    } else {
        format!("/{tail}")
    };
    Ok((authority.to_string(), path))
}

/// Nothing, or `:` and a port of at most 5 digits (RFC 3986 lets it be empty).
fn port_ok(s: &str) -> Result<(), Rejection> {
    match s.strip_prefix(':') {
        None if s.is_empty() => Ok(()),
        Some(p) if p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => Err(Rejection::BadRequest("request target has an invalid port")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn good() -> String {
        format!(
            "GET /chat?x=1 HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    }

    fn check(text: &str) -> Result<Request, Rejection> {
        let mut hs = [httparse::EMPTY_HEADER; 100];
        let n = match httparse::Request::new(&mut hs).parse(text.as_bytes()) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("test input does not parse: {other:?}"),
        };
        validate(
            RawHead {
                buf: text.as_bytes().to_vec(),
                head_len: n,
            },
            100,
            UnderscoreHeaders::Drop,
        )
    }

    fn replace(from: &str, to: &str) -> String {
        let g = good();
        assert!(g.contains(from), "{from}");
        g.replacen(from, to, 1)
    }

    #[test]
    fn good_request_keeps_line_and_headers() {
        let r = check(&good()).unwrap();
        assert_eq!(r.request_line(), b"GET /chat?x=1 HTTP/1.1");
        assert_eq!(r.key, KEY);
        let names: Vec<_> = r.headers().map(|(n, _)| n.to_string()).collect();
        assert_eq!(
            names,
            [
                "Host",
                "Upgrade",
                "Connection",
                "Sec-WebSocket-Key",
                "Sec-WebSocket-Version"
            ]
        );
    }

    #[test]
    fn absolute_form_target_is_forwarded_in_origin_form_with_its_authority() {
        let cases = [
            ("http://example/chat?x=1", "/chat?x=1", "example"),
            ("HTTPS://Example.test:8443/a/b", "/a/b", "Example.test:8443"),
            ("http://example", "/", "example"),
            ("http://example?x=1", "/?x=1", "example"),
            ("http://[::1]:9000/v6", "/v6", "[::1]:9000"),
            ("http://192.0.2.1/", "/", "192.0.2.1"),
        ];
        for (target, path, authority) in cases {
            let r = check(&replace("/chat?x=1", target)).unwrap_or_else(|e| panic!("{target}: {e}"));
            assert_eq!(
                String::from_utf8_lossy(r.request_line()),
                format!("GET {path} HTTP/1.1"),
                "{target}"
            );
            assert_eq!(r.target_authority(), Some(authority), "{target}");
        }
        // Origin-form keeps the line as sent and the client's Host.
        let r = check(&good()).unwrap();
        assert_eq!(r.target_authority(), None);
        // A Host field is still required (RFC 9112 section 3.2), even though its value is not used.
        assert_eq!(
            check(&replace("/chat?x=1", "http://example/chat").replace("Host: example\r\n", "")).unwrap_err(),
            Rejection::BadRequest("no Host")
        );
    }

    #[test]
    fn token_lists_and_case_are_accepted() {
        assert!(check(&replace("Connection: Upgrade", "connection: keep-alive, UPGRADE")).is_ok());
        assert!(check(&replace("Upgrade: websocket", "upgrade: WebSocket")).is_ok());
    }

    #[test]
    fn each_rule_has_its_answer() {
        let bad = Rejection::BadRequest;
        let cases: Vec<(String, Rejection)> = vec![
            (replace("GET ", "POST "), bad("method is not GET")),
            (replace("GET ", "get "), bad("method is not GET")),
            (replace("HTTP/1.1", "HTTP/1.0"), bad("HTTP version is not 1.1")),
            (
                replace("/chat?x=1", "ws://example/chat"),
                bad("request target is neither a path nor an http(s) URI"),
            ),
            (
                replace("/chat?x=1", "chat"),
                bad("request target is neither a path nor an http(s) URI"),
            ),
            (
                replace("/chat?x=1", "http:///chat"),
                bad("request target has an invalid host"),
            ),
            (
                replace("/chat?x=1", "http://user:pw@example/chat"),
                bad("request target has userinfo"),
            ),
            (
                replace("/chat?x=1", "http://example:80a/chat"),
                bad("request target has an invalid port"),
            ),
            (
                replace("/chat?x=1", "http://example:123456/chat"),
                bad("request target has an invalid port"),
            ),
            (
                replace("/chat?x=1", "http://[zz]/chat"),
                bad("request target has an invalid host"),
            ),
            (
                replace("/chat?x=1", "http://exa\"mple/chat"),
                bad("request target has an invalid host"),
            ),
            (
                replace("/chat?x=1", "http://example/chat#frag"),
                bad("request target has a fragment"),
            ),
            (
                replace("Connection: Upgrade", "Connection: Upgrade, Host"),
                bad("Connection names a field the handshake needs"),
            ),
            (
                replace("Connection: Upgrade", "Connection: Upgrade, sec-websocket-key"),
                bad("Connection names a field the handshake needs"),
            ),
            (replace("Host: example\r\n", ""), bad("no Host")),
            (
                replace("Host: example\r\n", "Host: a\r\nHost: b\r\n"),
                bad("a header field that must be unique is repeated"),
            ),
            (
                replace("Upgrade: websocket\r\n", ""),
                bad("not a WebSocket upgrade (Upgrade)"),
            ),
            (
                replace("Upgrade: websocket", "Upgrade: h2c"),
                bad("not a WebSocket upgrade (Upgrade)"),
            ),
            (
                replace("Connection: Upgrade", "Connection: keep-alive"),
                bad("not a WebSocket upgrade (Connection)"),
            ),
            (
                replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
                Rejection::UnsupportedVersion,
            ),
            (
                replace("Sec-WebSocket-Version: 13\r\n", ""),
                bad("no Sec-WebSocket-Version"),
            ),
            (
                replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), ""),
                bad("no Sec-WebSocket-Key"),
            ),
            (
                replace(KEY, "c2hvcnQ="),
                bad("Sec-WebSocket-Key is not 16 bytes in base64"),
            ),
            (
                replace(KEY, "not base64 at all!!"),
                bad("Sec-WebSocket-Key is not 16 bytes in base64"),
            ),
            // 17, 32 and 48 bytes: longer than a key, one of them longer than the decode buffer.
            (
                replace(KEY, "AAAAAAAAAAAAAAAAAAAAAAA="),
                bad("Sec-WebSocket-Key is not 16 bytes in base64"),
            ),
            (
                replace(KEY, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
                bad("Sec-WebSocket-Key is not 16 bytes in base64"),
            ),
            (
                replace(KEY, &"A".repeat(64)),
                bad("Sec-WebSocket-Key is not 16 bytes in base64"),
            ),
            (
                replace(
                    &format!("Sec-WebSocket-Key: {KEY}\r\n"),
                    &format!("Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Key: {KEY}\r\n"),
                ),
                bad("a header field that must be unique is repeated"),
            ),
            (
                replace("Host: example\r\n", "Host: example\r\nTransfer-Encoding: chunked\r\n"),
                bad("an upgrade request has no body (Transfer-Encoding)"),
            ),
            (
                replace("Host: example\r\n", "Host: example\r\nContent-Length: 5\r\n"),
                bad("an upgrade request has no body (Content-Length)"),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(check(&text).unwrap_err(), want, "for {text:?}");
        }
        // A plain GET is not a WebSocket request.
        assert_eq!(
            check("GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap_err(),
            bad("not a WebSocket upgrade (Upgrade)")
        );
        // A zero Content-Length carries no body and passes.
        assert!(check(&replace("Host: example\r\n", "Host: example\r\nContent-Length: 0\r\n")).is_ok());
    }

    #[test]
    fn underscore_reject_policy() {
        let text = replace("Host: example\r\n", "Host: example\r\nX_Real_IP: 1.2.3.4\r\n");
        let mut hs = [httparse::EMPTY_HEADER; 100];
        let Ok(httparse::Status::Complete(n)) = httparse::Request::new(&mut hs).parse(text.as_bytes()) else {
            panic!()
        };
        let raw = || RawHead {
            buf: text.as_bytes().to_vec(),
            head_len: n,
        };
        assert_eq!(
            validate(raw(), 100, UnderscoreHeaders::Reject).unwrap_err(),
            Rejection::BadRequest("header name with an underscore")
        );
        assert!(validate(raw(), 100, UnderscoreHeaders::Keep).is_ok());
    }

    #[test]
    fn statuses() {
        assert_eq!(Rejection::BadRequest("x").status(), 400);
        assert_eq!(Rejection::UnsupportedVersion.status(), 426);
        assert_eq!(Rejection::HeadTooLarge("x").status(), 431);
        assert_eq!(Rejection::Timeout.status(), 408);
    }
}
