//! Helpers of the relay tests (`kernel_relay.rs`, `kernel_memory.rs`): a proxy whose relay mode
//! is chosen and whose state the test can inspect ([`RelayProxy`], on `wsproxy::Server`), a raw
//! upstream ([`Hub`]) that hands every proxied connection to the test that opened it, a byte
//! pattern any reader can check at any offset, and socket and host inspection (TCP state, socket
//! fds, the proxy's socket memory and buffers from `ss`, `/proc/meminfo`).
//!
//! Privileged tests call [`RelayProxy::start`]; it returns `None` after [`kernel_unavailable`]
//! when the mode needs the kernel relay and it cannot load here.

use std::collections::HashMap;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{DEADLINE, Proxy, client_ip, connect_from, find, header, read_head, request, status, within};

// ---- skipping ----

/// The kernel relay cannot run here: with `CI=true` that fails the test; otherwise the test is
/// reported as skipped on the real stderr (libtest hides `eprintln!` of passing tests) and the
/// caller returns.
pub fn kernel_unavailable(reason: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("kernel relay unavailable (and CI=true): {reason}");
    }
    say(&format!("SKIPPED: kernel relay unavailable: {reason}"));
}

/// One line straight to the process's stderr, past libtest's capture: figures the lead quotes.
pub fn say(line: &str) {
    let mut e = io::stderr().lock();
    let _ = writeln!(e, "{line}");
    let _ = e.flush();
}

// ---- the proxy ----

/// Limits out of the way: these tests are about the relay.
const LIMITS: &str = "[limits]\nrequests_per_second = 1000000.0\nburst = 1000000\nmax_connections_per_ip = 0\n";

/// A proxy ([`Proxy`], which it dereferences to) on 127.0.0.1 with one upstream, a [`Hub`].
pub struct RelayProxy {
    proxy: Proxy,
    pub hub: Hub,
}

impl std::ops::Deref for RelayProxy {
    type Target = Proxy;

    fn deref(&self) -> &Proxy {
        &self.proxy
    }
}

impl RelayProxy {
    /// A proxy with `[relay] mode = "<mode>"` plus the `relay` lines, in front of a new hub.
    /// `None` (after [`kernel_unavailable`]) when the mode is `kernel` or `auto` and the kernel
    /// relay is not loaded.
    pub async fn start(mode: &str, relay: &str) -> Option<RelayProxy> {
        Self::start_with(mode, relay, Hub::start().await).await
    }

    pub async fn start_with(mode: &str, relay: &str, hub: Hub) -> Option<RelayProxy> {
        let text = format!(
            "{LIMITS}[relay]\nmode = \"{mode}\"\n{relay}\n[upstreams]\nmain = [{{ address = \"{}\" }}]\ntimeout = \"20s\"\n",
            hub.addr
        );
        let config = wsproxy::Config::parse(&text, "relay test config").unwrap_or_else(|e| panic!("{e}"));
        let server = server_in_mode(config, mode, mode != "userspace")?;
        let listener = wsproxy::listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        Some(RelayProxy {
            proxy: Proxy::serve(server, listener),
            hub,
        })
    }

    /// Connects a client (from a loopback address derived from `id`) and sends the request for
    /// `/c/<id>`; the receiver gets the upstream end once the proxy's request reached the hub.
    pub async fn request(&self, id: u64) -> (TcpStream, oneshot::Receiver<Accepted>) {
        let accepted = self.hub.expect(id);
        let mut client = connect_from(client_ip((id % 60_000) as u32 + 1), self.addr).await;
        client.write_all(request(&format!("/c/{id}")).as_bytes()).await.unwrap();
        (client, accepted)
    }

    /// A relayed connection: client and upstream ends, both right after the 101 (the upstream
    /// wrote nothing behind it and the client sent nothing behind its request).
    pub async fn open(&self, id: u64) -> (TcpStream, TcpStream) {
        let (mut client, accepted) = self.request(id).await;
        let mut up = Accepted::wait(accepted).await;
        assert!(up.rest.is_empty(), "bytes behind the forwarded request: {:?}", up.rest);
        up.stream
            .write_all(upgrade_response(&up.head).as_bytes())
            .await
            .unwrap();
        let head = read_head(&mut client).await;
        assert_eq!(status(&head), 101, "{head:?}");
        (client, up.stream)
    }

