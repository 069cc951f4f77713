//! Bounded reading of an HTTP/1 message head, shared by the client side (request) and the
//! upstream side (response).
//!
//! The read stops as soon as the head is complete; bytes that arrived with it but lie past the
//! head are kept (they are payload and must be relayed, in order, not lost). Parsing is retried
//! only when a read brought a line end, so a client trickling one byte at a time costs one parse
//! per line rather than one per byte.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Why a head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("the head is larger than {0} bytes")]
    TooLarge(usize),
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
    #[error("malformed head: {0}")]
    Malformed(httparse::Error),
    #[error("closed before the head was complete ({0} bytes read)")]
    Closed(usize),
    /// The bytes read before the failure tell "no answer at all" from "failed mid-head".
    #[error("read failed after {read} bytes: {error}")]
    Io { read: usize, error: std::io::Error },
}

/// Result of one parse attempt over the bytes read so far.
pub enum Parsed {
    /// The head ends at this offset.
    Complete(usize),
    Partial,
}

/// A complete head: `buf[..head_len]` is the head, `buf[head_len..]` bytes read past it.
#[derive(Debug)]
pub struct RawHead {
    pub buf: Vec<u8>,
    pub head_len: usize,
}

impl RawHead {
    pub fn head(&self) -> &[u8] {
        &self.buf[..self.head_len]
    }

    pub fn rest(&self) -> &[u8] {
        &self.buf[self.head_len..]
    }
}

/// Reads from `io` until `parse` finds a complete head, never holding more than `max` bytes.
/// The caller bounds the time (a head that never completes is the caller's timeout).
pub async fn read_head<R, P>(io: &mut R, max: usize, parse: P) -> Result<RawHead, HeadError>
where
    R: AsyncRead + Unpin,
    P: FnMut(&[u8]) -> Result<Parsed, HeadError>,
{
    read_head_after(io, Vec::with_capacity(max.min(4096)), max, parse).await
}

/// Like [`read_head`], starting with bytes already read (those behind a previous head).
pub async fn read_head_after<R, P>(io: &mut R, mut buf: Vec<u8>, max: usize, mut parse: P) -> Result<RawHead, HeadError>
where
    R: AsyncRead + Unpin,
    P: FnMut(&[u8]) -> Result<Parsed, HeadError>,
{
    if buf.len() > max {
        return Err(HeadError::TooLarge(max));
    }
    if buf.contains(&b'\n')
        && let Parsed::Complete(head_len) = parse(&buf)?
    {
        return Ok(RawHead { buf, head_len });
    }
    let mut chunk = [0u8; 4096];
    loop {
        let room = max - buf.len();
        if room == 0 {
            return Err(HeadError::TooLarge(max));
        }
        let want = room.min(chunk.len());
        let n = io
            .read(&mut chunk[..want])
            .await
            .map_err(|error| HeadError::Io { read: buf.len(), error })?;
        if n == 0 {
            return Err(HeadError::Closed(buf.len()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if !chunk[..n].contains(&b'\n') {
            continue;
        }
        if let Parsed::Complete(head_len) = parse(&buf)? {
            return Ok(RawHead { buf, head_len });
        }
    }
}

/// Maps httparse's outcome onto [`Parsed`], with the header cap of the caller.
pub fn from_httparse(r: httparse::Result<usize>, max_headers: usize) -> Result<Parsed, HeadError> {
    match r {
        Ok(httparse::Status::Complete(n)) => Ok(Parsed::Complete(n)),
        Ok(httparse::Status::Partial) => Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyHeaders(max_headers)),
        Err(e) => Err(HeadError::Malformed(e)),
    }
}

/// Offset of `part` inside `whole`; `part` must be a sub-slice of it (httparse hands out slices of
/// the buffer it parsed, and the offsets let the head be kept without borrowing it).
pub fn offset_in(whole: &[u8], part: &[u8]) -> usize {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    debug_assert!(start + part.len() <= whole.len());
    start
}

/// True when a comma-separated header value holds `token` (ASCII case-insensitive), as in
/// `Connection: keep-alive, Upgrade`.
pub fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_parser(max_headers: usize) -> impl FnMut(&[u8]) -> Result<Parsed, HeadError> {
        move |b: &[u8]| {
            let mut h = vec![httparse::EMPTY_HEADER; max_headers];
            from_httparse(httparse::Request::new(&mut h).parse(b), max_headers)
        }
    }

    #[tokio::test]
    async fn split_reads_keep_bytes_past_the_head() {
        let (mut w, mut r) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in [&b"GET / HT"[..], b"TP/1.1\r\nHost: a\r", b"\n\r\nPAYLOAD"] {
                w.write_all(piece).await.unwrap();
                w.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            w
        });
        let head = read_head(&mut r, 1024, request_parser(8)).await.unwrap();
        let _w = writer.await.unwrap();
        assert_eq!(head.head(), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        // Whatever arrived with the head is kept; with split reads it may be all or none.
        assert!(b"PAYLOAD".starts_with(head.rest()));
    }

    #[tokio::test]
    async fn head_over_the_cap_is_refused() {
        let data = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(300));
        let mut r = data.as_bytes();
        match read_head(&mut r, 256, request_parser(8)).await {
            Err(HeadError::TooLarge(256)) => {}
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn too_many_headers_and_early_close() {
        let mut data = String::from("GET / HTTP/1.1\r\n");
        for i in 0..9 {
            data.push_str(&format!("H{i}: v\r\n"));
        }
        data.push_str("\r\n");
        let mut r = data.as_bytes();
        assert!(matches!(
            read_head(&mut r, 4096, request_parser(8)).await,
            Err(HeadError::TooManyHeaders(8))
        ));
        let mut r = &b"GET / HTTP/1.1\r\nHost"[..];
        assert!(matches!(
            read_head(&mut r, 4096, request_parser(8)).await,
            Err(HeadError::Closed(20))
        ));
    }

    #[test]
    fn tokens() {
        assert!(has_token(b"keep-alive, Upgrade", "upgrade"));
        assert!(has_token(b"UPGRADE", "upgrade"));
        assert!(!has_token(b"upgraded", "upgrade"));
        assert!(!has_token(b"", "upgrade"));
    }
}
