//! Floods from many loopback source addresses (127.x.y.z), bounded so that CI runs them: a
//! handshake flood from one address is rate limited while well-behaved addresses keep getting
//! their 101s; and 2,000 concurrent half-open handshakes (not 10,000: CI time and descriptor
//! limits) are held within bounded memory and descriptors, answered 408 at the head timeout, and
//! leave nothing behind. (Descriptor exhaustion of the accept loop is tested on the real binary:
//! `proxy/tests/emfile.rs`.)
//!
//! The proxy runs in this process, so the memory (VmRSS) and descriptor figures are the proxy's
//! plus the test's own client sockets; the bounds allow for both. The two tests take turns
//! ([`ONE_AT_A_TIME`]) so that neither moves the other's figures. Figures go to stderr (straight
//! to the handle) for quoting.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use wsproxy_tests::hardening_kit::{fd_count, mib, raise_nofile, vm_rss};
use wsproxy_tests::relay_kit::{poll_until, say};
use wsproxy_tests::*;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

const MIB: u64 = 1 << 20;

/// One handshake from `from`: the status of the answer (0: closed without one) and its
/// Retry-After. A 101 connection is closed right away.
async fn handshake(from: IpAddr, proxy: std::net::SocketAddr) -> (u16, Option<String>) {
    let mut s = connect_from(from, proxy).await;
    s.write_all(request("/flood").as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    (status(&head), header(&head, "retry-after"))
}

async fn echo_roundtrip(from: IpAddr, proxy: std::net::SocketAddr) {
    let mut ws = ws_connect(from, proxy).await.expect("an honest client's handshake");
    ws.send(Message::text("still there?")).await.unwrap();
    let back = within("the echo", ws.next()).await.unwrap().unwrap();
    assert_eq!(back, Message::text("still there?"));
    let _ = ws.close(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_flood_from_one_address_is_limited_while_others_get_through() {
    let _g = ONE_AT_A_TIME.lock().await;
    const RATE: f64 = 5.0;
    const BURST: u64 = 10;
    const FLOOD: usize = 300;
    const POLITE: u32 = 20;
    const POLITE_EACH: usize = 5;
    let up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    let extra = format!(
        "[relay]\nmode = \"userspace\"\n[limits]\nrequests_per_second = {RATE:.1}\nburst = {BURST}\nmax_connections_per_ip = 0\n"
    );
    let proxy = Proxy::try_start(&config(&[up.addr], &[], &extra)).unwrap();
    let addr = proxy.addr;
    let flooder = client_ip(1000);

    // Well-behaved clients: 20 addresses, each one handshake every 250 ms (4/s, under the rate),
    // running while the flood lasts.
    let mut polite = JoinSet::new();
    for k in 0..POLITE {
        polite.spawn(async move {
            let ip = client_ip(2000 + k);
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut got = Vec::new();
            for _ in 0..POLITE_EACH {
                tick.tick().await;
                got.push(handshake(ip, addr).await.0);
            }
            got
        });
    }
    // The flood: 300 handshakes from one address, 30 at a time, as fast as they are answered.
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(30));
    let mut flood = JoinSet::new();
    for _ in 0..FLOOD {
        let permit = Arc::clone(&gate).acquire_owned().await.unwrap();
        flood.spawn(async move {
            let r = handshake(flooder, addr).await;
            drop(permit);
            r
        });
    }
    let (mut ok, mut limited, mut other) = (0u64, 0u64, Vec::new());
    while let Some(r) = within("the flood's answers", flood.join_next()).await {
        match r.unwrap() {
            (101, _) => ok += 1,
            (429, retry) => {
                limited += 1;
                let secs: u64 = retry.expect("a 429 without Retry-After").parse().unwrap();
                assert!((1..=2).contains(&secs), "Retry-After {secs} at {RATE}/s");
            }
            (s, _) => other.push(s),
        }
    }
    let flood_secs = started.elapsed().as_secs_f64();
    let mut polite_ok = 0;
    while let Some(r) = within("the well-behaved clients", polite.join_next()).await {
        let got = r.unwrap();
        assert!(
            got.iter().all(|&s| s == 101),
            "a well-behaved client was refused: {got:?}"
        );
        polite_ok += got.len();
    }
    let polite_secs = started.elapsed().as_secs_f64();
    // The flooder gets its burst plus the refill over the time it flooded, and no more.
    let allowed = BURST + (RATE * flood_secs).ceil() as u64 + 1;
    say(&format!(
        "flood: 1 address, {FLOOD} handshakes in {flood_secs:.2} s: {ok} x 101, {limited} x 429 (allowed at most \
         {allowed}); {POLITE} well-behaved addresses: {polite_ok}/{} x 101 over {polite_secs:.2} s",
        POLITE as usize * POLITE_EACH
    ));
    assert!(other.is_empty(), "answers other than 101/429: {other:?}");
    assert!(ok >= BURST, "the flooder's burst was not admitted: {ok} x 101");
    assert!(
        ok <= allowed,
        "the flooder got {ok} handshakes through, more than {allowed}"
    );
    assert_eq!(ok + limited, FLOOD as u64);
    assert_eq!(polite_ok, POLITE as usize * POLITE_EACH);
    // Refused handshakes never reached the upstream: it saw exactly the admitted ones.
    assert_eq!(
        up.accepted() as u64,
        ok + polite_ok as u64,
        "refused handshakes reached the upstream"
    );
    proxy.stop().await;
}

/// Connections of one half-open round: 20 from each of 100 addresses.
/// Source addresses of the half-open flood: 100 (2,000 handshakes) in CI, where time is short;
/// `FLOOD_ADDRS=500` gives the 10,000 of the full run.
fn addrs() -> u32 {
    std::env::var("FLOOD_ADDRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}
const PER_ADDR: usize = 20;
/// Half-open handshakes held at once.
fn n() -> usize {
    addrs() as usize * PER_ADDR
}
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// What one round of half-open handshakes showed.
struct Round {
    open_secs: f64,
    statuses: std::collections::BTreeMap<u16, usize>,
    /// Earliest and latest 408, counted from the client's half head.
    first: Duration,
    last: Duration,
    peak_fds: usize,
    fds_after: usize,
    released: bool,
    peak_rss: u64,
    rss_after: u64,
    /// After `malloc_trim`: what the allocator kept for reuse is given back, what is still
    /// resident is in use.
    rss_trimmed: u64,
}

/// Opens `N` connections that each send half a request head and stay; measures descriptors and
/// memory while all are held, checks the proxy still serves and caps an address, waits for the
/// 408s and for every descriptor to be released.
async fn half_open_round(addr: std::net::SocketAddr, fds_start: usize) -> Round {
    #[allow(non_snake_case)]
    let N = n();
    let (ready_tx, mut ready) = mpsc::unbounded_channel::<()>();
    let gate = Arc::new(Semaphore::new(256));
    let mut clients = JoinSet::new();
    let opened = Instant::now();
    for i in 0..N {
        let ip = client_ip(3000 + (i / PER_ADDR) as u32);
        let (gate, ready_tx) = (Arc::clone(&gate), ready_tx.clone());
        clients.spawn(async move {
            let mut s = {
                let _p = gate.acquire().await.unwrap();
                let mut s = connect_from(ip, addr).await;
                s.write_all(b"GET /half-open HTTP/1.1\r\nHost: te").await.unwrap();
                s
            };
            let sent = Instant::now();
            let _ = ready_tx.send(());
            let mut answer = Vec::new();
            let mut chunk = [0u8; 512];
            let limit = HEADER_TIMEOUT + DEADLINE;
            let _ = tokio::time::timeout(limit, async {
                while let Ok(n) = s.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    answer.extend_from_slice(&chunk[..n]);
                }
            })
            .await;
            (status(&String::from_utf8_lossy(&answer)), sent.elapsed())
        });
    }
    drop(ready_tx);
    for _ in 0..N {
        within("the half-open handshakes to be sent", ready.recv())
            .await
            .expect("a client task failed");
    }
    let open_secs = opened.elapsed().as_secs_f64();
    // Every client socket is open; the proxy has accepted each once its descriptor is here too.
    let peak_fds = poll_until(DEADLINE, || {
        let n = fd_count();
        (n + SETTLING_SOCKETS >= fds_start + 2 * N).then_some(n)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the proxy did not accept {N} connections: {} fds, {fds_start} at start",
            fd_count()
        )
    });
    let peak_rss = vm_rss();

    // Held at once, the proxy still serves: an honest client, and the per-address cap refuses a
    // 21st connection of an address at once.
    echo_roundtrip(client_ip(9001), addr).await;
    let capped = exchange(client_ip(3000), addr, request("/one-more").as_bytes()).await;
    assert_eq!(status(&capped), 429, "{capped}");
    assert!(
        opened.elapsed() < HEADER_TIMEOUT,
        "opening {N} connections took longer than the head timeout; the peak figures are not of {N} at once"
    );

    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let (mut first, mut last) = (Duration::MAX, Duration::ZERO);
    while let Some(r) = within("the 408s", clients.join_next()).await {
        let (s, took) = r.unwrap();
        *statuses.entry(s).or_default() += 1;
        if s == 408 {
            (first, last) = (first.min(took), last.max(took));
        }
    }
    let released = poll_until(DEADLINE, || (fd_count() <= fds_start + SETTLING_SOCKETS).then_some(()))
        .await
        .is_some();
    let (fds_after, rss_after) = (fd_count(), vm_rss());
    // SAFETY: malloc_trim only returns free memory of the allocator to the system.
    unsafe { libc::malloc_trim(0) };
    let rss_trimmed = vm_rss();
    Round {
        open_secs,
        statuses,
        first,
        last,
        peak_fds,
        fds_after,
        released,
        peak_rss,
        rss_after,
        rss_trimmed,
    }
}

/// Sockets of earlier work that close on their own schedule: the warm-up echo's four (client, the
/// proxy's two, the echo server's) and those of the test before, so that the start count may hold
/// some that are gone a moment later, or miss some still closing.
const SETTLING_SOCKETS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_handshakes_are_bounded_and_freed_at_the_head_timeout() {
    #[allow(non_snake_case)]
    let (N, ADDRS) = (n(), addrs());
    let _g = ONE_AT_A_TIME.lock().await;
    // Descriptors: each half-open handshake holds two here (the client's and the proxy's).
    let limit = raise_nofile(65_536);
    assert!(
        limit as usize >= 2 * N + 512,
        "RLIMIT_NOFILE {limit} is too low for {N} connections"
    );
    let echo = echo_upstream().await;
    let extra = format!(
        "[relay]\nmode = \"userspace\"\n[handshake]\nheader_timeout = \"{}s\"\n\
         [limits]\nrequests_per_second = 100.0\nburst = 100\nmax_connections_per_ip = {PER_ADDR}\n",
        HEADER_TIMEOUT.as_secs()
    );
    let proxy = Proxy::try_start(&config(&[echo], &[], &extra)).unwrap();
    let addr = proxy.addr;
    // Descriptors before any connection; memory after a warm-up (runtime threads, allocator
    // arenas, the echo path), whose sockets may still be closing.
    let fds_start = fd_count();
    echo_roundtrip(client_ip(9000), addr).await;
    let rss_start = vm_rss();

    // Two rounds: the second shows that what the first left resident is reused, not leaked.
    let mut rounds = Vec::new();
    for n in 1..=2 {
        let r = half_open_round(addr, fds_start).await;
        say(&format!(
            "half-open round {n}: {N} handshakes from {ADDRS} addresses, opened in {:.2} s; answers {:?} \
             {:.2}-{:.2} s after the half head (header_timeout {} s)",
            r.open_secs,
            r.statuses,
            r.first.as_secs_f64(),
            r.last.as_secs_f64(),
            HEADER_TIMEOUT.as_secs()
        ));
        say(&format!(
            "half-open round {n}: fds {fds_start} at start, {} with {N} held ({:.2} per connection, client side \
             included), {} after",
            r.peak_fds,
            (r.peak_fds - fds_start) as f64 / N as f64,
            r.fds_after
        ));
        say(&format!(
            "half-open round {n}: VmRSS {:.1} MiB at start, {:.1} MiB with {N} held (+{:.1} MiB, {:.1} KiB per \
             connection, client side included), {:.1} MiB after, {:.1} MiB after malloc_trim",
            mib(rss_start),
            mib(r.peak_rss),
            mib(r.peak_rss.saturating_sub(rss_start)),
            r.peak_rss.saturating_sub(rss_start) as f64 / 1024.0 / N as f64,
            mib(r.rss_after),
            mib(r.rss_trimmed),
        ));
        rounds.push(r);
    }
    for r in &rounds {
        assert_eq!(
            r.statuses.get(&408),
            Some(&N),
            "every half-open handshake gets 408: {:?}",
            r.statuses
        );
        // The proxy's clock starts at accept, a moment before the client's write.
        assert!(
            r.first >= HEADER_TIMEOUT - Duration::from_secs(1),
            "a 408 came early: {:?}",
            r.first
        );
        assert!(r.last <= HEADER_TIMEOUT + DEADLINE, "a 408 came late: {:?}", r.last);
        // Two descriptors per connection (plus the few the runtime opens), all released after.
        assert!(
            r.peak_fds <= fds_start + 2 * N + 64,
            "{} fds for {N} connections",
            r.peak_fds
        );
        assert!(
            r.released,
            "descriptors not released: {} now, {fds_start} at start (+{SETTLING_SOCKETS})",
            r.fds_after
        );
        // At most 48 KiB resident per connection, proxy and client together.
        assert!(
            r.peak_rss <= rss_start + 48 * 1024 * N as u64,
            "VmRSS {:.1} MiB with {N} held",
            mib(r.peak_rss)
        );
        // Afterwards, what is still in use is within 8 MiB of the start.
        assert!(
            r.rss_trimmed <= rss_start + 8 * MIB,
            "VmRSS {:.1} MiB after the round (trimmed), {:.1} MiB at start",
            mib(r.rss_trimmed),
            mib(rss_start)
        );
    }
    // The second round needs no more memory than the first.
    assert!(
        rounds[1].peak_rss <= rounds[0].peak_rss + 8 * MIB,
        "VmRSS peak grew from {:.1} MiB to {:.1} MiB between rounds",
        mib(rounds[0].peak_rss),
        mib(rounds[1].peak_rss)
    );
    // And it still serves.
    echo_roundtrip(client_ip(9002), addr).await;
    proxy.stop().await;
}
