//! The proxy under a low descriptor limit: the real `wsproxy run`, started with a low
//! RLIMIT_NOFILE (set in the child before exec).
//!
//! - More client connections than it has descriptors for: client accepts pause at the
//!   descriptor budget ("client accepts paused", at most a line a second), never reaching
//!   EMFILE ("accept failed"), cheap on CPU (utime + stime from /proc/PID/stat); the admin
//!   listener still answers from the reserve, and a new client gets its 101 once the
//!   connections are closed.
//! - 4,200 idle admin connections under `ulimit -n 4096`: all but `admin.max_connections` of
//!   them are answered 503 and closed, and an honest WebSocket handshake still succeeds.
//!
//! Their own test binary and the real binary, because lowering the limit of the test process
//! would starve every other test in it. Figures go to stderr (straight to the handle) for quoting.

mod common;

use std::time::{Duration, Instant};

use common::{DAEMON_DEADLINE, Daemon, admin_tcp, fds_of, free_port, temp_config};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use wsproxy_tests::echo_upstream;
use wsproxy_tests::relay_kit::{poll_every, say};

/// CPU time (user + system) of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at field 3, "state".
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Config text: proxy on `port`, admin on `admin_port` with `admin_keys`, limits out of the way,
/// accepted connections that send nothing held for the head timeout (60 s, longer than a test).
fn config(port: u16, admin_port: u16, admin_keys: &str, up: std::net::SocketAddr) -> String {
    format!(
        "[listen]\naddress = \"127.0.0.1:{port}\"\ndrain_timeout = \"1s\"\n\
         [admin]\naddress = \"127.0.0.1:{admin_port}\"\n{admin_keys}\n\
         [handshake]\nheader_timeout = \"60s\"\n\
         [limits]\nrequests_per_second = 1000000.0\nburst = 1000000\nmax_connections_per_ip = 0\n\
         [relay]\nmode = \"userspace\"\n\
         [upstreams]\nmain = [{{ address = \"{up}\" }}]\ntimeout = \"5s\"\n"
    )
}

/// A WebSocket handshake and one echoed message through the proxy on `port`.
async fn honest_echo(port: u16, text: &str) {
    let stream = tokio::time::timeout(DAEMON_DEADLINE, TcpStream::connect(("127.0.0.1", port)))
        .await
        .unwrap()
        .unwrap();
    let url = format!("ws://127.0.0.1:{port}/honest");
    let (mut ws, resp) = tokio::time::timeout(DAEMON_DEADLINE, tokio_tungstenite::client_async(url, stream))
        .await
        .expect("the honest handshake timed out")
        .expect("the honest handshake failed");
    assert_eq!(resp.status().as_u16(), 101);
    ws.send(Message::text(text)).await.unwrap();
    let echo = tokio::time::timeout(DAEMON_DEADLINE, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echo, Message::text(text));
}

/// `GET path` on the admin listener: (status, body).
async fn admin_get(port: u16, path: &str) -> (u16, String) {
    admin_tcp(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// Connections waiting in the accept queue of the IPv4 listener on `port` (the `rx_queue` of a
/// LISTEN socket in /proc/net/tcp).
fn accept_queue(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
        // State 0A: LISTEN.
        if local_port != port || *f.get(3)? != "0A" {
            return None;
        }
        u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()
    })
}

