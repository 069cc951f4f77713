//! WebSocket on the wire, as cheap as it can be made, for the load generator and the upstream:
//! frames built once and stamped in place, an incremental parser that unmasks in place and hands
//! payload out in the pieces it arrived in, a send queue that writes straight to the socket when
//! it can, and the two sides of the opening handshake.
//!
//! The generator masks its frames with the key 0 (a valid key: the payload then goes on the wire
//! unchanged), so that one frame serves every message and only its 8-byte time stamp is rewritten.
//! The proxies under test never look inside frames; the upstream unmasks whatever key it gets.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::client::TlsStream;

use crate::tls;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xa;
const FIN: u8 = 0x80;
/// Largest request or response head either side reads.
const MAX_HEAD: usize = 8192;

/// Now, on CLOCK_MONOTONIC, in nanoseconds: the same clock in the generator and the upstream
/// (one machine), so a stamp written by either can be read by the other.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec for the kernel to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Appends a frame header: FIN, `opcode`, the payload length, and a zero mask key if `masked`.
pub fn put_header(out: &mut Vec<u8>, first: u8, len: usize, masked: bool) {
    let m = if masked { 0x80 } else { 0 };
    out.push(first);
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= 0xffff {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if masked {
        out.extend_from_slice(&[0; 4]);
    }
}

/// One whole frame, built once; its payload's first 8 bytes are a time stamp (when it is at least
/// 8 bytes long), rewritten per message.
pub struct Frame {
    bytes: Vec<u8>,
    payload_at: usize,
}

impl Frame {
    /// A data frame from a client (masked with key 0) or a server (unmasked).
    pub fn new(opcode: u8, payload: &[u8], client: bool) -> Frame {
        let mut bytes = Vec::with_capacity(payload.len() + 14);
        put_header(&mut bytes, FIN | opcode, payload.len(), client);
        let payload_at = bytes.len();
        bytes.extend_from_slice(payload);
        Frame { bytes, payload_at }
    }

    /// A binary frame of `size` bytes of filler.
    pub fn binary(size: usize, client: bool) -> Frame {
        Frame::new(OP_BINARY, &vec![0x5a; size], client)
    }

    pub fn stamp(&mut self, ns: u64) -> &[u8] {
        if self.bytes.len() >= self.payload_at + 8 {
            self.bytes[self.payload_at..self.payload_at + 8].copy_from_slice(&ns.to_le_bytes());
        }
        &self.bytes
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// What the parser found, in order: a frame's start (its first byte: FIN and opcode), its payload
/// in one or more pieces (unmasked), its end.
pub enum Event<'a> {
    Start { first: u8, len: u64 },
    Payload(&'a [u8]),
    End,
}

impl Event<'_> {
    pub fn opcode(first: u8) -> u8 {
        first & 0x0f
    }
}

/// An incremental frame parser: feed it whatever was read; it keeps a partial header between
/// calls and never copies payload.
#[derive(Default)]
pub struct Parser {
    head: [u8; 14],
    head_len: usize,
    /// Payload bytes left in the current frame (None: between frames, reading a header).
    left: Option<u64>,
    mask: [u8; 4],
    masked: bool,
    mask_pos: usize,
}

fn header_size(b: &[u8]) -> Option<usize> {
    if b.len() < 2 {
        return None;
    }
    let ext = match b[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    Some(2 + ext + if b[1] & 0x80 != 0 { 4 } else { 0 })
}

impl Parser {
    pub fn feed(&mut self, mut data: &mut [u8], on: &mut impl FnMut(Event<'_>)) -> Result<()> {
        loop {
            match self.left {
                None => {
                    if data.is_empty() {
                        return Ok(());
                    }
                    // Gather the header (2 to 14 bytes) byte by byte until its size is known.
                    let need = header_size(&self.head[..self.head_len]).unwrap_or(2);
                    let take = (need - self.head_len).min(data.len());
                    self.head[self.head_len..self.head_len + take].copy_from_slice(&data[..take]);
                    self.head_len += take;
                    data = &mut data[take..];
                    let Some(size) = header_size(&self.head[..self.head_len]) else {
                        continue;
                    };
                    if self.head_len < size {
                        continue;
                    }
                    let h = &self.head;
                    let (len, at) = match h[1] & 0x7f {
                        126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
                        127 => (u64::from_be_bytes(h[2..10].try_into().expect("8 bytes")), 10),
                        n => (u64::from(n), 2),
                    };
                    if len > 1 << 40 {
                        bail!("frame of {len} bytes");
                    }
                    self.masked = h[1] & 0x80 != 0;
                    if self.masked {
                        self.mask.copy_from_slice(&h[at..at + 4]);
                    }
                    self.mask_pos = 0;
                    self.head_len = 0;
                    on(Event::Start { first: h[0], len });
                    if len == 0 {
                        on(Event::End);
                    } else {
                        self.left = Some(len);
                    }
                }
                Some(left) => {
                    if data.is_empty() {
                        return Ok(());
                    }
                    let n = (left as usize).min(data.len());
                    let (piece, rest) = data.split_at_mut(n);
                    if self.masked && self.mask != [0; 4] {
                        for b in piece.iter_mut() {
                            *b ^= self.mask[self.mask_pos & 3];
                            self.mask_pos += 1;
                        }
                    }
                    on(Event::Payload(piece));
                    data = rest;
                    if left as usize == n {
                        self.left = None;
                        on(Event::End);
                    } else {
                        self.left = Some(left - n as u64);
                    }
                }
            }
        }
    }
}

/// The first 8 bytes of a message's payload, gathered across pieces: its time stamp.
#[derive(Default, Clone, Copy)]
pub struct StampReader {
    buf: [u8; 8],
    have: usize,
}

impl StampReader {
    pub fn start(&mut self) {
        self.have = 0;
    }

    pub fn take(&mut self, piece: &[u8]) {
        let n = (8 - self.have).min(piece.len());
        self.buf[self.have..self.have + n].copy_from_slice(&piece[..n]);
        self.have += n;
    }

    pub fn stamp(&self) -> Option<u64> {
        (self.have == 8).then(|| u64::from_le_bytes(self.buf))
    }
}

/// A socket's send queue: `push` writes straight to the socket while nothing waits before it, and
/// keeps the rest for `flush` (run by whoever owns the connection) to write when it can. Bytes
/// leave in the order they were pushed. Its buffer's capacity is kept, so a steady load allocates
/// nothing per message.
#[derive(Default)]
pub struct Out {
    pending: RefCell<Vec<u8>>,
    off: Cell<usize>,
    broken: Cell<bool>,
    wake: Notify,
    drained: Notify,
}

impl Out {
    pub fn push(&self, s: &TcpStream, data: &[u8]) {
        if self.broken.get() {
            return;
        }
        let mut p = self.pending.borrow_mut();
        let mut rest = data;
        if p.is_empty() {
            match s.try_write(data) {
                Ok(n) if n == data.len() => return,
                Ok(n) => rest = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.broken.set(true);
                    return;
                }
            }
        }
        p.extend_from_slice(rest);
        self.wake.notify_one();
    }

    /// Marks the queue broken (what the socket's failure would): nothing more is sent.
    pub fn fail(&self) {
        self.broken.set(true);
        self.drained.notify_waiters();
    }

    pub fn queued(&self) -> usize {
        self.pending.borrow().len() - self.off.get()
    }

    pub fn broken(&self) -> bool {
        self.broken.get()
    }

    /// Waits until at most `limit` bytes wait in the queue (or the socket failed).
    pub async fn below(&self, limit: usize) {
        loop {
            let drained = self.drained.notified();
            if self.queued() <= limit || self.broken.get() {
                return;
            }
            drained.await;
        }
    }

    /// Writes what `push` could not, forever (until the socket fails): one task per connection.
    pub async fn flush_forever(&self, s: &TcpStream) {
        loop {
            if self.queued() == 0 {
                self.wake.notified().await;
                continue;
            }
            if s.writable().await.is_err() {
                self.broken.set(true);
                return;
            }
            let r = {
                let p = self.pending.borrow();
                s.try_write(&p[self.off.get()..])
            };
            match r {
                Ok(n) => {
                    let off = self.off.get() + n;
                    let mut p = self.pending.borrow_mut();
                    if off == p.len() {
                        p.clear();
                        self.off.set(0);
                    } else {
                        self.off.set(off);
                    }
                    drop(p);
                    self.drained.notify_waiters();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.broken.set(true);
                    self.drained.notify_waiters();
                    return;
                }
            }
        }
    }
}

/// Reads a head up to its blank line; returns it and whatever was read past it.
async fn read_head(s: &mut (impl AsyncRead + Unpin)) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed during the handshake");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            bail!("head longer than {MAX_HEAD} bytes");
        }
    }
}

