//! The HTTP/1.1 answers the proxy writes itself, outside hyper: handshake refusals and the admin
//! listener's over-capacity answer. One way to write them, with the reason phrase from the
//! `http` crate's table of status codes (through hyper), never typed by hand.

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
}