    /// [`open`](Self::open), then one byte each way (client first), read by the other side: the
    /// relay has taken the pair before either side can send a FIN. (A peer that half-closes in
    /// the instant between the 101 and the insertion leaves a socket the socket map refuses,
    /// and the pair goes to the userspace relay as a fallback.) The relay totals count these
    /// two bytes.
    pub async fn open_relayed(&self, id: u64) -> (TcpStream, TcpStream) {
        let (mut c, mut u) = self.open(id).await;
        first_byte_each_way(&mut c, &mut u).await;
        (c, u)
    }

    /// Waits (polling, bounded) until no connection is relayed: the kernel maps are empty and
    /// no relay is open. Returns the final totals.
    pub async fn wait_idle(&self) -> wsproxy::relay::TotalsSnapshot {
        let idle = || {
            let t = self.server.totals();
            (t.open == [0, 0] && self.server.kernel_map_entries().is_none_or(|e| e == (0, 0, 0))).then_some(())
        };
        poll_until(DEADLINE, idle).await.unwrap_or_else(|| {
            panic!(
                "relay not idle after {DEADLINE:?}: totals {:?}, maps {:?}",
                self.server.totals(),
                self.server.kernel_map_entries()
            )
        });
        // Read again once idle: the snapshot that found no connection open may have read the
        // counts before it read the open gauges, which a connection's end lowers last.
        self.server.totals()
    }

    /// Stops accepting, closes what is still open and waits until `serve` returned.
    pub async fn stop(self) {
        self.proxy.stop().await;
    }
}

/// One byte each way (client first), each read by the other side: once both arrived, the relay
/// has taken the pair (see [`RelayProxy::open_relayed`]).
pub async fn first_byte_each_way(c: &mut TcpStream, u: &mut TcpStream) {
    let mut b = [0u8; 1];
    c.write_all(b"c").await.unwrap();
    within("the client's first byte", u.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"c");
    u.write_all(b"u").await.unwrap();
    within("the upstream's first byte", c.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"u");
}

/// The server of `config`, whose relay mode is `mode`; `None` (after [`kernel_unavailable`])
/// when it cannot be built, or when `kernel_required` and it runs without the kernel relay.
pub fn server_in_mode(config: wsproxy::Config, mode: &str, kernel_required: bool) -> Option<wsproxy::Server> {
    let server = match wsproxy::Server::new(config) {
        Ok(s) => s,
        Err(e) => {
            assert_ne!(mode, "userspace", "the userspace relay must always start: {e:#}");
            kernel_unavailable(&format!("{e:#}"));
            return None;
        }
    };
    if kernel_required && !server.kernel_relay() {
        kernel_unavailable(&format!("relay.mode = \"{mode}\" started without the kernel relay"));
        return None;
    }
    Some(server)
}

// ---- the upstream ----

/// The upstream end of one proxied connection, before the upstream answered.
pub struct Accepted {
    pub stream: TcpStream,
    /// The forwarded request head.
    pub head: String,
    /// Bytes that came behind the head.
    pub rest: Vec<u8>,
}

impl Accepted {
    pub async fn wait(rx: oneshot::Receiver<Accepted>) -> Accepted {
        within("the proxy's request to reach the upstream", rx)
            .await
            .expect("the hub dropped the connection")
    }
}

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Accepted>>>>;

/// A raw upstream: reads each forwarded request head and hands the connection, unanswered, to
/// whoever expects its id (the path `/c/<id>`).
pub struct Hub {
    pub addr: SocketAddr,
    waiting: Waiting,
    task: JoinHandle<()>,
}

