//! Hostile input at the edge, as a table: one row per case, each with the answer the proxy must
//! give (a status, "closed without answer", or 101) and the number of request heads the upstream
//! may see; after every row an honest client must still get a working WebSocket echo through the
//! same proxy. The table of case → observed answer goes to stderr, straight to the handle, for
//! quoting.
//!
//! One proxy (`wsproxy::Server`, userspace relay, `header_timeout = "1s"`) serves every row. It
//! has two upstreams: the echo server ([`echo_upstream`]) and a scripted recorder whose answer each
//! row sets. The hostile client's address hashes to the recorder, the honest client's to the echo
//! server, so the recorder sees exactly what hostile clients get forwarded, and nothing else.
//! The recorder reports each request head before it answers, so when the client has its answer
//! every head forwarded for that row is already counted.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wsproxy::balance::Balancer;
use wsproxy_tests::relay_kit::{poll_until, say};
use wsproxy_tests::*;

// ---- the proxy and its upstreams ----

/// Limits out of the way (no row is about them), a short head timeout for the slow client, the
/// userspace relay, and health checks that never take the recorder out of rotation.
fn config_text(echo: SocketAddr, recorder: SocketAddr) -> String {
    format!(
        "[listen]\ndrain_timeout = \"2s\"\n\
         [limits]\nrequests_per_second = 1000000.0\nburst = 1000000\nmax_connections_per_ip = 0\n\
         [handshake]\nheader_timeout = \"1s\"\nmax_head_bytes = 16384\nmax_headers = 100\n\
         [relay]\nmode = \"userspace\"\n\
         [upstreams]\nmain = [{{ address = \"{echo}\" }}, {{ address = \"{recorder}\" }}]\n\
         timeout = \"2s\"\nmax_head_bytes = 16384\n\
         [upstreams.health]\nmax_fails = 1000000\n"
    )
}

/// What the recorder does with the next connections.
#[derive(Clone)]
enum Act {
    /// A valid 101, then keep every byte that comes until the proxy's FIN (no echo).
    Upgrade,
    /// This answer (`{accept}` replaced by the right accept value), then keep what comes.
    Answer(String),
    /// These bytes, then close at once.
    AnswerAndClose(String),
    /// Close without a byte.
    Close,
    /// Reset (`SO_LINGER` 0, close) without a byte.
    Reset,
    /// A valid 101, then write as much as the proxy takes, never reading.
    Flood,
}

enum Ev {
    /// A request head arrived (sent before the recorder answers).
    Head { id: u64, head: Vec<u8> },
    /// A flooding write has not completed for [`STALL`]: the proxy holds the flood back.
    Stalled { id: u64, written: u64 },
    /// The connection ended; `rest`: every byte received after the head.
    Done { id: u64, rest: Vec<u8> },
}

/// A write pending this long counts as held back.
const STALL: Duration = Duration::from_millis(300);
/// A flood that gets this far was not held back.
const FLOOD_MAX: u64 = 256 << 20;

struct Recorder {
    addr: SocketAddr,
    act: Arc<Mutex<Act>>,
    events: tokio::sync::Mutex<Events>,
}

struct Events {
    rx: mpsc::UnboundedReceiver<Ev>,
    done: HashMap<u64, Vec<u8>>,
    stalled: HashMap<u64, u64>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let act = Arc::new(Mutex::new(Act::Upgrade));
        let (tx, rx) = mpsc::unbounded_channel();
        let a = Arc::clone(&act);
        tokio::spawn(async move {
            let mut id = 0;
            while let Ok((s, _)) = listener.accept().await {
                id += 1;
                let act = a.lock().unwrap().clone();
                tokio::spawn(record(s, id, act, tx.clone()));
            }
        });
        let events = Events {
            rx,
            done: HashMap::new(),
            stalled: HashMap::new(),
        };
        Recorder {
            addr,
            act,
            events: tokio::sync::Mutex::new(events),
        }
    }
}

impl Events {
    fn sort(&mut self, ev: Ev, heads: &mut Vec<(u64, Vec<u8>)>) {
        match ev {
            Ev::Head { id, head } => heads.push((id, head)),
            Ev::Stalled { id, written } => {
                self.stalled.insert(id, written);
            }
            Ev::Done { id, rest } => {
                self.done.insert(id, rest);
            }
        }
    }

    /// The request heads reported so far and not yet taken.
    fn take_heads(&mut self) -> Vec<(u64, Vec<u8>)> {
        let mut heads = Vec::new();
        while let Ok(ev) = self.rx.try_recv() {
            self.sort(ev, &mut heads);
        }
        heads
    }

