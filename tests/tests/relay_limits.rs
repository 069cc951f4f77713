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
use tokio::task::JoinHandle;
use wsproxy_tests::relay_kit::*;
use wsproxy_tests::*;

const KIB: u64 = 1 << 10;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// Longest the proxy may take to pass a reset on: it notices one at once (milliseconds); the
/// bug this guards against held the pair for a minute.
const TEARDOWN: Duration = Duration::from_secs(2);

/// Writes stream `seed` until told to stop or a write fails; returns the stream and the outcome.
fn flood(
    mut s: TcpStream,
    seed: u64,
    sent: Arc<AtomicU64>,
    mut stop: oneshot::Receiver<()>,
) -> JoinHandle<(TcpStream, io::Result<()>)> {
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

/// Polls until `count` stops growing for 100 ms (a stalled sender), bounded by the deadline.
async fn wait_stalled(count: &AtomicU64, what: &str) -> u64 {
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
    let mut b = [0u8; 1];
    c.write_all(b"c").await.unwrap();
    within("the client's first byte", u.read_exact(&mut b)).await.unwrap();
    u.write_all(b"u").await.unwrap();
    within("the upstream's first byte", c.read_exact(&mut b)).await.unwrap();
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
    let line = format!("wsproxy_connections_ended_total{{relay=\"{mode}\",end=\"{end}\"}} ");
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
    let pump = flood(r, 0x5e7, Arc::clone(&sent), stopped);
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
    let slow_pump = flood(slow_u, 0x51, Arc::clone(&slow_sent), slow_stopped);
    let stalled_sent = Arc::new(AtomicU64::new(0));
    let (_stalled_stop, stalled_stopped) = oneshot::channel();
    let started = Instant::now();
    let stalled_pump = flood(stalled_u, 0x57, Arc::clone(&stalled_sent), stalled_stopped);

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
