//! The relay's limits on stalled peers, in both relay modes: a reset is noticed whatever the
//! other direction is doing (a direction blocked on a peer that does not read included); the send
//! timeout (`relay.send_timeout`) cuts a pair whose peer takes nothing while bytes wait for it,
//! and only such a pair; the socket buffer caps (`relay.client_sndbuf` and the other three) bound
//! what a stalled connection holds in the kernel.
//!
//! The kernel-mode tests need root (CAP_BPF, CAP_NET_ADMIN); where the kernel relay cannot load
//! they say "SKIPPED: ..." and pass, unless CI=true. The tests take turns ([`ONE_AT_A_TIME`]):
//! they count the process's sockets and measure socket memory. Figures go to stderr.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Mutex, oneshot};
use wsproxy_tests::relay_kit::*;
use wsproxy_tests::*;

const KIB: u64 = 1 << 10;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// Longest the proxy may take to pass a reset on: it notices one at once (milliseconds); the
/// bug this guards against held the pair for a minute.
const TEARDOWN: Duration = Duration::from_secs(2);

/// A relayed connection as [`RelayProxy::open_relayed`] makes it, with the test's own buffers
/// fixed (a set buffer is not autotuned): the client's receive buffer and the upstream's send
/// buffer, so that the test's own share of a stalled pipe is small and known.
async fn open_fixed(p: &RelayProxy, id: u64, client_rcvbuf: u32, upstream_sndbuf: usize) -> (TcpStream, TcpStream) {
    let accepted = p.hub.expect(id);
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(client_rcvbuf).unwrap();
    socket
        .bind(std::net::SocketAddr::new(client_ip(id as u32 + 1), 0))
        .unwrap();
    let mut c = within("connect", socket.connect(p.addr)).await.unwrap();
    c.write_all(request(&format!("/c/{id}")).as_bytes()).await.unwrap();
    let up = Accepted::wait(accepted).await;
    let mut u = up.stream;
    nix_sndbuf(&u, upstream_sndbuf);
    u.write_all(upgrade_response(&up.head).as_bytes()).await.unwrap();
    let head = read_head(&mut c).await;
    assert_eq!(status(&head), 101, "{head:?}");
    first_byte_each_way(&mut c, &mut u).await;
    (c, u)
}

fn nix_sndbuf(s: &TcpStream, bytes: usize) {
    use std::os::fd::AsRawFd;
    let v = bytes as libc::c_int;
    // SAFETY: a valid fd and an in-buffer of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_SNDBUF: {}", io::Error::last_os_error());
}