    /// Waits (bounded) for the next request head.
    async fn next_head(&mut self) -> Option<(u64, Vec<u8>)> {
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            let ev = tokio::time::timeout_at(end, self.rx.recv()).await.ok()??;
            let mut heads = Vec::new();
            self.sort(ev, &mut heads);
            if let Some(h) = heads.pop() {
                return Some(h);
            }
        }
    }

    /// Waits (bounded) until connection `id` ended; its bytes after the head.
    async fn done(&mut self, id: u64) -> Option<Vec<u8>> {
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(rest) = self.done.remove(&id) {
                return Some(rest);
            }
            let ev = tokio::time::timeout_at(end, self.rx.recv()).await.ok()??;
            let mut heads = Vec::new();
            self.sort(ev, &mut heads);
            assert!(
                heads.is_empty(),
                "a request head arrived while waiting for connection {id} to end"
            );
        }
    }

    /// Waits (bounded) until connection `id`'s flood is held back; the bytes it got out.
    async fn stalled(&mut self, id: u64) -> Option<u64> {
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(w) = self.stalled.get(&id) {
                return Some(*w);
            }
            if self.done.contains_key(&id) {
                return None;
            }
            let ev = tokio::time::timeout_at(end, self.rx.recv()).await.ok()??;
            let mut heads = Vec::new();
            self.sort(ev, &mut heads);
        }
    }
}

async fn record(mut s: TcpStream, id: u64, act: Act, tx: mpsc::UnboundedSender<Ev>) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let head_len = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
        match s.read(&mut chunk).await {
            Ok(n) if n > 0 && buf.len() < (1 << 20) => buf.extend_from_slice(&chunk[..n]),
            _ => {
                let _ = tx.send(Ev::Done { id, rest: buf });
                return;
            }
        }
    };
    let head = buf[..head_len].to_vec();
    let mut rest = buf[head_len..].to_vec();
    let key = header(&String::from_utf8_lossy(&head), "sec-websocket-key").unwrap_or_default();
    let accept = wsproxy::upstream::accept_key(&key);
    let _ = tx.send(Ev::Head { id, head });
    let upgrade = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    match act {
        Act::Upgrade => {
            if s.write_all(upgrade.as_bytes()).await.is_ok() {
                keep(&mut s, &mut rest, &mut chunk).await;
            }
        }
        Act::Answer(text) => {
            if s.write_all(text.replace("{accept}", &accept).as_bytes()).await.is_ok() {
                keep(&mut s, &mut rest, &mut chunk).await;
            }
        }
        Act::AnswerAndClose(text) => {
            let _ = s.write_all(text.replace("{accept}", &accept).as_bytes()).await;
        }
        Act::Close => {}
        Act::Reset => {
            wsproxy_tests::relay_kit::reset(s);
            let _ = tx.send(Ev::Done { id, rest });
            return;
        }
        Act::Flood => {
            if s.write_all(upgrade.as_bytes()).await.is_ok() {
                flood(&mut s, id, &tx).await;
            }
        }
    }
    let _ = tx.send(Ev::Done { id, rest });
}

/// Reads until EOF or error, keeping at most 1 MiB.
async fn keep(s: &mut TcpStream, rest: &mut Vec<u8>, chunk: &mut [u8]) {
    while let Ok(n) = s.read(chunk).await {
        if n == 0 || rest.len() > (1 << 20) {
            break;
        }
        rest.extend_from_slice(&chunk[..n]);
    }
}

/// Writes until a write fails (the proxy let go of the connection) or [`FLOOD_MAX`] bytes; reports
/// the first write that stays pending for [`STALL`].
async fn flood(s: &mut TcpStream, id: u64, tx: &mpsc::UnboundedSender<Ev>) {
    let buf = vec![0x5a; 64 * 1024];
    let (mut written, mut stalled) = (0u64, false);
    while written < FLOOD_MAX {
        let w = if stalled {
            Ok(s.write(&buf).await)
        } else {
            tokio::time::timeout(STALL, s.write(&buf)).await
        };
        match w {
            Ok(Ok(n)) if n > 0 => written += n as u64,
            Ok(_) => return,
            Err(_) => {
                stalled = true;
                let _ = tx.send(Ev::Stalled { id, written });
            }
        }
    }
}

// ---- the catalogue ----

/// The answer to a hostile client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    Status(u16),
    /// The proxy closed (FIN or reset) without sending a byte.
    Closed,
    /// Bytes that are no HTTP response head.
    Garbage,
    /// Neither an answer nor a close within the deadline.
    Nothing,
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Status(s) => write!(f, "{s}"),
            Answer::Closed => f.write_str("closed without answer"),
            Answer::Garbage => f.write_str("garbage"),
            Answer::Nothing => f.write_str("no answer, not closed"),
        }
    }
}

/// What one row observed.
struct Observed {
    answer: Answer,
    /// The reason line of a refusal, timings, and what the upstream got.
    detail: String,
    /// Request heads the recorder saw during the row.
    heads: usize,
    problems: Vec<String>,
}

type BoxFut = Pin<Box<dyn Future<Output = Observed> + Send>>;
/// A check of the head and the bytes after it that the recorder received (one connection):
/// what was right about them, or what was wrong.
type Check = fn(&Ctx, &[u8], &[u8]) -> Result<String, String>;