impl Hub {
    pub async fn start() -> Hub {
        Self::on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// A hub whose accepted sockets have a fixed receive buffer of `bytes` (set on the listener,
    /// inherited by accepted sockets; a set buffer is not autotuned).
    pub fn with_rcvbuf(bytes: u32) -> Hub {
        let s = TcpSocket::new_v4().unwrap();
        s.set_recv_buffer_size(bytes).unwrap();
        s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        Self::on(s.listen(1024).unwrap())
    }

    pub fn on(listener: TcpListener) -> Hub {
        let addr = listener.local_addr().unwrap();
        let waiting: Waiting = Arc::default();
        let w = Arc::clone(&waiting);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(hand_over(stream, Arc::clone(&w)));
            }
        });
        Hub { addr, waiting, task }
    }

    /// The connection whose request asks for `/c/<id>` goes to the returned receiver.
    pub fn expect(&self, id: u64) -> oneshot::Receiver<Accepted> {
        let (tx, rx) = oneshot::channel();
        assert!(
            self.waiting.lock().unwrap().insert(id, tx).is_none(),
            "id {id} opened twice"
        );
        rx
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hand_over(mut stream: TcpStream, waiting: Waiting) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_len = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
        assert!(buf.len() < 64 * 1024, "no end of the forwarded head");
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let id = head
        .split_whitespace()
        .nth(1)
        .and_then(|path| path.strip_prefix("/c/"))
        .and_then(|id| id.parse::<u64>().ok());
    let Some(tx) = id.and_then(|id| waiting.lock().unwrap().remove(&id)) else {
        return;
    };
    let _ = tx.send(Accepted {
        stream,
        head,
        rest: buf[head_len..].to_vec(),
    });
}

/// A valid 101 for a forwarded request head.
pub fn upgrade_response(head: &str) -> String {
    let accept = wsproxy::upstream::accept_key(&header(head, "sec-websocket-key").expect("no key in the request"));
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )
}

// ---- byte pattern ----

/// Period of the pattern: a prime, so that no power-of-two chunking lines up with it.
pub const PERIOD: usize = 1_048_573;

/// Two periods of xorshift bytes: any window of up to one period is one contiguous slice.
static PATTERN: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut v = vec![0u8; PERIOD];
    let mut rng = Rng::new(0x05ee_d0fb_17e5);
    for c in v.chunks_mut(8) {
        c.copy_from_slice(&rng.next().to_le_bytes()[..c.len()]);
    }
    v.extend_from_within(..);
    v
});

/// Bytes `offset..` of stream `seed`, at most `max` of them (and at most one period). Byte `i`
/// of stream `seed` is `PATTERN[(seed + i) % PERIOD]`.
pub fn pattern(seed: u64, offset: u64, max: usize) -> &'static [u8] {
    let p = PERIOD as u64;
    let start = ((seed % p + offset % p) % p) as usize;
    &PATTERN[start..start + max.min(PERIOD)]
}

/// Writes bytes `0..len` of stream `seed` in chunks of up to `chunk` bytes.
pub async fn write_pattern<W: AsyncWrite + Unpin>(w: &mut W, seed: u64, len: u64, chunk: usize) -> io::Result<()> {
    let mut sent = 0u64;
    while sent < len {
        let piece = pattern(seed, sent, chunk.min((len - sent) as usize));
        w.write_all(piece).await?;
        sent += piece.len() as u64;
    }
    Ok(())
}

/// Writes stream `seed` on `s` until told to `stop` or a write fails, counting the bytes written
/// in `sent` (a test watches it grow or stall); returns the stream and the outcome.
pub fn pump(
    mut s: TcpStream,
    seed: u64,
    sent: Arc<std::sync::atomic::AtomicU64>,
    mut stop: oneshot::Receiver<()>,
) -> JoinHandle<(TcpStream, io::Result<()>)> {
    use std::sync::atomic::Ordering::Relaxed;
    tokio::spawn(async move {
        let r = loop {
            let off = sent.load(Relaxed);
            tokio::select! {
                biased;
                _ = &mut stop => break Ok(()),
                r = s.write(pattern(seed, off, 256 * 1024)) => match r {
                    Ok(n) => { sent.fetch_add(n as u64, Relaxed); }
                    Err(e) => break Err(e),
                },
            }
        };
        (s, r)
    })
}

/// How a received stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// Clean EOF.
    Eof,
    /// A read failed (a reset).
    Error(io::ErrorKind),
    /// Byte `at` differs from the pattern (loss, reordering or corruption). `from`: where in
    /// the stream the bytes found at `at` belong (searched up to the reader's limit; `None` if
    /// not found there): beyond `at`, bytes were lost; before it, bytes came again. `bytes`: the
    /// first (up to 32) bytes found at `at`.
    Mismatch { at: u64, from: Option<u64>, bytes: Vec<u8> },
    /// More than the limit arrived.
    Overflow,
    /// `stop_at` bytes were read (no EOF looked for).
    Stopped,
}