/// Relayed connections that ended with `end` ("send timeout", "client error", ...) in `mode`,
/// from the proxy's metrics.
fn ended(p: &RelayProxy, mode: &str, end: &str) -> u64 {
    let line = format!("wsproxy_connections_ended_total{{service=\"default\",relay=\"{mode}\",end=\"{end}\"}} ");
    p.server
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(&line)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Polls until every socket opened since `before` is closed: the proxy's two included.
async fn wait_sockets_closed(before: &std::collections::BTreeSet<u64>, what: &str) {
    let closed = poll_until(DEADLINE, || socket_inodes().is_subset(before).then_some(())).await;
    assert!(closed.is_some(), "{what}: sockets still open: {:?}", socket_table());
}

// ---- a reset while a direction is blocked ----

#[derive(Clone, Copy, Debug, PartialEq)]
enum Side {
    Client,
    Upstream,
}

/// `resetter` floods the other side, which never reads, until the pipe is stalled (the proxy's
/// write towards the other side blocks), then resets. The proxy must reset the other side at
/// once, count the end against the resetting side, and close both of its sockets.
async fn reset_while_blocked(mode: &str, resetter: Side) {
    let _g = ONE_AT_A_TIME.lock().await;
    let Some(p) = RelayProxy::start(mode, "").await else {
        return;
    };
    let what = format!("{mode}: the {resetter:?} resets while flooding a peer that does not read");
    let before = socket_inodes();
    let (c, u) = p.open_relayed(1).await;
    let (r, f) = if resetter == Side::Client { (c, u) } else { (u, c) };
    let sent = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = oneshot::channel();
    let pump = pump(r, 0x5e7, Arc::clone(&sent), stopped);
    let stalled_at = wait_stalled(&sent, &what).await;
    let _ = stop.send(());
    let (r, res) = within("the flood to stop", pump).await.unwrap();
    res.unwrap_or_else(|e| panic!("{what}: the flood failed before the reset: {e}"));
    let reset_at = Instant::now();
    reset(r);
    let took = wait_state(&f, tcp_state::CLOSE, TEARDOWN).await;
    let Some(took) = took else {
        panic!(
            "{what}: the far side was not reset within {TEARDOWN:?}: state {}, totals {:?}",
            state(&f),
            p.server.totals()
        );
    };
    drop(f);
    let t = p.wait_idle().await;
    assert_eq!(t.open, [0, 0], "{what}: {t:?}");
    let end = if resetter == Side::Client {
        "client error"
    } else {
        "upstream error"
    };
    let m = if mode == "kernel" { "kernel" } else { "userspace" };
    assert_eq!(ended(&p, m, end), 1, "{what}: ends {}", p.server.metrics_text());
    wait_sockets_closed(&before, &what).await;
    say(&format!(
        "{what}: {stalled_at} bytes sent before the stall; far side reset {:.1?} after the reset ({:.1?} by the poll)",
        reset_at.elapsed(),
        took
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_while_its_upstream_does_not_read_userspace() {
    reset_while_blocked("userspace", Side::Client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_while_its_client_does_not_read_userspace() {
    reset_while_blocked("userspace", Side::Upstream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_while_its_upstream_does_not_read_kernel() {
    reset_while_blocked("kernel", Side::Client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_while_its_client_does_not_read_kernel() {
    reset_while_blocked("kernel", Side::Upstream).await;
}

// ---- the send timeout ----

const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Three connections through a proxy with `send_timeout = "1s"`: a client that never reads while
/// its upstream streams (cut, counted as "send timeout"), an idle one and a slow reader (its
/// client reads 16 KiB every 50 ms while its upstream streams), both opened before and still
/// open and intact well after the stalled one was cut.
async fn send_timeout(mode: &str) {
    let _g = ONE_AT_A_TIME.lock().await;
    let relay = format!("send_timeout = \"{}s\"\n", SEND_TIMEOUT.as_secs());
    let Some(p) = RelayProxy::start(mode, &relay).await else {
        return;
    };
    let m = if mode == "kernel" { "kernel" } else { "userspace" };
    let before = socket_inodes();
    let (mut idle_c, mut idle_u) = p.open_relayed(1).await;
    // The slow reader's buffer is fixed, so that each 16 KiB it reads soon opens the window again.
    let (mut slow_c, slow_u) = open_fixed(&p, 2, 64 * KIB as u32, 64 * KIB as usize).await;
    let (stalled_c, stalled_u) = p.open_relayed(3).await;

    let slow_sent = Arc::new(AtomicU64::new(0));
    let (slow_stop, slow_stopped) = oneshot::channel();
    let slow_pump = pump(slow_u, 0x51, Arc::clone(&slow_sent), slow_stopped);
    let stalled_sent = Arc::new(AtomicU64::new(0));
    let (_stalled_stop, stalled_stopped) = oneshot::channel();
    let started = Instant::now();
    let stalled_pump = pump(stalled_u, 0x57, Arc::clone(&stalled_sent), stalled_stopped);

    // The slow reader reads for 4 timeouts (bounded: 80 reads); meanwhile the stalled pair must
    // be cut.
    let mut buf = vec![0u8; 16 * KIB as usize];
    let (mut slow_got, mut cut_after) = (0u64, None);
    for _ in 0..80 {
        let n = within("the slow reader's read", slow_c.read(&mut buf)).await.unwrap();
        assert!(n > 0, "{mode}: the slow reader got EOF after {slow_got} bytes");
        assert_eq!(
            first_difference(0x51, slow_got, &buf[..n]),
            None,
            "{mode}: corrupt stream"
        );
        slow_got += n as u64;
        if cut_after.is_none() && state(&stalled_c) == tcp_state::CLOSE {
            cut_after = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let read_for = started.elapsed();
    let cut_after = match cut_after {
        Some(t) => t,
        None => wait_state(&stalled_c, tcp_state::CLOSE, DEADLINE)
            .await
            .map(|_| started.elapsed())
            .unwrap_or_else(|| {
                panic!(
                    "{mode}: the stalled pair was not cut (send timeout {SEND_TIMEOUT:?}): client state {}",
                    state(&stalled_c)
                )
            }),
    };
    assert!(
        cut_after >= SEND_TIMEOUT,
        "{mode}: the stalled pair was cut {cut_after:?} after its upstream began, before the send timeout"
    );
    let (stalled_u, r) = within("the stalled upstream's flood to end", stalled_pump)
        .await
        .unwrap();
    assert!(r.is_err(), "{mode}: the stalled upstream was not cut");
    drop((stalled_c, stalled_u));
    assert_eq!(ended(&p, m, "send timeout"), 1, "{mode}: {}", p.server.metrics_text());

    // The slow reader: still connected, and read well past the stalled pair's cut.
    assert!(
        read_for >= cut_after + 2 * SEND_TIMEOUT,
        "{mode}: the slow reader stopped {read_for:?} in, too soon after the cut at {cut_after:?} to show anything"
    );
    assert_eq!(
        state(&slow_c),
        tcp_state::ESTABLISHED,
        "{mode}: the slow reader was cut"
    );
    let _ = slow_stop.send(());
    let (slow_u, r) = within("the slow upstream's flood to stop", slow_pump).await.unwrap();
    r.unwrap_or_else(|e| panic!("{mode}: the slow reader's upstream was cut: {e}"));
    // The idle pair: still relays both ways.
    idle_c.write_all(b"still here").await.unwrap();
    let mut got = [0u8; 10];
    within("the idle pair's upstream", idle_u.read_exact(&mut got))
        .await
        .unwrap();
    idle_u.write_all(b"and here..").await.unwrap();
    within("the idle pair's client", idle_c.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got, b"and here..");
    assert_eq!(ended(&p, m, "send timeout"), 1, "{mode}: {}", p.server.metrics_text());
    say(&format!(
        "{mode} send timeout {SEND_TIMEOUT:?}: the stalled pair cut {cut_after:.2?} after its upstream began \
         ({} bytes got through); the slow reader read {slow_got} bytes over {read_for:.1?} and stayed; the idle pair stayed",
        stalled_sent.load(Relaxed)
    ));
    drop((idle_c, idle_u, slow_c, slow_u));
    p.wait_idle().await;
    wait_sockets_closed(&before, mode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_timeout_cuts_only_a_stalled_pair_userspace() {
    send_timeout("userspace").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_timeout_cuts_only_a_stalled_pair_kernel() {
    send_timeout("kernel").await;
}

// ---- the socket buffer caps ----

/// Stalled connections per measurement: enough that the figure per connection is an average.
const STALLED: u64 = 10;
/// The caps of the capped run, on all four buffers.
const CAP: u64 = 64 * KIB;

/// [`STALLED`] connections whose upstream streams into a client that never reads, through a
/// proxy with the `relay` lines; returns what the proxy's sockets hold once every upstream is
/// stalled, and the bytes the upstreams got through until then.
async fn stalled_memory(mode: &str, relay: &str) -> Option<(SkMem, u64)> {
    let p = RelayProxy::start(mode, relay).await?;
    let mut held = Vec::new();
    for id in 0..STALLED {
        let (c, u) = open_fixed(&p, id, 64 * KIB as u32, 64 * KIB as usize).await;
        let sent = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = oneshot::channel();
        let pump = pump(u, id, Arc::clone(&sent), stopped);
        held.push((c, sent, stop, pump));
    }
    let mut through = 0;
    for (id, (_, sent, _, _)) in held.iter().enumerate() {
        through += wait_stalled(sent, &format!("{mode}: stalled connection {id}")).await;
    }
    let m = proxy_skmem(&p);
    assert_eq!(m.sockets, 2 * STALLED, "{mode}: the proxy's relayed sockets ({m:?})");
    for (c, _, stop, pump) in held {
        let _ = stop.send(());
        let (u, r) = within("a flood to stop", pump).await.unwrap();
        r.unwrap_or_else(|e| panic!("{mode}: a stalled upstream was cut: {e}"));
        drop((c, u));
    }
    p.wait_idle().await;
    Some((m, through))
}

/// The kernel relay's in-flight credit in the capped run: bytes the verdict has redirected but
/// the destination's socket has not yet taken wait in the socket map's queue, outside any socket
/// buffer (and outside /proc/net/sockstat), so the caps alone do not bound them.
const CREDIT: u64 = 64 * KIB;

/// What stalled connections hold, without caps (the kernel's autotuning) and with all four
/// buffers capped at [`CAP`] (kernel mode: and the credit at [`CREDIT`]). Two measures:
///
/// - The proxy's sockets (`ss -m`): capped, a connection holds at most its two queues, the
///   client socket's send queue and the upstream socket's receive queue, each at most twice its
///   cap (the kernel doubles a set value for skb overhead) plus one skb over (64 KiB of payload
///   on loopback, its truesize a little more): 4 x CAP + 2 x 96 KiB.
/// - The bytes the upstream got through before it stalled: every byte held anywhere in the pipe,
///   the socket map's queue included. Capped: the test's own buffers (64 KiB each, doubled, one
///   skb over on the sending one), the proxy's sockets as above, the userspace relay's 64 KiB
///   buffer and the kernel relay's credit.
///
/// Uncapped, a connection must hold several times the capped bound, or the caps would prove
/// nothing here.
async fn buffer_caps(mode: &str) {
    let _g = ONE_AT_A_TIME.lock().await;
    let mut caps =
        format!("client_sndbuf = {CAP}\nclient_rcvbuf = {CAP}\nupstream_sndbuf = {CAP}\nupstream_rcvbuf = {CAP}\n");
    if mode == "kernel" {
        caps.push_str(&format!("max_in_flight_bytes = {CREDIT}\n"));
    }
    let Some((free, free_through)) = stalled_memory(mode, "").await else {
        return;
    };
    let (capped, capped_through) = stalled_memory(mode, &caps).await.unwrap();
    let per = |b: u64| b / STALLED;
    let bound = 4 * CAP + 2 * 96 * KIB;
    let credit = if mode == "kernel" { CREDIT } else { 0 };
    let own = 2 * 64 * KIB + 2 * 64 * KIB + 96 * KIB;
    let through_bound = own + bound + 64 * KIB + credit;
    say(&format!(
        "{mode}: per stalled connection, the proxy's sockets hold {} KiB uncapped ({free:?} for {STALLED}), \
         {} KiB with every buffer capped at {} KiB ({capped:?}); bound {} KiB. The upstream got {} KiB through before \
         it stalled uncapped, {} KiB capped (bound {} KiB)",
        per(free.total()) / KIB,
        per(capped.total()) / KIB,
        CAP / KIB,
        bound / KIB,
        per(free_through) / KIB,
        per(capped_through) / KIB,
        through_bound / KIB,
    ));
    assert!(
        per(capped.total()) <= bound,
        "{mode}: a stalled connection's sockets hold {} bytes with caps of {CAP}, more than {bound}",
        per(capped.total())
    );
    assert!(
        per(capped_through) <= through_bound,
        "{mode}: a stalled connection took {} bytes with caps of {CAP}, more than {through_bound}",
        per(capped_through)
    );
    assert!(
        per(free.total()) >= 4 * bound && per(free_through) >= 4 * through_bound,
        "{mode}: a stalled connection holds only {} bytes ({} through) without caps: the measurement cannot tell",
        per(free.total()),
        per(free_through)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_caps_bound_a_stalled_connection_userspace() {
    buffer_caps("userspace").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_caps_bound_a_stalled_connection_kernel() {
    buffer_caps("kernel").await;
}

// ---- the maximum lifetime ----

/// `relay.max_lifetime` with jitter: connections that keep talking are cut between the lifetime
/// and the lifetime plus the jitter, not all at once; `auto` keeps the deadline across its move
/// to the kernel relay.
async fn max_lifetime(mode: &str) {
    const N: u64 = 6;
    let (lifetime, jitter) = (Duration::from_millis(400), Duration::from_millis(400));
    let extra = "max_lifetime = \"400ms\"\nmax_lifetime_jitter = \"400ms\"\n";
    let Some(p) = RelayProxy::start(mode, extra).await else {
        return;
    };
    let mut ends = Vec::new();
    for id in 1..=N {
        let (c, u) = p.open(id).await;
        let opened = Instant::now();
        ends.push(tokio::spawn(async move {
            // Round trips until the proxy cuts the pair: enough of them for `auto` to move it.
            let (mut c, mut u) = (c, u);
            let mut b = [0u8; 64];
            for _ in 0..10_000 {
                if c.write_all(&b).await.is_err() || u.read_exact(&mut b).await.is_err() {
                    break;
                }
                if u.write_all(&b).await.is_err() || c.read_exact(&mut b).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            opened.elapsed()
        }));
    }
    let mut lived = Vec::new();
    for e in ends {
        lived.push(within("a connection to be cut", e).await.unwrap());
    }
    for l in &lived {
        // The cut comes from the proxy's timer; the client notices it at its next round trip.
        assert!(
            *l >= lifetime && *l < lifetime + jitter + Duration::from_millis(300),
            "{mode}: {lived:?}"
        );
    }
    let spread = lived.iter().max().unwrap().saturating_sub(*lived.iter().min().unwrap());
    assert!(
        spread >= Duration::from_millis(20),
        "{mode}: all cut at once: {lived:?}"
    );
    let m = wsproxy_tests::exposition::Exposition::parse(&p.server.metrics_text());
    assert_eq!(
        m.sum("wsproxy_connections_ended_total", &[("end", "max lifetime")]),
        N as f64,
        "{mode}"
    );
    if mode == "auto" {
        assert_eq!(p.server.totals().promotions, N, "every pair moved before its cut");
    }
    say(&format!("max lifetime {mode}: {N} connections cut after {lived:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_lifetime_cuts_talking_connections_spread_by_jitter_userspace() {
    max_lifetime("userspace").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_lifetime_cuts_talking_connections_spread_by_jitter_kernel() {
    max_lifetime("kernel").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_lifetime_holds_across_the_move_to_the_kernel_auto() {
    max_lifetime("auto").await;
}