enum Case {
    /// The hostile client sends these bytes (then a FIN when `fin`), the recorder acts so, and
    /// the answer is read; with a recorder head, `check` (default: nothing came after the head).
    Send {
        bytes: Vec<u8>,
        act: Act,
        fin: bool,
        check: Option<Check>,
    },
    Custom(fn(Arc<Ctx>) -> BoxFut),
}

struct Row {
    name: String,
    expect: Answer,
    /// Request heads the recorder must see.
    heads: usize,
    case: Case,
}

struct Ctx {
    proxy: Proxy,
    recorder: Recorder,
    /// Clients whose first upstream is the recorder (hostile) or the echo server (honest, spoofer).
    hostile: IpAddr,
    honest: IpAddr,
    spoofer: IpAddr,
}

impl Ctx {
    fn act(&self, act: Act) {
        *self.recorder.act.lock().unwrap() = act;
    }
}

fn send(bytes: impl Into<Vec<u8>>) -> Case {
    Case::Send {
        bytes: bytes.into(),
        act: Act::Upgrade,
        fin: false,
        check: None,
    }
}

fn send_fin(bytes: impl Into<Vec<u8>>) -> Case {
    Case::Send {
        bytes: bytes.into(),
        act: Act::Upgrade,
        fin: true,
        check: None,
    }
}

fn upstream(act: Act) -> Case {
    Case::Send {
        bytes: request("/up").into_bytes(),
        act,
        fin: false,
        check: None,
    }
}

fn checked(bytes: impl Into<Vec<u8>>, act: Act, check: Check) -> Case {
    Case::Send {
        bytes: bytes.into(),
        act,
        fin: false,
        check: Some(check),
    }
}

fn row(name: &str, expect: Answer, heads: usize, case: Case) -> Row {
    Row {
        name: name.to_string(),
        expect,
        heads,
        case,
    }
}

/// A request the proxy must refuse with 400, the upstream seeing nothing of it.
fn refused(name: &str, bytes: impl Into<Vec<u8>>) -> Row {
    row(name, Answer::Status(400), 0, send(bytes))
}

/// The valid request with `from` replaced by `to` (once; `from` must occur).
fn edit(from: &str, to: &str) -> Vec<u8> {
    let r = request("/h");
    assert!(r.contains(from), "{from:?}");
    r.replacen(from, to, 1).into_bytes()
}

/// The valid request with this request target.
fn target(raw: &[u8]) -> Vec<u8> {
    let r = request("/h");
    [&b"GET "[..], raw, &r.as_bytes()["GET /h".len()..]].concat()
}

/// The valid request with raw bytes inserted after the Host line.
fn with_header(raw: &[u8]) -> Vec<u8> {
    let r = request("/h");
    let at = r.find("Host: test\r\n").unwrap() + "Host: test\r\n".len();
    let mut v = r.as_bytes()[..at].to_vec();
    v.extend_from_slice(raw);
    v.extend_from_slice(&r.as_bytes()[at..]);
    v
}

/// Header fields that claim another client address.
fn forged(ip: IpAddr) -> Vec<(&'static str, String)> {
    vec![
        ("X-Forwarded-For", ip.to_string()),
        ("X-Real-IP", ip.to_string()),
        ("Forwarded", format!("for={ip}")),
        ("True-Client-IP", ip.to_string()),
        ("CF-Connecting-IP", ip.to_string()),
        ("X-Client-IP", ip.to_string()),
        ("X_Real_IP", ip.to_string()),
    ]
}