/// What a reader got of stream `seed`: `len` bytes, all equal to the pattern, then `end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub len: u64,
    pub end: StreamEnd,
}

/// Reads stream `seed` and checks every byte against the pattern, until EOF, an error, a
/// mismatch, more than `limit` bytes, or (with `stop_at`) exactly that many bytes.
pub async fn read_pattern<R: AsyncRead + Unpin>(r: &mut R, seed: u64, limit: u64, stop_at: Option<u64>) -> Received {
    read_pattern_from(r, seed, 0, limit, stop_at).await
}

/// [`read_pattern`] for a reader that already has bytes `0..from` of the stream: `len` counts
/// from 0, so the result reads as for the whole stream.
pub async fn read_pattern_from<R: AsyncRead + Unpin>(
    r: &mut R,
    seed: u64,
    from: u64,
    limit: u64,
    stop_at: Option<u64>,
) -> Received {
    let mut buf = vec![0u8; 256 * 1024];
    let mut len = from;
    loop {
        if stop_at == Some(len) {
            return Received {
                len,
                end: StreamEnd::Stopped,
            };
        }
        let want = stop_at.map_or(buf.len() as u64, |s| (s - len).min(buf.len() as u64)) as usize;
        let n = match r.read(&mut buf[..want]).await {
            Ok(0) => {
                return Received {
                    len,
                    end: StreamEnd::Eof,
                };
            }
            Ok(n) => n,
            Err(e) => {
                return Received {
                    len,
                    end: StreamEnd::Error(e.kind()),
                };
            }
        };
        if let Some(at) = first_difference(seed, len, &buf[..n]) {
            let here = &buf[(at - len) as usize..n];
            let from = (here.len() >= 16)
                .then(|| (0..=limit.min(64 << 20)).find(|&o| pattern(seed, o, 16) == &here[..16]))
                .flatten();
            let bytes = here[..here.len().min(32)].to_vec();
            return Received {
                len: at,
                end: StreamEnd::Mismatch { at, from, bytes },
            };
        }
        len += n as u64;
        if len > limit {
            return Received {
                len,
                end: StreamEnd::Overflow,
            };
        }
    }
}

/// Offset (in the stream) of the first byte of `got` that differs from stream `seed` at `offset`.
pub fn first_difference(seed: u64, offset: u64, got: &[u8]) -> Option<u64> {
    let mut done = 0usize;
    while done < got.len() {
        let want = pattern(seed, offset + done as u64, got.len() - done);
        let have = &got[done..done + want.len()];
        if have != want {
            let i = have.iter().zip(want).position(|(a, b)| a != b).unwrap();
            return Some(offset + (done + i) as u64);
        }
        done += want.len();
    }
    None
}

// ---- randomness ----

/// xorshift64*: a fixed-seed generator, so every run drives the same sizes and orders.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Mix the seed so that neighbouring seeds give unrelated streams; never zero.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

// ---- sockets ----

/// `tcpi_state` values (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
}

/// The socket's `TCP_INFO`.
pub fn tcp_info(s: &impl AsRawFd) -> libc::tcp_info {
    // SAFETY: tcp_info is plain old data; zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid fd and an out-buffer of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", io::Error::last_os_error());
    info
}

/// The socket's TCP state (`tcp_state::*`).
pub fn state(s: &impl AsRawFd) -> u8 {
    tcp_info(s).tcpi_state
}

/// The socket's pending error (`SO_ERROR`), 0 if none. Reading it clears it.
pub fn so_error(s: &impl AsRawFd) -> i32 {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid fd and an out-buffer of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut err).cast(),
            &raw mut len,
        )
    };
    assert_eq!(rc, 0, "SO_ERROR: {}", io::Error::last_os_error());
    err
}

