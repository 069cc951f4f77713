//! The client's side of the handshake: read the request head within its bounds, and check it is a
//! WebSocket opening handshake (RFC 6455 section 4.2.1) the proxy is willing to forward.
//!
//! Every way a request can be refused is a [`Rejection`], which knows its HTTP status; the
//! connection code writes it in one place. Checks that guard against request smuggling live here
//! too: an upgrade request never carries a body, so any `Transfer-Encoding` or non-zero
//! `Content-Length` is refused instead of being forwarded for the upstream to interpret.

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
}

impl Rejection {
    pub fn status(&self) -> u16 {
        match self {
            Rejection::BadRequest(_) => 400,
            Rejection::UnsupportedVersion => 426,
            Rejection::HeadTooLarge(_) => 431,
            Rejection::Timeout => 408,
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
}

impl Request {
    /// The request line as the client sent it, without its line end.
    pub fn request_line(&self) -> &[u8] {
        &self.raw.buf[self.request_line.clone()]
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
    if !path.starts_with('/') {
        return Err(Rejection::BadRequest("request target is not a path"));
    }

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
    if !base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|k| k.len() == 16)
    {
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
        raw,
    })
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
                replace("/chat?x=1", "http://example/chat"),
                bad("request target is not a path"),
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