fn rows(c: &Ctx) -> Vec<Row> {
    use Answer::{Closed, Status};
    let big_line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(1 << 20)).into_bytes();
    let many: String = (0..10_000).map(|i| format!("X-H{i}: v\r\n")).collect();
    // Binary garbage (xorshift bytes) with line ends in it, and a TLS ClientHello, which has none.
    let mut garbage = Vec::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..512 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        garbage.extend_from_slice(&x.to_le_bytes()[..4]);
    }
    garbage.extend_from_slice(b"\r\n\r\n");
    let mut hello = vec![0x16, 0x03, 0x01, 0x00, 0xc4, 0x01, 0x00, 0x00, 0xc0, 0x03, 0x03];
    hello.extend((0u8..32).map(|i| i.wrapping_mul(37) | 0x80));
    hello.extend_from_slice(&[0x00, 0x00, 0x04, 0x13, 0x01, 0x13, 0x02, 0x01, 0x00]);
    assert!(!hello.contains(&b'\n'));
    let second = request("/second");
    let pipelined = format!("{}{second}", request("/first"));
    let spoof = {
        let mut r = request("/spoof");
        let claims: String = forged(c.honest).iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect();
        r = r.replacen("Host: test\r\n", &format!("Host: test\r\n{claims}"), 1);
        r
    };
    let huge_101 = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Pad: {}\r\n\
         Sec-WebSocket-Accept: {{accept}}\r\n\r\n",
        "p".repeat(32 * 1024)
    );
    let ok_101 = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: {accept}\r\n\r\n";

    vec![
        // -- the client's bytes --
        row(
            "empty connection (connect, FIN without a byte)",
            Closed,
            0,
            send_fin(Vec::new()),
        ),
        refused("garbage bytes (2 KiB binary with CRLFs)", garbage),
        row(
            "garbage without a line end (TLS ClientHello)",
            Status(408),
            0,
            send(hello),
        ),
        row("request line of 1 MiB", Status(431), 0, send(big_line)),
        row(
            "10,000 header fields",
            Status(431),
            0,
            send(with_header(many.as_bytes())),
        ),
        refused("header folding (obs-fold)", with_header(b"X-Folded: a\r\n b\r\n")),
        refused(
            "obs-fold of Upgrade",
            edit("Upgrade: websocket", "Upgrade:\r\n websocket"),
        ),
        refused("NUL in a header name", with_header(b"X-N\0me: v\r\n")),
        refused("NUL in a header value", with_header(b"X-V: a\0b\r\n")),
        refused("non-UTF-8 byte in a header name", with_header(b"X-\xff: v\r\n")),
        row(
            "non-UTF-8 bytes in a header value (obs-text)",
            Status(101),
            1,
            checked(with_header(b"X-V: a\xff\xfeb\r\n"), Act::Upgrade, |_, head, _| {
                find(head, b"\r\nX-V: a\xff\xfeb\r\n")
                    .map(|_| "forwarded verbatim".to_string())
                    .ok_or_else(|| "value not forwarded verbatim".into())
            }),
        ),
        refused("non-UTF-8 byte in the target", target(b"/\xc3\x28")),
        refused("NUL in the target", target(b"/a\0b")),
        refused("bare CR inside a value", with_header(b"X-V: a\rb\r\n")),
        row(
            "bare LF line ends",
            Status(101),
            1,
            checked(request("/lf").replace("\r\n", "\n"), Act::Upgrade, |_, head, _| {
                let bare = head
                    .iter()
                    .enumerate()
                    .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'));
                if bare {
                    Err("bare LF forwarded".into())
                } else {
                    Ok("forwarded with CRLF line ends".into())
                }
            }),
        ),
        refused(
            "duplicated Sec-WebSocket-Key",
            with_header(b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n"),
        ),
        refused("duplicated Host", with_header(b"Host: other\r\n")),
        refused(
            "Content-Length: 0 and Transfer-Encoding: chunked",
            with_header(b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n"),
        ),
        refused(
            "Transfer-Encoding: chunked alone",
            with_header(b"Transfer-Encoding: chunked\r\n"),
        ),
        refused(
            "Content-Length: 0 twice",
            with_header(b"Content-Length: 0\r\nContent-Length: 0\r\n"),
        ),
        refused(
            "Content-Length: 5 and a body",
            [with_header(b"Content-Length: 5\r\n"), b"hello".to_vec()].concat(),
        ),
        refused(
            "space before the colon (Content-Length : 5)",
            with_header(b"Content-Length : 5\r\n"),
        ),
        refused("HTTP/1.0", edit("HTTP/1.1", "HTTP/1.0")),
        refused("HTTP/2 preface", &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..]),
        refused("lowercase method (get)", edit("GET ", "get ")),
        row(
            "uppercase method (GET), valid request",
            Status(101),
            1,
            send(request("/ok")),
        ),
        // RFC 9112 section 3.2.2: absolute-form is accepted; the upstream gets origin-form and
        // the target's host as Host.
        row(
            "absolute-form target",
            Status(101),
            1,
            checked(edit("GET /h ", "GET http://test/h "), Act::Upgrade, |_, head, _| {
                let h = String::from_utf8_lossy(head);
                if !h.starts_with("GET /h HTTP/1.1\r\nHost: test\r\n") {
                    return Err(format!("forwarded head: {h:?}"));
                }
                Ok("forwarded in origin-form (GET /h)".into())
            }),
        ),
        row(
            "absolute-form target whose host is not the Host field's",
            Status(101),
            1,
            checked(
                edit("GET /h ", "GET http://elsewhere.test:81/h "),
                Act::Upgrade,
                |_, head, _| {
                    let h = String::from_utf8_lossy(head);
                    if !h.starts_with("GET /h HTTP/1.1\r\nHost: elsewhere.test:81\r\n") || h.contains("Host: test") {
                        return Err(format!("forwarded head: {h:?}"));
                    }
                    Ok("Host: elsewhere.test:81 (the target's, as RFC 9112 3.2.2 has it)".into())
                },
            ),
        ),
        refused(
            "absolute-form target with userinfo",
            edit("GET /h ", "GET http://user:pw@test/h "),
        ),
        refused(
            "absolute-form target of another scheme (ws://)",
            edit("GET /h ", "GET ws://test/h "),
        ),
        row(
            "Connection naming X-Real-IP and X-Forwarded-For",
            Status(101),
            1,
            checked(
                edit(
                    "Connection: Upgrade",
                    "Connection: Upgrade, X-Real-IP, X-Forwarded-For\r\nX-Forwarded-For: 6.6.6.6",
                ),
                Act::Upgrade,
                |c, head, _| {
                    let h = String::from_utf8_lossy(head);
                    let lines: Vec<&str> = h.split("\r\n").collect();
                    let want = [
                        "Connection: Upgrade".to_string(),
                        format!("X-Forwarded-For: {}", c.hostile),
                        format!("X-Real-IP: {}", c.hostile),
                    ];
                    for w in &want {
                        if lines.iter().filter(|l| *l == w).count() != 1 {
                            return Err(format!("not exactly one {w:?} in {h:?}"));
                        }
                    }
                    if h.contains("6.6.6.6") || h.matches("Connection:").count() != 1 {
                        return Err(format!("forwarded head: {h:?}"));
                    }
                    Ok("Connection: Upgrade; the proxy's X-Real-IP and X-Forwarded-For kept".into())
                },
            ),
        ),
        refused("CONNECT", edit("GET /h ", "CONNECT test:443 ")),
        row(
            "client closes mid-head",
            Closed,
            0,
            send_fin(&request("/h").as_bytes()[..30]),
        ),
        row(
            "slowloris: 1 byte every 300 ms",
            Status(408),
            0,
            Case::Custom(|c| Box::pin(slowloris(c))),
        ),
        row(
            "never reads the 101, keeps sending",
            Status(101),
            1,
            Case::Custom(|c| Box::pin(never_reads(c))),
        ),
        // -- the upstream's answer --
        row(
            "upstream: 101 without Sec-WebSocket-Accept",
            Closed,
            1,
            upstream(Act::Answer(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".into(),
            )),
        ),
        row(
            "upstream: 101 with a wrong Sec-WebSocket-Accept",
            Closed,
            1,
            upstream(Act::Answer(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n"
                    .into(),
            )),
        ),
        // RFC 9110 section 15.2: a client MUST be able to parse 1xx responses before the final one.
        row(
            "upstream: 100 Continue, then a valid 101",
            Status(101),
            1,
            upstream(Act::Answer(format!("HTTP/1.1 100 Continue\r\n\r\n{ok_101}"))),
        ),
        row(
            "upstream: 101 head of 32 KiB (> max_head_bytes)",
            Closed,
            1,
            upstream(Act::Answer(huge_101)),
        ),
        row(
            "upstream: closes mid-head",
            Closed,
            1,
            upstream(Act::AnswerAndClose(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConn".into(),
            )),
        ),
        row(
            "upstream: closes before answering (failover to the next)",
            Status(101),
            1,
            upstream(Act::Close),
        ),
        row(
            "upstream: resets before answering (failover to the next)",
            Status(101),
            1,
            upstream(Act::Reset),
        ),
        // -- smuggling and spoofing --
        row(
            "pipelined second request in the same write",
            Status(101),
            1,
            checked(pipelined.clone(), Act::Upgrade, |_, head, rest| {
                let h = String::from_utf8_lossy(head);
                if !h.starts_with("GET /first ") || h.contains("/second") {
                    return Err(format!("forwarded head: {h:?}"));
                }
                if rest != request("/second").as_bytes() {
                    return Err(format!("after the head: {:?}", String::from_utf8_lossy(rest)));
                }
                Ok("upstream: one head (/first); /second only as payload after the 101".into())
            }),
        ),
        row(
            "pipelined second request, upstream refuses the first (403)",
            Closed,
            1,
            checked(
                pipelined,
                Act::Answer("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n".into()),
                |_, head, rest| {
                    let h = String::from_utf8_lossy(head);
                    if h.contains("/second") || !rest.is_empty() {
                        return Err(format!("second request reached the upstream: {h:?} + {rest:?}"));
                    }
                    Ok("upstream: one head (/first), no byte of /second".into())
                },
            ),
        ),
        refused(
            "plain GET, then an upgrade, in one write",
            format!("GET /plain HTTP/1.1\r\nHost: test\r\n\r\n{second}"),
        ),
        row(
            "forged X-Forwarded-For/X-Real-IP/... naming an echo-server client",
            Status(101),
            1,
            checked(spoof, Act::Upgrade, |c, head, _| {
                let h = String::from_utf8_lossy(head);
                let real: Vec<_> = h
                    .lines()
                    .filter(|l| l.to_ascii_lowercase().starts_with("x-real-ip:"))
                    .collect();
                let want = format!("X-Real-IP: {}", c.hostile);
                if real != [want.as_str()] {
                    return Err(format!("X-Real-IP fields {real:?}, want [{want:?}]"));
                }
                // Not a trusted proxy: its chain starts at itself, its other claims are gone.
                let xff = header(&h, "x-forwarded-for").unwrap_or_default();
                if xff != c.hostile.to_string() {
                    return Err(format!("X-Forwarded-For {xff:?}"));
                }
                for claim in ["forwarded", "true-client-ip", "cf-connecting-ip"] {
                    if let Some(v) = header(&h, claim) {
                        return Err(format!("{claim}: {v:?} forwarded"));
                    }
                }
                Ok(format!(
                    "reached its peer's upstream; {want}, X-Forwarded-For: {xff}, no other claim"
                ))
            }),
        ),
        row(
            "forged X-Forwarded-For/X-Real-IP/... naming a recorder client",
            Status(101),
            0,
            Case::Custom(|c| Box::pin(spoof_towards_recorder(c))),
        ),
    ]
}

