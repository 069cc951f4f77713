//! The load generator: one thread (a current-thread tokio runtime), raw frames (`ws`), bounded in
//! time and count, against a `ws://` target, or a `wss://` one for the TLS workloads (`tls`).
//!
//! A `Session` holds a group of open connections through one contender; the workloads that share
//! them (sink, echo, broadcast) run one after another on it. Each workload runs either at the
//! maximum (closed loop: one message in flight per active connection, one broadcast round at a
//! time) or at a fixed offered rate (open loop: message k is due at k / rate, whatever the answers
//! do). Frames are built once per measurement and only their 8-byte time stamp (CLOCK_MONOTONIC,
//! shared with the upstream) is rewritten; sends go straight to the socket while its queue is empty;
//! every connection's reads go through one buffer.
//!
//! Over TLS the same frames go through the connection's rustls session, used without its I/O
//! wrapper once the handshake is done: a message is sealed into records right away and their
//! bytes take the plain path's send queue; a readable socket's bytes are opened and the plaintext
//! goes to the same parser.
//!
//! CPU time is taken over the measurement window from `/proc/stat` (the whole machine) and from
//! the generator's, the upstream's and the proxy's processes (`sys::cpu_sample`).

use std::cell::RefCell;
use std::io::{self, IoSlice, Read as _, Write as _};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use rustls::client::ClientConnection;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::LocalSet;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

use crate::sys::{self, CpuDelta};
use crate::tls;
use crate::ws::{self, Event, Frame, OP_BINARY, OP_CLOSE, OP_TEXT, Out, Parser, StampReader};

/// Time a handshake (connect, upgrade) may take before it counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the sending window, time the last answers get to come back.
const DRAIN: Duration = Duration::from_secs(3);
/// Handshakes opened at once when a session opens its connections.
const OPEN_PARALLEL: usize = 128;
/// At a fixed handshake rate, handshakes in progress beyond this count as lost, not started.
const HANDSHAKES_IN_FLIGHT: usize = 2_000;
/// A bulk sender keeps at most this much queued beyond what the socket took.
const SINK_QUEUE: usize = 256 * 1024;
const READ_BUF: usize = 256 * 1024;

/// What a measurement offers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Offered {
    /// Closed loop: as fast as the answers come back.
    Max,
    /// Open loop: this many units per second.
    Rate(f64),
}