/// How the stream read from `s` really ended, for a socket that writes too and has not shut
/// its own side down. Its failed write can take the reset's pending error (ECONNRESET) before
/// the read does, and the read then finds only the closed receive side: EOF. Such a socket is in
/// TCP_CLOSE only after a reset (after a FIN it waits in CLOSE_WAIT), so that tells them apart.
pub fn reset_read_as_eof(s: &impl AsRawFd, got: Received) -> Received {
    match got.end {
        StreamEnd::Eof if state(s) == tcp_state::CLOSE => Received {
            end: StreamEnd::Error(io::ErrorKind::ConnectionReset),
            ..got
        },
        _ => got,
    }
}

/// Bytes in the socket's send queue not yet acknowledged (`SIOCOUTQ`).
pub fn outq(s: &impl AsRawFd) -> u64 {
    let mut n: libc::c_int = 0;
    // SAFETY: a valid fd and an out-pointer to a c_int.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &raw mut n) };
    assert_eq!(rc, 0, "SIOCOUTQ: {}", io::Error::last_os_error());
    n.max(0) as u64
}

/// Makes the socket's close send a reset (`SO_LINGER` 0); closing it is up to the caller.
pub fn linger_zero(s: &impl AsRawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid fd and an in-buffer of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
}

/// Resets the connection: `SO_LINGER` 0, then close.
pub fn reset(s: TcpStream) {
    linger_zero(&s);
    drop(s);
}