// ---- running a row ----

/// What came back to a hostile client.
struct Reply {
    bytes: Vec<u8>,
    closed: bool,
}

/// Reads up to the end of a response head, then (unless it is a 101) on until the close.
async fn read_reply(r: &mut (impl AsyncReadExt + Unpin)) -> Reply {
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(p) = find(&bytes, b"\r\n\r\n")
            && status(&String::from_utf8_lossy(&bytes[..p])) == 101
        {
            return Reply { bytes, closed: false };
        }
        match tokio::time::timeout_at(end, r.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => return Reply { bytes, closed: true },
            Ok(Ok(n)) => bytes.extend_from_slice(&chunk[..n]),
            Err(_) => return Reply { bytes, closed: false },
        }
    }
}

impl Reply {
    fn answer(&self) -> Answer {
        match find(&self.bytes, b"\r\n\r\n") {
            Some(p) if self.bytes.starts_with(b"HTTP/1.1 ") => {
                Answer::Status(status(&String::from_utf8_lossy(&self.bytes[..p])))
            }
            _ if self.bytes.is_empty() && self.closed => Answer::Closed,
            _ if self.bytes.is_empty() => Answer::Nothing,
            _ => Answer::Garbage,
        }
    }

    /// The body's first line (the proxy's reason for a refusal).
    fn reason(&self) -> String {
        let text = String::from_utf8_lossy(&self.bytes);
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.lines().next().unwrap_or("").to_string())
            .unwrap_or_default()
    }

    fn problems(&self) -> Vec<String> {
        match self.answer() {
            Answer::Status(101) | Answer::Closed => vec![],
            Answer::Status(s) if !self.closed => vec![format!("{s} not followed by a close within {DEADLINE:?}")],
            _ => vec![],
        }
    }
}