impl Offered {
    fn rate(self) -> f64 {
        match self {
            Offered::Max => 0.0,
            Offered::Rate(r) => r,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub count: u64,
}

/// One measurement of one workload through one contender.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Measure {
    /// Units per second offered; 0 for the maximum (closed loop).
    pub offered: f64,
    /// Units completed: messages echoed or delivered, handshakes done, payload bytes counted by the
    /// upstream (sink).
    pub done: u64,
    /// Payload bytes the proxy relayed for them (an echoed message counts both ways).
    pub bytes: u64,
    /// Length of the window, seconds.
    pub secs: f64,
    /// Units completed per second.
    pub rate: f64,
    pub latency: Option<Latency>,
    /// Units sent (or due) that had not completed by the end of the drain.
    pub lost: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Open loop: the largest delay of a send behind its schedule, ms.
    pub max_lag_ms: f64,
    pub cpu: CpuDelta,
    /// TLS workloads: what the connections (or handshakes) negotiated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<tls::Seen>,
}

impl Measure {
    /// The busiest CPU of the window, e.g. "cpu0 99 %, softirq 31 %": at the maximum, the one that
    /// saturated.
    pub fn busiest(&self) -> String {
        self.cpu
            .per_cpu
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.busy.total_cmp(&b.1.busy))
            .map_or_else(String::new, |(i, s)| {
                format!("cpu{i} {:.0} %, softirq {:.0} %", s.busy * 100.0, s.softirq * 100.0)
            })
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid histogram bounds")
}

fn latency(h: &Histogram<u64>) -> Option<Latency> {
    (!h.is_empty()).then(|| Latency {
        p50_us: h.value_at_quantile(0.5) as f64 / 1e3,
        p99_us: h.value_at_quantile(0.99) as f64 / 1e3,
        p999_us: h.value_at_quantile(0.999) as f64 / 1e3,
        max_us: h.max() as f64 / 1e3,
        count: h.len(),
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// One echo through `addr` with an independent client (tungstenite, random masks): proves that a
/// contender relays before it is measured.
pub fn check(addr: SocketAddr) -> Result<()> {
    runtime()?.block_on(async {
        let go = async {
            let stream = TcpStream::connect(addr).await?;
            echo_once(format!("ws://{addr}/echo"), stream).await
        };
        timeout(Duration::from_secs(10), go)
            .await
            .context("no echo within 10 s")?
    })
}

/// A WebSocket handshake for `url` over `stream`, then one binary message that must come back.
async fn echo_once<S: AsyncRead + AsyncWrite + Unpin>(url: String, stream: S) -> Result<()> {
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    ws.send(Message::binary(b"check".to_vec())).await?;
    match ws.next().await {
        Some(Ok(Message::Binary(b))) if b.as_ref() == b"check" => {}
        other => bail!("unexpected echo: {other:?}"),
    }
    let _ = ws.close(None).await;
    Ok(())
}

/// As `check`, over TLS with `tls` (tungstenite over tokio-rustls); returns what the connection
/// negotiated.
pub fn check_tls(addr: SocketAddr, tls: &tls::Client) -> Result<String> {
    runtime()?.block_on(async {
        let go = async {
            let stream = TcpStream::connect(addr).await?;
            let stream = tls.connector().connect(tls.name.clone(), stream).await?;
            let negotiated = tls::negotiated(stream.get_ref().1);
            echo_once(format!("wss://{}/echo", tls::SNI), stream).await?;
            Ok(negotiated)
        };
        timeout(Duration::from_secs(10), go)
            .await
            .context("no echo within 10 s")?
    })
}

/// One TLS handshake with `tls` and nothing else: what it negotiated.
pub fn tls_handshake(addr: SocketAddr, tls: &tls::Client) -> Result<String> {
    runtime()?.block_on(async {
        let go = async {
            let stream = TcpStream::connect(addr).await?;
            let mut stream = tls.connector().connect(tls.name.clone(), stream).await?;
            let negotiated = tls::negotiated(stream.get_ref().1);
            let _ = stream.shutdown().await;
            anyhow::Ok(negotiated)
        };
        timeout(Duration::from_secs(10), go)
            .await
            .context("no TLS handshake within 10 s")?
    })
}

/// A sleep with microsecond precision: a timerfd on CLOCK_MONOTONIC, awaited through tokio
/// (tokio's own timer has 1 ms ticks, which would send bursts).
struct Pacer {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl Pacer {
    fn new() -> Result<Pacer> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: timerfd_create returns a new fd that we own, or -1.
        let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if raw < 0 {
            bail!("timerfd_create: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a valid fd owned by nobody else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        // SAFETY: the OwnedFd is a valid timerfd that stays open as long as the AsyncFd owns it.
        let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow!("registering the timerfd: {e}"))?;
        Ok(Pacer { fd })
    }

    /// Sleeps until `t` (ns on CLOCK_MONOTONIC).
    async fn until(&mut self, t: u64) -> Result<()> {
        use std::os::fd::AsRawFd as _;
        if t <= ws::now_ns() + 2_000 {
            return Ok(());
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: (t / 1_000_000_000) as libc::time_t,
                tv_nsec: (t % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: a valid timerfd and a valid itimerspec; the time is absolute.
        if unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        } != 0
        {
            bail!("timerfd_settime: {}", std::io::Error::last_os_error());
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 8];
            // SAFETY: reading 8 bytes into an 8-byte buffer.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
            if n == 8 {
                return Ok(());
            }
            guard.clear_ready();
        }
    }
}

/// An open-loop schedule: unit k is due `k * gap` after the start.
struct Schedule {
    start: u64,
    gap_ns: f64,
    max_lag: u64,
}

impl Schedule {
    fn new(per_sec: f64) -> Schedule {
        Schedule {
            start: ws::now_ns(),
            gap_ns: 1e9 / per_sec,
            max_lag: 0,
        }
    }

    fn due(&self, k: u64) -> u64 {
        self.start + (k as f64 * self.gap_ns) as u64
    }

    /// Waits for unit `k`'s time; returns how many units (from k on) are due by now, at most `left`.
    async fn next(&mut self, pacer: &mut Pacer, k: u64, left: u64) -> Result<u64> {
        pacer.until(self.due(k)).await?;
        let now = ws::now_ns();
        self.max_lag = self.max_lag.max(now.saturating_sub(self.due(k)));
        let mut n = 1;
        while n < left && self.due(k + n) <= now {
            n += 1;
        }
        Ok(n)
    }
}

/// Open loop: `total` units at `per_sec`, unit k due k / per_sec after the start; `send(k, n)`
/// sends the `n` units from k on that are due (more than one when the pacer woke late). Returns
/// the largest delay of a unit behind its schedule, ns.
async fn paced(per_sec: f64, total: u64, mut send: impl FnMut(u64, u64)) -> Result<u64> {
    let mut sched = Schedule::new(per_sec);
    let mut pacer = Pacer::new()?;
    let mut k = 0;
    while k < total {
        let n = sched.next(&mut pacer, k, total - k).await?;
        send(k, n);
        k += n;
    }
    Ok(sched.max_lag)
}

// ---------------------------------------------------------------------------------------------
// Sessions: a group of open connections

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Idle,
    /// Echo; in a closed loop every echo that arrives before `end` sends the next message.
    Echo {
        closed: bool,
    },
    Broadcast,
    Sink,
}

/// What every connection's reader updates.
struct State {
    mode: Mode,
    /// Messages stamped before this belong to an earlier measurement and are not counted.
    since: u64,
    /// Closed loop: no new message after this.
    end: u64,
    hist: Histogram<u64>,
    received: u64,
    sent: u64,
    /// The echo frame, stamped anew for each message.
    frame: Frame,
    /// The broadcast driver waits until `received` reaches this.
    target: u64,
    /// The upstream's answer to `END` (sink).
    count: Option<u64>,
    closed_conns: u64,
}

struct Conn {
    s: TcpStream,
    /// wss: the session that seals what is sent and opens what is read (the socket carries its
    /// records).
    tls: Option<RefCell<ClientConnection>>,
    out: Out,
    parser: RefCell<Parser>,
    msg: RefCell<(u8, StampReader, Vec<u8>)>,
}

impl Conn {
    /// Sends `data`: as it is, or sealed into TLS records.
    fn send(&self, data: &[u8]) {
        let Some(tls) = &self.tls else {
            self.out.push(&self.s, data);
            return;
        };
        let mut tls = tls.borrow_mut();
        // The handshake is done and the buffer limit lifted (`Session::open`): all of it is
        // sealed now.
        if tls.writer().write_all(data).is_err() {
            self.out.fail();
            return;
        }
        self.push_records(&mut tls);
    }

    /// Moves the session's sealed records to the send queue.
    fn push_records(&self, tls: &mut ClientConnection) {
        while tls.wants_write() {
            if tls.write_tls(&mut Records(self)).is_err() {
                self.out.fail();
                return;
            }
        }
    }
}

/// A connection's send queue as the session's sink for records: several records (a message over
/// 16 KiB) go in one push, so in one write when the socket takes them.
struct Records<'a>(&'a Conn);

impl io::Write for Records<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.out.push(&self.0.s, buf);
        Ok(buf.len())
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if let [one] = bufs {
            return self.write(one);
        }
        SCRATCH.with(|b| {
            let mut b = b.borrow_mut();
            b.clear();
            for s in bufs {
                b.extend_from_slice(s);
            }
            self.0.out.push(&self.0.s, &b);
            Ok(b.len())
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The socket as the session's source of records: what is there now, without waiting.
struct TryRead<'a>(&'a TcpStream);

impl io::Read for TryRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

struct Shared {
    st: RefCell<State>,
    progress: Notify,
}

thread_local! {
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BUF]);
    /// Records gathered for one push.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

pub struct Session {
    rt: tokio::runtime::Runtime,
    local: LocalSet,
    conns: Vec<Rc<Conn>>,
    shared: Rc<Shared>,
    /// wss: what the connections negotiated.
    tls: Option<tls::Seen>,
}

impl Session {
    /// Opens `n` connections through `addr`, all in the upstream's broadcast group `group`; over
    /// TLS with `tls` when given.
    pub fn open(addr: SocketAddr, n: usize, group: u64, tls: Option<&tls::Client>) -> Result<Session> {
        let rt = runtime()?;
        let local = LocalSet::new();
        let path = format!("/group/{group}");
        type Opened = (TcpStream, Option<ClientConnection>);
        let open_one = |_| {
            let path = &path;
            async move {
                match tls {
                    None => Ok((ws::connect(addr, path, HANDSHAKE_TIMEOUT).await?.0, None)),
                    Some(t) => {
                        // The upgrade is done over tokio-rustls; the session goes on without it.
                        let (s, _early) = ws::connect_tls(addr, t, path, HANDSHAKE_TIMEOUT).await?;
                        let (s, mut c) = s.into_inner();
                        // Every message is sealed and queued at once (`Conn::send`).
                        c.set_buffer_limit(None);
                        Ok((s, Some(c)))
                    }
                }
            }
        };
        let opened: Vec<Result<Opened>> = local.block_on(&rt, async {
            timeout(
                Duration::from_secs(120),
                futures_util::stream::iter(0..n)
                    .map(open_one)
                    .buffer_unordered(OPEN_PARALLEL)
                    .collect(),
            )
            .await
            .map_err(|_| anyhow!("opening {n} connections took over 120 s"))
        })?;
        let shared = Rc::new(Shared {
            st: RefCell::new(State {
                mode: Mode::Idle,
                since: u64::MAX,
                end: 0,
                hist: histogram(),
                received: 0,
                sent: 0,
                frame: Frame::binary(8, true),
                target: 0,
                count: None,
                closed_conns: 0,
            }),
            progress: Notify::new(),
        });
        let mut conns = Vec::with_capacity(n);
        let mut seen = tls.map(|_| tls::Seen::default());
        for r in opened {
            // The upstream sends nothing until asked, so nothing can follow the 101 here.
            let (s, session) = r?;
            if let (Some(seen), Some(c)) = (seen.as_mut(), session.as_ref()) {
                seen.add(tls::negotiated(c), tls::resumed(c));
            }
            let c = Rc::new(Conn {
                s,
                tls: session.map(RefCell::new),
                out: Out::default(),
                parser: RefCell::new(Parser::default()),
                msg: RefCell::new((0, StampReader::default(), Vec::new())),
            });
            let (rc, rs) = (c.clone(), shared.clone());
            local.spawn_local(reader(rc, rs));
            let wc = c.clone();
            local.spawn_local(async move { wc.out.flush_forever(&wc.s).await });
            conns.push(c);
        }
        Ok(Session {
            rt,
            local,
            conns,
            shared,
            tls: seen,
        })
    }

    /// Starts a measurement: the mode, a fresh histogram and counts, messages before now ignored.
    fn begin(&self, mode: Mode, frame: Frame) {
        let mut st = self.shared.st.borrow_mut();
        st.mode = mode;
        st.since = ws::now_ns();
        st.end = u64::MAX;
        st.hist.reset();
        st.received = 0;
        st.sent = 0;
        st.frame = frame;
        st.target = 0;
        st.count = None;
    }

    fn run<T>(&self, window: Duration, f: impl Future<Output = Result<T>>) -> Result<T> {
        let hard = window + Duration::from_secs(60);
        let r = self.local.block_on(&self.rt, async {
            timeout(hard, f)
                .await
                .map_err(|_| anyhow!("run timed out after {hard:?}"))?
        });
        self.shared.st.borrow_mut().mode = Mode::Idle;
        r
    }

    /// Waits (at most `DRAIN`) until `received` reaches `sent`.
    async fn drain(&self) {
        let end = Instant::now() + DRAIN;
        loop {
            let progress = self.shared.progress.notified();
            {
                let st = self.shared.st.borrow();
                if st.received >= st.sent {
                    return;
                }
            }
            if timeout(end.saturating_duration_since(Instant::now()), progress)
                .await
                .is_err()
            {
                return;
            }
        }
    }

    fn check_conns(&self) -> Result<()> {
        let closed = self.shared.st.borrow().closed_conns;
        if closed > 0 {
            bail!("{closed} of {} connections closed by the far end", self.conns.len());
        }
        Ok(())
    }

    /// Echo on the first `active` connections: `size`-byte messages, closed loop or at `offered`
    /// messages per second in total (message k to connection k mod active).
    pub fn echo(&mut self, active: usize, size: usize, offered: Offered, window: Duration) -> Result<Measure> {
        self.check_conns()?;
        let active = active.clamp(1, self.conns.len());
        let size = size.max(8);
        let closed = offered == Offered::Max;
        self.begin(Mode::Echo { closed }, Frame::binary(size, true));
        let conns = &self.conns[..active];
        let shared = &self.shared;
        let (secs, cpu, lag) = self.run(window, async {
            let cpu0 = sys::cpu_sample();
            let start = ws::now_ns();
            let mut lag = 0;
            match offered {
                Offered::Max => {
                    shared.st.borrow_mut().end = start + window.as_nanos() as u64;
                    for c in conns {
                        let mut st = shared.st.borrow_mut();
                        st.sent += 1;
                        let bytes = st.frame.stamp(ws::now_ns());
                        c.send(bytes);
                    }
                    tokio::time::sleep(window).await;
                }
                Offered::Rate(rate) => {
                    let total = (window.as_secs_f64() * rate).floor() as u64;
                    lag = paced(rate, total, |k, n| {
                        let mut st = shared.st.borrow_mut();
                        for j in k..k + n {
                            let c = &conns[(j % active as u64) as usize];
                            let bytes = st.frame.stamp(ws::now_ns());
                            c.send(bytes);
                        }
                        st.sent += n;
                    })
                    .await?;
                }
            }
            let secs = (ws::now_ns() - start) as f64 / 1e9;
            // The CPU of every unit sent, also of those still on their way at the window's end.
            self.drain().await;
            let cpu = sys::cpu_sample().since(&cpu0);
            Ok((secs, cpu, lag))
        })?;
        let st = self.shared.st.borrow();
        Ok(Measure {
            offered: offered.rate(),
            done: st.received,
            bytes: st.received * 2 * size as u64,
            secs,
            rate: st.received as f64 / secs,
            latency: latency(&st.hist),
            lost: st.sent.saturating_sub(st.received),
            max_lag_ms: lag as f64 / 1e6,
            cpu,
            tls: self.tls.clone(),
            ..Measure::default()
        })
    }

    /// The upstream pushes one `size`-byte message to every connection of the session per round:
    /// closed loop (the next round once every connection has the last one, or after 5 s) or at
    /// `offered` delivered messages per second (rounds at offered / connections per second).
    pub fn broadcast(&mut self, size: usize, offered: Offered, window: Duration) -> Result<Measure> {
        self.check_conns()?;
        let n = self.conns.len() as u64;
        let trigger = Frame::new(OP_TEXT, format!("B {size}").as_bytes(), true);
        self.begin(Mode::Broadcast, Frame::binary(8, true));
        let c0 = self.conns[0].clone();
        let shared = &self.shared;
        let (secs, cpu, lag, slow) = self.run(window, async {
            let cpu0 = sys::cpu_sample();
            let start = ws::now_ns();
            let end = start + window.as_nanos() as u64;
            let mut lag = 0;
            let mut slow = 0u64;
            // At a fixed rate the window is the schedule's: round k is due k / rounds-per-second,
            // and the last round's own share of the window follows its trigger.
            let mut span = 0.0;
            match offered {
                Offered::Max => {
                    while ws::now_ns() < end {
                        let progress = shared.progress.notified();
                        {
                            let mut st = shared.st.borrow_mut();
                            st.sent += n;
                            st.target = st.sent;
                        }
                        c0.send(trigger.bytes());
                        if timeout(Duration::from_secs(5), async {
                            let mut progress = std::pin::pin!(progress);
                            loop {
                                progress.as_mut().await;
                                let st = shared.st.borrow();
                                if st.received >= st.target {
                                    return;
                                }
                                drop(st);
                                progress.set(shared.progress.notified());
                            }
                        })
                        .await
                        .is_err()
                        {
                            slow += 1;
                            break;
                        }
                    }
                }
                Offered::Rate(rate) => {
                    // At least five rounds, however long that takes: a round to 10,000 connections
                    // is one burst, and one or two of them make a poor sample.
                    let rounds = (window.as_secs_f64() * rate / n as f64).floor().max(5.0) as u64;
                    lag = paced(rate / n as f64, rounds, |_, due| {
                        for _ in 0..due {
                            shared.st.borrow_mut().sent += n;
                            c0.send(trigger.bytes());
                        }
                    })
                    .await?;
                    span = rounds as f64 * n as f64 / rate;
                }
            }
            let secs = ((ws::now_ns() - start) as f64 / 1e9).max(span);
            self.drain().await;
            let cpu = sys::cpu_sample().since(&cpu0);
            Ok((secs, cpu, lag, slow))
        })?;
        let st = self.shared.st.borrow();
        Ok(Measure {
            offered: offered.rate(),
            done: st.received,
            bytes: st.received * size as u64,
            secs,
            rate: st.received as f64 / secs,
            latency: latency(&st.hist),
            lost: st.sent.saturating_sub(st.received),
            errors: slow,
            first_error: (slow > 0).then(|| "a broadcast round was not delivered within 5 s".to_owned()),
            max_lag_ms: lag as f64 / 1e6,
            cpu,
            tls: self.tls.clone(),
        })
    }

    /// `size`-byte messages from the first connection to the upstream, which counts them: as fast
    /// as the socket takes them, or at `offered` bytes per second. Done when the upstream's count
    /// of the bytes has come back.
    pub fn sink(&mut self, size: usize, offered: Offered, window: Duration) -> Result<Measure> {
        self.check_conns()?;
        let frame = Frame::binary(size, true);
        let sink_frame = Frame::new(OP_TEXT, b"SINK", true);
        let end_frame = Frame::new(OP_TEXT, b"END", true);
        self.begin(Mode::Sink, Frame::binary(8, true));
        let c = self.conns[0].clone();
        let shared = &self.shared;
        let (secs, cpu, lag, sent, count) = self.run(window + Duration::from_secs(30), async {
            c.send(sink_frame.bytes());
            let cpu0 = sys::cpu_sample();
            let start = ws::now_ns();
            let end = start + window.as_nanos() as u64;
            let mut sent = 0u64;
            let mut lag = 0;
            match offered {
                Offered::Max => {
                    while ws::now_ns() < end {
                        c.out.below(SINK_QUEUE).await;
                        if c.out.broken() {
                            bail!("the connection failed");
                        }
                        c.send(frame.bytes());
                        sent += size as u64;
                    }
                }
                Offered::Rate(rate) => {
                    let total = (window.as_secs_f64() * rate / size as f64).floor().max(1.0) as u64;
                    lag = paced(rate / size as f64, total, |_, n| {
                        for _ in 0..n {
                            c.send(frame.bytes());
                        }
                        sent += n * size as u64;
                    })
                    .await?;
                }
            }
            let progress = shared.progress.notified();
            c.send(end_frame.bytes());
            let mut progress = std::pin::pin!(progress);
            let count = loop {
                if let Some(n) = shared.st.borrow().count {
                    break n;
                }
                progress.as_mut().await;
                progress.set(shared.progress.notified());
            };
            let secs = (ws::now_ns() - start) as f64 / 1e9;
            let cpu = sys::cpu_sample().since(&cpu0);
            Ok((secs, cpu, lag, sent, count))
        })?;
        if count != sent {
            bail!("the upstream counted {count} bytes of {sent}");
        }
        Ok(Measure {
            offered: offered.rate(),
            done: count,
            bytes: count,
            secs,
            rate: count as f64 / secs,
            max_lag_ms: lag as f64 / 1e6,
            cpu,
            tls: self.tls.clone(),
            ..Measure::default()
        })
    }
}

/// One connection's reads, for the life of the session (it runs only while a measurement drives
/// the session's tasks).
async fn reader(c: Rc<Conn>, shared: Rc<Shared>) {
    loop {
        if c.s.readable().await.is_err() {
            break;
        }
        let r = match &c.tls {
            None => BUF.with(|b| {
                let mut b = b.borrow_mut();
                match c.s.try_read(&mut b) {
                    Ok(0) => Err(()),
                    Ok(n) => on_bytes(&c, &shared, &mut b[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                    Err(_) => Err(()),
                }
            }),
            Some(tls) => read_records(&c, tls, &shared),
        };
        if r.is_err() {
            shared.st.borrow_mut().closed_conns += 1;
            break;
        }
    }
}

/// wss: one read of records from the socket, and the plaintext they held, as `on_bytes` takes it.
/// The end of the session (close_notify, or a TCP close without it) closes the connection.
fn read_records(c: &Conn, tls: &RefCell<ClientConnection>, shared: &Shared) -> Result<(), ()> {
    {
        let mut t = tls.borrow_mut();
        match t.read_tls(&mut TryRead(&c.s)) {
            Ok(0) => return Err(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(_) => return Err(()),
        }
        if t.process_new_packets().is_err() {
            return Err(());
        }
        // What the records called for (an alert, a key update) goes out at once.
        c.push_records(&mut t);
    }
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        loop {
            // The session is not borrowed while `on_bytes` runs: a closed loop sends from there.
            let r = tls.borrow_mut().reader().read(&mut b);
            match r {
                Ok(0) => return Err(()),
                Ok(n) => on_bytes(c, shared, &mut b[..n])?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(_) => return Err(()),
            }
        }
    })
}

fn on_bytes(c: &Conn, shared: &Shared, data: &mut [u8]) -> Result<(), ()> {
    let mut parser = c.parser.borrow_mut();
    let mut msg = c.msg.borrow_mut();
    let (first, stamp, text) = &mut *msg;
    let mut closed = false;
    parser
        .feed(data, &mut |e| match e {
            Event::Start { first: f, .. } => {
                *first = f;
                stamp.start();
                text.clear();
            }
            Event::Payload(p) => {
                stamp.take(p);
                if Event::opcode(*first) == OP_TEXT && text.len() < 32 {
                    text.extend_from_slice(&p[..p.len().min(32 - text.len())]);
                }
            }
            Event::End => {
                let op = Event::opcode(*first);
                let mut st = shared.st.borrow_mut();
                match (op, st.mode) {
                    (OP_BINARY, Mode::Echo { .. } | Mode::Broadcast) => {
                        let Some(ts) = stamp.stamp() else { return };
                        if ts < st.since {
                            return;
                        }
                        let now = ws::now_ns();
                        let _ = st.hist.record(now.saturating_sub(ts).max(1));
                        st.received += 1;
                        if st.mode == (Mode::Echo { closed: true }) && now < st.end {
                            st.sent += 1;
                            let bytes = st.frame.stamp(ws::now_ns());
                            c.send(bytes);
                        }
                        shared.progress.notify_one();
                    }
                    (OP_TEXT, Mode::Sink) => {
                        st.count = std::str::from_utf8(text).ok().and_then(|t| t.parse().ok());
                        shared.progress.notify_one();
                    }
                    (OP_CLOSE, _) => closed = true,
                    _ => {}
                }
            }
        })
        .map_err(|_| ())?;
    if closed { Err(()) } else { Ok(()) }
}

// ---------------------------------------------------------------------------------------------
// Handshakes

/// Connect, upgrade (with `host` in the Host field, or the address), one 16-byte echo, close
/// (both close frames, then the TCP close). Over TLS with `tls` (SNI and Host `tls::SNI`, and a
/// close_notify before the TCP close): returns what the handshake negotiated and whether it
/// resumed a session.
async fn one_handshake(
    addr: SocketAddr,
    host: Option<&str>,
    tls: Option<&tls::Client>,
) -> Result<Option<(String, bool)>> {
    match tls {
        None => {
            let (mut s, _) = ws::connect_as(addr, host, "/echo", HANDSHAKE_TIMEOUT).await?;
            echo_and_close(&mut s).await?;
            Ok(None)
        }
        Some(t) => {
            let (mut s, _) = ws::connect_tls(addr, t, "/echo", HANDSHAKE_TIMEOUT).await?;
            let seen = (tls::negotiated(s.get_ref().1), tls::resumed(s.get_ref().1));
            echo_and_close(&mut s).await?;
            // The far end may have closed already: its answer to this is no concern.
            let _ = s.shutdown().await;
            Ok(Some(seen))
        }
    }
}

/// One 16-byte echo, then the closing handshake (our close frame, the far end's).
async fn echo_and_close(s: &mut (impl AsyncRead + AsyncWrite + Unpin)) -> Result<()> {
    s.write_all(Frame::binary(16, true).bytes()).await?;
    s.flush().await?;
    let mut parser = Parser::default();
    let mut buf = [0u8; 512];
    // Read frames until `want` has ended; EOF ends the close wait too.
    async fn until(s: &mut (impl AsyncRead + Unpin), parser: &mut Parser, buf: &mut [u8], want: u8) -> Result<()> {
        loop {
            let n = match s.read(buf).await {
                Ok(n) => n,
                // A TLS peer that closes TCP without a close_notify: an end like EOF.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                if want == OP_CLOSE {
                    return Ok(());
                }
                bail!("closed before the echo");
            }
            let mut first = 0;
            let mut got = false;
            parser.feed(&mut buf[..n], &mut |e| match e {
                Event::Start { first: f, .. } => first = f,
                Event::End if Event::opcode(first) == want => got = true,
                _ => {}
            })?;
            if got {
                return Ok(());
            }
        }
    }
    until(s, &mut parser, &mut buf, OP_BINARY).await?;
    s.write_all(Frame::new(OP_CLOSE, &1000u16.to_be_bytes(), true).bytes())
        .await?;
    s.flush().await?;
    until(s, &mut parser, &mut buf, OP_CLOSE).await?;
    Ok(())
}

/// Handshakes through `addr`: at the maximum, `clients` loops one after another each; at a fixed
/// rate, one started every 1/rate s (at most `HANDSHAKES_IN_FLIGHT` at once; the rest are lost).
pub fn handshakes(addr: SocketAddr, clients: usize, offered: Offered, window: Duration) -> Result<Measure> {
    handshakes_as(addr, &[], clients, offered, window)
}

/// As `handshakes`, with the Host field of each request the next of `hosts` in turn (none: the
/// address), so that a proxy of many services routes them to all of its services.
pub fn handshakes_as(
    addr: SocketAddr,
    hosts: &[String],
    clients: usize,
    offered: Offered,
    window: Duration,
) -> Result<Measure> {
    handshakes_with(addr, hosts, None, clients, offered, window)
}

/// As `handshakes`, over TLS with `tls` when given (which resumes sessions or not).
pub fn handshakes_with(
    addr: SocketAddr,
    hosts: &[String],
    tls: Option<tls::Client>,
    clients: usize,
    offered: Offered,
    window: Duration,
) -> Result<Measure> {
    #[derive(Default)]
    struct Count {
        ok: u64,
        err: u64,
        lost: u64,
        in_flight: usize,
        first_error: Option<String>,
        hist: Option<Histogram<u64>>,
        seen: Option<tls::Seen>,
    }
    let count = Rc::new(RefCell::new(Count {
        hist: Some(histogram()),
        seen: tls.as_ref().map(|_| tls::Seen::default()),
        ..Count::default()
    }));
    let hosts: Rc<[String]> = hosts.into();
    let tls: Rc<Option<tls::Client>> = Rc::new(tls);
    let next = std::cell::Cell::new(0usize);
    let one = Rc::new(move |count: Rc<RefCell<Count>>| {
        let host = (!hosts.is_empty()).then(|| {
            let i = next.get();
            next.set(i + 1);
            hosts[i % hosts.len()].clone()
        });
        let tls = tls.clone();
        async move {
            let t0 = ws::now_ns();
            count.borrow_mut().in_flight += 1;
            let r = timeout(
                Duration::from_secs(10),
                one_handshake(addr, host.as_deref(), tls.as_ref().as_ref()),
            )
            .await;
            let mut c = count.borrow_mut();
            c.in_flight -= 1;
            match r {
                Ok(Ok(negotiated)) => {
                    c.ok += 1;
                    let _ = c.hist.as_mut().expect("set").record((ws::now_ns() - t0).max(1));
                    if let (Some(seen), Some((n, resumed))) = (c.seen.as_mut(), negotiated) {
                        seen.add(n, resumed);
                    }
                    true
                }
                Ok(Err(e)) => {
                    c.err += 1;
                    c.first_error.get_or_insert_with(|| format!("{e:#}"));
                    false
                }
                Err(_) => {
                    c.err += 1;
                    c.first_error.get_or_insert_with(|| "timed out".into());
                    false
                }
            }
        }
    });
    let rt = runtime()?;
    let local = LocalSet::new();
    let hard = window + Duration::from_secs(60);
    let (secs, cpu, lag) = local.block_on(&rt, async {
        timeout(hard, async {
            let cpu0 = sys::cpu_sample();
            let start = ws::now_ns();
            let end = start + window.as_nanos() as u64;
            let mut lag = 0;
            let mut tasks = Vec::new();
            match offered {
                Offered::Max => {
                    for _ in 0..clients {
                        let (count, one) = (count.clone(), one.clone());
                        tasks.push(tokio::task::spawn_local(async move {
                            while ws::now_ns() < end {
                                if !one(count.clone()).await {
                                    // A refused or failed handshake: do not spin on it.
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                            }
                        }));
                    }
                    for t in tasks.drain(..) {
                        let _ = t.await;
                    }
                }
                Offered::Rate(rate) => {
                    let total = (window.as_secs_f64() * rate).floor() as u64;
                    lag = paced(rate, total, |_, n| {
                        for _ in 0..n {
                            if count.borrow().in_flight >= HANDSHAKES_IN_FLIGHT {
                                count.borrow_mut().lost += 1;
                            } else {
                                let f = one(count.clone());
                                tasks.push(tokio::task::spawn_local(async move {
                                    f.await;
                                }));
                            }
                        }
                    })
                    .await?;
                }
            }
            let secs = (ws::now_ns() - start) as f64 / 1e9;
            for t in tasks {
                let _ = t.await;
            }
            let cpu = sys::cpu_sample().since(&cpu0);
            anyhow::Ok((secs, cpu, lag))
        })
        .await
        .map_err(|_| anyhow!("handshakes run timed out after {hard:?}"))?
    })?;
    let c = count.borrow();
    Ok(Measure {
        offered: offered.rate(),
        done: c.ok,
        bytes: 0,
        secs,
        rate: c.ok as f64 / secs,
        latency: c.hist.as_ref().and_then(latency),
        lost: c.lost + c.err,
        errors: c.err,
        first_error: c.first_error.clone(),
        max_lag_ms: lag as f64 / 1e6,
        cpu,
        tls: c.seen.clone(),
    })
}