/// A raw fd is enough for `tcp_info`/`state` on a socket the caller keeps open.
pub struct Fd(pub RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Open socket fds of this process (entries of /proc/self/fd that link to `socket:[...]`).
pub fn socket_fds() -> usize {
    socket_inodes().len()
}

/// The inodes of this process's open sockets (`socket:[inode]` links in /proc/self/fd). A socket
/// keeps its inode for life, so the inodes opened after a point are exactly the new ones.
pub fn socket_inodes() -> std::collections::BTreeSet<u64> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let l = std::fs::read_link(e.path()).ok()?;
            l.to_string_lossy()
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

// ---- host ----

/// A field of /proc/meminfo, in bytes.
pub fn meminfo(field: &str) -> u64 {
    crate::hardening_kit::kib_field_bytes("/proc/meminfo", field)
}

/// Memory charged to TCP sockets host-wide, in bytes (`TCP: ... mem <pages>` of
/// /proc/net/sockstat). Bytes the sockmap redirects and queues are not charged here.
pub fn tcp_socket_memory() -> u64 {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .expect("no TCP line in /proc/net/sockstat");
    let mut f = line.split_whitespace();
    let pages: u64 = f
        .by_ref()
        .skip_while(|w| *w != "mem")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// The maximum (third value) of a `min default max` sysctl such as net/ipv4/tcp_rmem.
pub fn sysctl_max(path: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/sys/{path}")).unwrap();
    text.split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("{path}: {text:?}"))
        .parse()
        .unwrap()
}

// ---- waiting ----

/// Polls `f` every millisecond until it returns `Some`, for at most `limit`; `None` at the limit.
/// Bounded in time and in count.
pub async fn poll_until<T>(limit: Duration, f: impl FnMut() -> Option<T>) -> Option<T> {
    poll_every(limit, Duration::from_millis(1), f).await
}

/// Like [`poll_until`], every `every`: for a check that costs more than a glance (it reads a
/// large /proc directory, say).
pub async fn poll_every<T>(limit: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    poll_every_async(limit, every, || std::future::ready(f())).await
}

/// Like [`poll_every`], for a check that is itself asynchronous (an HTTP request): no state the
/// test waits on raises an event it could wait for instead.
pub async fn poll_every_async<T, F: Future<Output = Option<T>>>(
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> F,
) -> Option<T> {
    let start = Instant::now();
    let max_polls = (limit.as_micros() / every.as_micros().max(1)) as u64 * 2 + 10;
    for _ in 0..max_polls {
        if let Some(v) = f().await {
            return Some(v);
        }
        if start.elapsed() >= limit {
            break;
        }
        tokio::time::sleep(every).await;
    }
    f().await
}

/// Like [`poll_every`], on a blocking test's own thread.
pub fn poll_every_blocking<T>(limit: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    let max_polls = (limit.as_micros() / every.as_micros().max(1)) as u64 * 2 + 10;
    for _ in 0..max_polls {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= limit {
            break;
        }
        std::thread::sleep(every);
    }
    f()
}

/// Polls until `count` stops growing for 100 ms (a stalled sender), bounded by [`DEADLINE`];
/// returns the count then.
pub async fn wait_stalled(count: &std::sync::atomic::AtomicU64, what: &str) -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    let start = Instant::now();
    let (mut last, mut quiet) = (u64::MAX, 0);
    for _ in 0..2000 {
        let now = count.load(Relaxed);
        if now == last && now > 0 {
            quiet += 1;
            if quiet >= 10 {
                return now;
            }
        } else {
            (last, quiet) = (now, 0);
        }
        assert!(start.elapsed() < DEADLINE, "{what}: never stalled ({now} bytes)");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: never stalled");
}

/// Polls until the socket's TCP state is `want`; returns the time it took, or `None` at `limit`.
pub async fn wait_state(s: &impl AsRawFd, want: u8, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    poll_until(limit, || (state(s) == want).then(|| start.elapsed())).await
}

/// Kernel memory of a set of sockets, from `ss -m` (skmem): bytes in receive queues (`r`), in
/// send queues (`w`) and reserved ahead for them (`f`).
#[derive(Debug, Default, Clone)]
pub struct SkMem {
    pub sockets: u64,
    pub rmem: i64,
    pub wmem: i64,
    pub fwd: i64,
    /// Each socket's send buffer (`tb`), in `ss`'s order.
    pub sndbufs: Vec<u64>,
}

impl SkMem {
    pub fn total(&self) -> u64 {
        (self.rmem + self.wmem + self.fwd).max(0) as u64
    }
}

/// The proxy's own relayed sockets: those on its listening port, and those to the hub.
pub fn proxy_skmem(p: &RelayProxy) -> SkMem {
    let filter = format!("( sport = :{} or dport = :{} )", p.addr.port(), p.hub.addr.port());
    let out = std::process::Command::new("ss")
        .args(["-tmnH", "state", "established", &filter])
        .output()
        .expect("ss (iproute2) is needed to read socket memory");
    assert!(out.status.success(), "ss: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut m = SkMem::default();
    for sk in text.split("skmem:(").skip(1) {
        let fields = sk.split(')').next().unwrap_or("");
        m.sockets += 1;
        for f in fields.split(',') {
            let digits = f.trim_start_matches(|c: char| c.is_ascii_alphabetic());
            // ss prints the kernel's signed ints as unsigned.
            let v = i64::from(digits.parse::<u64>().unwrap_or(0) as u32 as i32);
            match &f[..f.len() - digits.len()] {
                "r" => m.rmem += v,
                "w" => m.wmem += v,
                // Memory charged beyond a socket's reserve is in its queues already.
                "f" => m.fwd += v.max(0),
                "tb" => m.sndbufs.push(v.max(0) as u64),
                _ => {}
            }
        }
    }
    m
}

/// This process's sockets, one line each: the TCP ones with their addresses and state (from
/// /proc/net/tcp and tcp6), for failure messages about leaked sockets.
pub fn socket_table() -> Vec<String> {
    let mut tcp = HashMap::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(file).unwrap_or_default().lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 {
                tcp.insert(
                    f[9].to_string(),
                    format!("{} -> {} state {}", hex_addr(f[1]), hex_addr(f[2]), f[3]),
                );
            }
        }
    }
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let link = std::fs::read_link(e.path()).ok()?.to_string_lossy().into_owned();
            let inode = link.strip_prefix("socket:[")?.strip_suffix(']')?.to_string();
            let fd = e.file_name().to_string_lossy().into_owned();
            Some(format!(
                "fd {fd}: {}",
                tcp.get(&inode)
                    .cloned()
                    .unwrap_or_else(|| format!("socket {inode} (not TCP)"))
            ))
        })
        .collect()
}

/// "0100007F:1F90" -> "127.0.0.1:8080" (IPv4; IPv6 addresses are left in hex).
fn hex_addr(a: &str) -> String {
    let Some((ip, port)) = a.split_once(':') else {
        return a.to_string();
    };
    let port = u16::from_str_radix(port, 16).unwrap_or(0);
    match u32::from_str_radix(ip, 16) {
        Ok(v) if ip.len() == 8 => format!("{}:{port}", std::net::Ipv4Addr::from(v.swap_bytes())),
        _ => format!("[{ip}]:{port}"),
    }
}