async fn run_send(c: Arc<Ctx>, bytes: Vec<u8>, act: Act, fin: bool, check: Option<Check>) -> Observed {
    c.act(act);
    let s = connect_from(c.hostile, c.proxy.addr).await;
    let (mut rd, mut wr) = s.into_split();
    let sent = bytes.len();
    // Written by a task of its own: the proxy may answer (and stop reading) long before the last
    // byte of a large request is taken.
    let writer = tokio::spawn(async move {
        let r = wr.write_all(&bytes).await;
        if fin {
            let _ = wr.shutdown().await;
        }
        (wr, r)
    });
    let reply = read_reply(&mut rd).await;
    let mut problems = reply.problems();
    let wr = match tokio::time::timeout(DEADLINE, writer).await {
        Ok(Ok((wr, _))) => Some(wr),
        _ => {
            problems.push(format!(
                "the client's write of {sent} bytes did not end within {DEADLINE:?}"
            ));
            None
        }
    };
    let heads = c.recorder.events.lock().await.take_heads();
    drop((rd, wr));
    let mut detail = reply.reason();
    for (id, head) in &heads {
        let Some(rest) = c.recorder.events.lock().await.done(*id).await else {
            problems.push(format!("upstream connection {id} did not end within {DEADLINE:?}"));
            continue;
        };
        let r = match check {
            Some(check) => check(&c, head, &rest),
            None if rest.is_empty() => Ok(String::new()),
            None => Err(format!("{} bytes reached the upstream after the head", rest.len())),
        };
        match r {
            Ok(what) => detail = format!("{detail} {what}").trim().to_string(),
            Err(e) => problems.push(e),
        }
    }
    Observed {
        answer: reply.answer(),
        detail,
        heads: heads.len(),
        problems,
    }
}

