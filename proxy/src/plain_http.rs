//! The HTTP/1.1 answers the proxy writes itself, outside hyper: handshake refusals, the admin
//! listener's over-capacity answer, and an upstream's non-101 answer passed on. One way to write
//! them, with the reason phrase from the `http` crate's table of status codes (through hyper),
//! never typed by hand.

use hyper::StatusCode;

/// A complete answer that closes the connection: the status line, `extra` header lines (each
/// ending in CRLF), a plain-text `body` and its length.
pub fn closing_answer(status: u16, extra: &str, content_type: &str, body: &str) -> Vec<u8> {
    let phrase = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    format!(
        "HTTP/1.1 {status} {phrase}\r\n{extra}Content-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Fields of an upstream's answer that describe its connection to the proxy or its framing, not
/// the answer: replaced by the proxy's own (`Content-Length` of the body passed on, `Connection:
/// close`).
const NOT_PASSED_ON: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// An upstream's non-101 answer as the client gets it: its status and end-to-end fields, the
/// body the proxy read (possibly none), then the connection closes. `None` when `head` does not
/// parse (it did once, so only a bug would get here).
pub fn passed_on(head: &[u8], body: &[u8]) -> Option<Vec<u8>> {
    let mut h = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut h);
    resp.parse(head).ok()?;
    let status = resp.code?;
    let phrase = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    let mut out = format!("HTTP/1.1 {status} {phrase}\r\n").into_bytes();
    for field in resp.headers.iter() {
        if NOT_PASSED_ON.iter().any(|n| field.name.eq_ignore_ascii_case(n)) {
            continue;
        }
        out.extend_from_slice(field.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(field.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("Content-Length: {}\r\nConnection: close\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phrases_come_from_the_table_and_the_length_is_the_body_s() {
        for (status, phrase) in [
            (400, "Bad Request"),
            (408, "Request Timeout"),
            (426, "Upgrade Required"),
            (429, "Too Many Requests"),
            (431, "Request Header Fields Too Large"),
            (503, "Service Unavailable"),
        ] {
            let answer = String::from_utf8(closing_answer(status, "Retry-After: 1\r\n", "text/plain", "no\n")).unwrap();
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} {phrase}\r\nRetry-After: 1\r\n")),
                "{answer}"
            );
            assert!(
                answer.ends_with("Content-Length: 3\r\nConnection: close\r\n\r\nno\n"),
                "{answer}"
            );
        }
    }

    #[test]
    fn an_upstream_answer_is_passed_on_without_its_connection_fields() {
        let head = b"HTTP/1.1 403 Nope\r\nContent-Type: text/plain\r\nConnection: keep-alive\r\n\
                     Content-Length: 7\r\nSet-Cookie: a=1\r\nKeep-Alive: timeout=5\r\n\r\n";
        let out = String::from_utf8(passed_on(head, b"denied\n").unwrap()).unwrap();
        assert_eq!(
            out,
            "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nSet-Cookie: a=1\r\n\
             Content-Length: 7\r\nConnection: close\r\n\r\ndenied\n"
        );
        let chunked = b"HTTP/1.1 302 Found\r\nLocation: /login\r\nTransfer-Encoding: chunked\r\n\r\n";
        let out = String::from_utf8(passed_on(chunked, b"").unwrap()).unwrap();
        assert!(
            out.starts_with("HTTP/1.1 302 Found\r\nLocation: /login\r\nContent-Length: 0\r\n"),
            "{out}"
        );
        assert!(passed_on(b"junk", b"").is_none());
    }
}