/// The client's opening handshake for `path` with `host` in its Host field; returns the bytes read
/// past the 101's head.
pub async fn client_handshake(
    s: &mut (impl AsyncRead + AsyncWrite + Unpin),
    host: &dyn std::fmt::Display,
    path: &str,
) -> Result<Vec<u8>> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    // A TLS stream may hold the records until flushed.
    s.flush().await?;
    let (head, rest) = read_head(s).await?;
    if !head.starts_with(b"HTTP/1.1 101") {
        let line = String::from_utf8_lossy(&head);
        bail!("answer {:?}", line.lines().next().unwrap_or(""));
    }
    Ok(rest)
}

/// Connects and upgrades within `limit`, with TCP_NODELAY.
pub async fn connect(addr: SocketAddr, path: &str, limit: Duration) -> Result<(TcpStream, Vec<u8>)> {
    connect_as(addr, None, path, limit).await
}

/// As `connect`, with `host` in the Host field (`None`: the address).
pub async fn connect_as(
    addr: SocketAddr,
    host: Option<&str>,
    path: &str,
    limit: Duration,
) -> Result<(TcpStream, Vec<u8>)> {
    tokio::time::timeout(limit, async {
        let mut s = TcpStream::connect(addr).await.context("connect")?;
        s.set_nodelay(true)?;
        let rest = match host {
            Some(h) => client_handshake(&mut s, &h, path).await?,
            None => client_handshake(&mut s, &addr, path).await?,
        };
        anyhow::Ok((s, rest))
    })
    .await
    .map_err(|_| anyhow!("handshake timed out after {limit:?}"))?
}