/// One byte every 300 ms of a valid request: the head timeout (1 s) must answer 408.
async fn slowloris(c: Arc<Ctx>) -> Observed {
    c.act(Act::Upgrade);
    let mut s = connect_from(c.hostile, c.proxy.addr).await;
    let req = request("/slow").into_bytes();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    let (mut sent, mut first) = (0, Vec::new());
    {
        let (mut rd, mut wr) = s.split();
        let mut chunk = [0u8; 4096];
        // At most 40 ticks (12 s); the proxy must have answered after about 4.
        for _ in 0..40 {
            tokio::select! {
                _ = tick.tick() => {
                    if sent < req.len() && wr.write_all(&req[sent..sent + 1]).await.is_ok() {
                        sent += 1;
                    }
                }
                r = rd.read(&mut chunk) => {
                    if let Ok(n) = r {
                        first.extend_from_slice(&chunk[..n]);
                    }
                    break;
                }
            }
        }
    }
    let answered = started.elapsed();
    let mut reply = read_reply(&mut s).await;
    reply.bytes.splice(0..0, first);
    let mut problems = reply.problems();
    if !(Duration::from_millis(900)..Duration::from_secs(4)).contains(&answered) {
        problems.push(format!("answered after {answered:?}, header_timeout is 1 s"));
    }
    let heads = c.recorder.events.lock().await.take_heads().len();
    let detail = format!(
        "after {:.2} s and {sent} bytes; {}",
        answered.as_secs_f64(),
        reply.reason()
    );
    Observed {
        answer: reply.answer(),
        detail,
        heads,
        problems,
    }
}

/// Sends its request and a stream of bytes, never reads: the upstream floods it. The proxy must
/// hold the flood back (not buffer it), serve other clients meanwhile, and free the connection
/// once the client goes away.
async fn never_reads(c: Arc<Ctx>) -> Observed {
    let mut problems = Vec::new();
    let server = &c.proxy.server;
    if poll_until(DEADLINE, || (server.totals().open == [0, 0]).then_some(()))
        .await
        .is_none()
    {
        problems.push(format!("relays of earlier rows still open: {:?}", server.totals().open));
    }
    c.act(Act::Flood);
    let s = connect_from(c.hostile, c.proxy.addr).await;
    s.try_write(request("/never-reads").as_bytes()).unwrap();
    let junk = vec![0xa5u8; 64 * 1024];
    let mut pushed = 0u64;
    // Keeps sending until its own socket is full (at most 1 GiB): before and after the relay starts.
    let mut push = |s: &TcpStream| {
        for _ in 0..16_384 {
            match s.try_write(&junk) {
                Ok(n) => pushed += n as u64,
                Err(_) => break,
            }
        }
    };
    push(&s);
    let Some((id, _)) = c.recorder.events.lock().await.next_head().await else {
        problems.push(format!("no request head at the upstream within {DEADLINE:?}"));
        return Observed {
            answer: Answer::Nothing,
            detail: String::new(),
            heads: 0,
            problems,
        };
    };
    let Some(flooded) = c.recorder.events.lock().await.stalled(id).await else {
        problems.push(format!(
            "the upstream's flood was not held back ({FLOOD_MAX} bytes or no stall)"
        ));
        return Observed {
            answer: Answer::Nothing,
            detail: String::new(),
            heads: 1,
            problems,
        };
    };
    push(&s);
    // The connection is in the relay (so it got its 101) and stuck on a client that does not read.
    let open = server.totals().open;
    let answer = if open == [0, 1] {
        Answer::Status(101)
    } else {
        Answer::Nothing
    };
    if open != [0, 1] {
        problems.push(format!("relays open while stuck: {open:?}, want [0, 1]"));
    }
    if let Err(e) = honest_echo(&c).await {
        problems.push(format!("honest client while one is stuck: {e}"));
    }
    let closed = Instant::now();
    drop(s);
    let freed = poll_until(DEADLINE, || (server.totals().open == [0, 0]).then(|| closed.elapsed())).await;
    if freed.is_none() {
        problems.push(format!(
            "connection not freed {DEADLINE:?} after the client closed: {:?}",
            server.totals()
        ));
    }
    if c.recorder.events.lock().await.done(id).await.is_none() {
        problems.push("upstream side not closed after the client closed".into());
    }
    let detail = format!(
        "unread; flood held back after {:.1} MiB, client pushed {:.1} MiB; honest client served meanwhile; \
         freed {} ms after the client closed",
        flooded as f64 / f64::from(1 << 20),
        pushed as f64 / f64::from(1 << 20),
        freed.map_or(-1, |d| d.as_millis() as i64)
    );
    Observed {
        answer,
        detail,
        heads: 1,
        problems,
    }
}

/// A client whose address hashes to the echo server claims, in every header field there is, the
/// address of a recorder client: it must still reach the echo server.
async fn spoof_towards_recorder(c: Arc<Ctx>) -> Observed {
    c.act(Act::Upgrade);
    let stream = connect_from(c.spoofer, c.proxy.addr).await;
    let mut req = format!("ws://{}/spoof", c.proxy.addr).into_client_request().unwrap();
    for (name, value) in forged(c.hostile) {
        req.headers_mut().insert(name, value.parse().unwrap());
    }
    let mut problems = Vec::new();
    let answer = match tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(req, stream)).await {
        Ok(Ok((mut ws, resp))) => {
            // Only the echo server echoes WebSocket messages; the recorder does not answer them.
            if let Err(e) = roundtrip(&mut ws, "spoof").await {
                problems.push(format!("not the echo server: {e}"));
            }
            Answer::Status(resp.status().as_u16())
        }
        Ok(Err(e)) => {
            problems.push(format!("handshake: {e}"));
            Answer::Garbage
        }
        Err(_) => Answer::Nothing,
    };
    let heads = c.recorder.events.lock().await.take_heads().len();
    Observed {
        answer,
        detail: "reached the echo server (its TCP peer's choice)".into(),
        heads,
        problems,
    }
}