/// The value of a series in an exposition.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_accepts_pause_at_the_descriptor_budget_and_the_admin_listener_still_answers() {
    /// The proxy's descriptor limit.
    const NOFILE: u64 = 64;
    /// Connections opened at once: more than the proxy has descriptors for.
    const FLOOD: usize = 150;
    /// How long the proxy is watched at its budget.
    const WINDOW: Duration = Duration::from_secs(3);
    let up = echo_upstream().await;
    let (port, admin_port) = (free_port(), free_port());
    let path = temp_config("budget.toml", &config(port, admin_port, "max_connections = 4", up));
    let mut d = Daemon::run(&path, Some(NOFILE)).await;
    d.wait_for("admin endpoints").await;
    let fds_idle = fds_of(d.pid());

    // More connections than descriptors: the kernel completes them all (listen backlog 4096);
    // the proxy takes its budget's worth and pauses.
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        flood.push(
            tokio::time::timeout(DAEMON_DEADLINE, TcpStream::connect(("127.0.0.1", port)))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    // Paused at the budget (before the budget: out of descriptors).
    let first = d.wait_for_any(&["client accepts paused", "accept failed"]).await;
    let cpu_start = cpu_time(d.pid());
    let window_start = Instant::now();
    // The reserve: the admin listener answers while clients hold their whole budget.
    let (code, metrics) = admin_get(admin_port, "/metrics").await;
    assert_eq!(code, 200, "/metrics at the descriptor budget:\n{}", d.text());
    assert_eq!(admin_get(admin_port, "/healthz").await.0, 200);
    d.collect_until(first + WINDOW).await;
    let cpu = cpu_time(d.pid()) - cpu_start;
    let watched = window_start.elapsed();
    let fds_at_budget = fds_of(d.pid());
    let alive = d.alive();
    let paused = d
        .seen
        .iter()
        .filter(|(t, l)| l.contains("client accepts paused") && *t >= first && *t <= first + WINDOW)
        .count();
    say(&format!(
        "emfile: RLIMIT_NOFILE {NOFILE}; proxy fds {fds_idle} idle, {fds_at_budget} with {FLOOD} connections offered; \
         {paused} \"client accepts paused\" lines in the {:.1} s after the first, {} \"accept failed\"; \
         CPU {} ms over {:.2} s watched ({:.1} % of one core); /metrics answered at the budget",
        WINDOW.as_secs_f64(),
        d.count("accept failed"),
        cpu.as_millis(),
        watched.as_secs_f64(),
        100.0 * cpu.as_secs_f64() / watched.as_secs_f64()
    ));
    assert!(alive, "the proxy died at its descriptor budget:\n{}", d.text());
    assert!(
        d.text().contains("RLIMIT_NOFILE allows fewer client connections"),
        "no start-up warning about the budget:\n{}",
        d.text()
    );
    assert_eq!(
        d.count("accept failed"),
        0,
        "accept ran out of descriptors:\n{}",
        d.text()
    );
    assert_eq!(d.count("Too many open files"), 0, "{}", d.text());
    assert!(
        (fds_at_budget as u64) < NOFILE - 4,
        "the reserve was eaten: {fds_at_budget} fds of {NOFILE}"
    );
    assert!(sample(&metrics, "wsproxy_admin_refused_total{reason=\"over_capacity\"}").is_some());
    // One line a second while paused, not one per connection waiting.
    assert!(paused <= 5, "{paused} \"paused\" lines in {WINDOW:?}:\n{}", d.text());
    assert!(
        cpu <= Duration::from_millis(450),
        "{cpu:?} of CPU in {watched:?} at the descriptor budget"
    );

    // Close them: the proxy accepts again and serves a new client.
    drop(flood);
    let recovered = Instant::now();
    honest_echo(port, "back").await;
    say(&format!(
        "emfile: after closing the {FLOOD} connections a new client got its 101 and echo in {} ms; proxy fds {}",
        recovered.elapsed().as_millis(),
        fds_of(d.pid())
    ));
    let status = d.terminate().await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_cannot_starve_websocket_handshakes() {
    /// The proxy's descriptor limit: `ulimit -n 4096`.
    const NOFILE: u64 = 4096;
    /// Idle admin connections attempted: more than the proxy has descriptors.
    const IDLE: usize = 4200;
    const CAP: usize = 64;
    let own = common::raise_nofile();
    assert!(
        own > IDLE as u64 + 512,
        "this test needs RLIMIT_NOFILE above {}",
        IDLE + 512
    );
    let up = echo_upstream().await;
    let (port, admin_port) = (free_port(), free_port());
    // The idle connections that get a slot stay for the whole test.
    let path = temp_config(
        "idle-admin.toml",
        &config(
            port,
            admin_port,
            &format!("max_connections = {CAP}\nidle_timeout = \"1h\""),
            up,
        ),
    );
    let mut d = Daemon::run(&path, Some(NOFILE)).await;
    d.wait_for("admin endpoints").await;

    let start = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    let mut max_fds = 0;
    for i in 0..IDLE {
        idle.push(
            tokio::time::timeout(DAEMON_DEADLINE, TcpStream::connect(("127.0.0.1", admin_port)))
                .await
                .expect("an admin connect timed out")
                .unwrap(),
        );
        if i % 500 == 0 {
            max_fds = max_fds.max(fds_of(d.pid()));
        }
    }
    max_fds = max_fds.max(fds_of(d.pid()));
    let opened = start.elapsed();
    // The admin listener has taken every connection from the kernel's queue (each was held or
    // refused), or the proxy is out of descriptors (as it was before the cap): then the honest
    // client comes.
    // Kernel state raises no event: polled every 20 ms (each poll reads thousands of fds).
    let mut last = (0, 0);
    let drained = poll_every(DAEMON_DEADLINE, Duration::from_millis(20), || {
        let queued = accept_queue(admin_port).expect("the admin listener's socket in /proc/net/tcp");
        let fds = fds_of(d.pid());
        max_fds = max_fds.max(fds);
        last = (queued, fds);
        (queued == 0 || fds as u64 >= NOFILE - 1).then_some(())
    })
    .await;
    assert!(
        drained.is_some(),
        "{} admin connections still queued, {} proxy fds",
        last.0,
        last.1
    );

    // An honest client gets its WebSocket, and its echo.
    let honest = Instant::now();
    honest_echo(port, "still here").await;
    let honest = honest.elapsed();
    max_fds = max_fds.max(fds_of(d.pid()));

    // The ones past the cap were answered 503 and closed; the held ones get nothing. Read them
    // all at once, each for at most a second.
    let reads = idle.into_iter().map(|mut s| async move {
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(n)) if buf[..n].starts_with(b"HTTP/1.1 503") => Ok(true),
            Ok(r) => Err(format!("{r:?}: {:?}", String::from_utf8_lossy(&buf))),
            // Held by the listener: no answer, no close.
            Err(_) => Ok(false),
        }
    });
    let results = futures_util::future::join_all(reads).await;
    let answered_503 = results.iter().filter(|r| matches!(r, Ok(true))).count();
    let still_held = results.iter().filter(|r| matches!(r, Ok(false))).count();
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        panic!("an idle admin connection got {e}");
    }
    say(&format!(
        "emfile: RLIMIT_NOFILE {NOFILE}; {IDLE} idle admin connections opened in {} ms: {answered_503} answered 503, \
         {still_held} held; proxy fds at most {max_fds}; an honest WebSocket handshake and echo took {} ms",
        opened.as_millis(),
        honest.as_millis()
    ));
    assert_eq!(still_held, CAP, "{answered_503} answered 503");
    assert_eq!(answered_503, IDLE - CAP);
    assert!(
        (max_fds as u64) < 2 * CAP as u64 + 64,
        "the proxy held {max_fds} descriptors"
    );
    assert_eq!(d.count("accept failed"), 0, "{}", d.text());
    let status = d.terminate().await;
    assert!(status.success(), "exit status {status}");
}