/// As `connect`, over TLS with `tls` (SNI and Host field `tls::SNI`): connect, TLS handshake,
/// upgrade, all within `limit`, with TCP_NODELAY.
pub async fn connect_tls(
    addr: SocketAddr,
    tls: &tls::Client,
    path: &str,
    limit: Duration,
) -> Result<(TlsStream<TcpStream>, Vec<u8>)> {
    tokio::time::timeout(limit, async {
        let s = TcpStream::connect(addr).await.context("connect")?;
        s.set_nodelay(true)?;
        let mut s = tls
            .connector()
            .connect(tls.name.clone(), s)
            .await
            .context("TLS handshake")?;
        let rest = client_handshake(&mut s, &tls::SNI, path).await?;
        anyhow::Ok((s, rest))
    })
    .await
    .map_err(|_| anyhow!("handshake timed out after {limit:?}"))?
}

/// The server's side: reads the request, answers 101; returns the path and the bytes past the head.
pub async fn server_handshake(s: &mut TcpStream) -> Result<(String, Vec<u8>)> {
    let (head, rest) = read_head(s).await?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(&head).context("parsing the request head")?;
    let path = req.path.unwrap_or("/").to_owned();
    let key = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
        .map(|h| h.value)
        .context("no Sec-WebSocket-Key")?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key);
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    s.write_all(resp.as_bytes()).await?;
    Ok((path, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8], piece: usize) -> Vec<(u8, Vec<u8>)> {
        let mut p = Parser::default();
        let mut out: Vec<(u8, Vec<u8>)> = Vec::new();
        let mut data = bytes.to_vec();
        for chunk in data.chunks_mut(piece) {
            p.feed(chunk, &mut |e| match e {
                Event::Start { first, .. } => out.push((first, Vec::new())),
                Event::Payload(b) => out.last_mut().unwrap().1.extend_from_slice(b),
                Event::End => {}
            })
            .unwrap();
        }
        out
    }

    #[test]
    fn frames_of_every_length_class_parse_back_in_any_pieces() {
        let mut wire = Vec::new();
        let mut f = Frame::binary(70_000, true);
        wire.extend_from_slice(f.stamp(42));
        wire.extend_from_slice(Frame::binary(300, false).bytes());
        wire.extend_from_slice(Frame::new(OP_TEXT, b"END", true).bytes());
        wire.extend_from_slice(Frame::new(OP_CLOSE, b"", true).bytes());
        for piece in [1, 3, 7, 1000, 1 << 20] {
            let got = parse_all(&wire, piece);
            assert_eq!(got.len(), 4, "piece {piece}");
            assert_eq!(got[0].0, 0x82);
            assert_eq!(got[0].1.len(), 70_000);
            assert_eq!(u64::from_le_bytes(got[0].1[..8].try_into().unwrap()), 42);
            assert_eq!(got[1].1.len(), 300);
            assert_eq!(got[2], (0x81, b"END".to_vec()));
            assert_eq!(got[3], (0x88, vec![]));
        }
    }

    #[test]
    fn a_real_mask_is_removed() {
        // "Hello" masked with 37 fa 21 3d (RFC 6455, 5.7).
        let wire = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        for piece in [1, 2, 11] {
            assert_eq!(parse_all(&wire, piece), vec![(0x81, b"Hello".to_vec())]);
        }
    }

    #[test]
    fn stamps_gather_across_pieces() {
        let mut r = StampReader::default();
        r.start();
        r.take(&7u64.to_le_bytes()[..3]);
        assert_eq!(r.stamp(), None);
        r.take(&7u64.to_le_bytes()[3..]);
        assert_eq!(r.stamp(), Some(7));
    }
}