async fn roundtrip(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>, text: &str) -> Result<(), String> {
    let go = async {
        ws.send(Message::text(text)).await.map_err(|e| e.to_string())?;
        match ws.next().await {
            Some(Ok(m)) if m == Message::text(text) => {}
            other => return Err(format!("echo: {other:?}")),
        }
        ws.close(None).await.map_err(|e| e.to_string())?;
        // Bounded: the server answers the close and the stream ends.
        for _ in 0..16 {
            if ws.next().await.is_none() {
                break;
            }
        }
        Ok(())
    };
    tokio::time::timeout(DEADLINE, go)
        .await
        .map_err(|_| format!("no echo within {DEADLINE:?}"))?
}

/// An honest client: a WebSocket handshake and one echoed message through the proxy.
async fn honest_echo(c: &Ctx) -> Result<(), String> {
    let stream = connect_from(c.honest, c.proxy.addr).await;
    let url = format!("ws://{}/honest", c.proxy.addr);
    let (mut ws, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(url, stream))
        .await
        .map_err(|_| "no handshake within the deadline".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    roundtrip(&mut ws, "honest").await
}

/// The first client (`client_ip(n)`, n from `from`) whose first upstream is `first`.
fn client_for(balancer: &Balancer, first: SocketAddr, from: u32, skip: Option<IpAddr>) -> IpAddr {
    (from..from + 2000)
        .map(client_ip)
        .find(|&ip| Some(ip) != skip && balancer.order(ip)[0] == first)
        .expect("no client among 2000 hashes to the wanted upstream")
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogue() {
    let echo = echo_upstream().await;
    let recorder = Recorder::start().await;
    let text = config_text(echo, recorder.addr);
    let cfg = wsproxy::Config::parse(&text, "hostile config").unwrap();
    let balancer = Balancer::new(&cfg.services[0].upstreams);
    let hostile = client_for(&balancer, recorder.addr, 1, None);
    let honest = client_for(&balancer, echo, 1, None);
    let spoofer = client_for(&balancer, echo, 1, Some(honest));
    let proxy = Proxy::try_start(&text).unwrap();
    let c = Arc::new(Ctx {
        proxy,
        recorder,
        hostile,
        honest,
        spoofer,
    });
    honest_echo(&c).await.expect("an honest client before any hostile one");

    let mut lines = Vec::new();
    let mut failures = Vec::new();
    for (i, row) in rows(&c).into_iter().enumerate() {
        let started = Instant::now();
        let mut o = match row.case {
            Case::Send { bytes, act, fin, check } => run_send(Arc::clone(&c), bytes, act, fin, check).await,
            Case::Custom(f) => f(Arc::clone(&c)).await,
        };
        let took = started.elapsed();
        if o.answer != row.expect {
            o.problems
                .insert(0, format!("expected {}, got {}", row.expect, o.answer));
        }
        if o.heads != row.heads {
            o.problems.push(format!(
                "the upstream saw {} request heads, want {}",
                o.heads, row.heads
            ));
        }
        let after = honest_echo(&c).await;
        if let Err(e) = &after {
            o.problems.push(format!("honest client after it: {e}"));
        }
        let verdict = if o.problems.is_empty() { "ok" } else { "FAIL" };
        lines.push(format!(
            "| {:>2} | {:<62} | {:<21} | {:<21} | {:>5} | {:<6} | {:>5} ms | {:<4} | {}",
            i + 1,
            clip(&row.name, 62),
            row.expect.to_string(),
            o.answer.to_string(),
            o.heads,
            if after.is_ok() { "101+ok" } else { "FAILED" },
            took.as_millis(),
            verdict,
            clip(&o.detail, 170),
        ));
        for p in &o.problems {
            failures.push(format!("row {} ({}): {p}", i + 1, row.name));
        }
    }
    say("");
    say(&format!(
        "hostile input catalogue (header_timeout 1 s; upstream heads = request heads the upstream received; \
         honest = WebSocket echo right after): hostile {hostile}, honest {honest}"
    ));
    say(&format!(
        "| {:>2} | {:<62} | {:<21} | {:<21} | {:>5} | {:<6} | {:>8} | {:<4} | detail",
        "#", "case", "expected", "observed", "heads", "honest", "time", ""
    ));
    for l in &lines {
        say(l);
    }
    for f in &failures {
        say(&format!("FAIL {f}"));
    }
    let c = Arc::into_inner(c).expect("every row let go of the context");
    c.proxy.stop().await;
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
