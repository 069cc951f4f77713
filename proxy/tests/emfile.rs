//! The accept loop out of file descriptors: the real `wsproxy run`, started with RLIMIT_NOFILE
//! 64 (set in the child before exec), is given more connections than it has descriptors. It must
//! back off ("accept failed" with a doubling `retry_in_ms`, not a line per attempt), stay cheap
//! on CPU while exhausted (utime + stime from /proc/PID/stat), stay alive, and serve a new client
//! with a 101 once the connections are closed.
//!
//! Its own test binary and the real binary, because lowering the limit of the test process would
//! starve every other test in it. Figures go to stderr (straight to the handle) for quoting.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_wsproxy");
const DEADLINE: Duration = Duration::from_secs(20);
/// The proxy's descriptor limit (soft and hard, so it cannot raise it).
const NOFILE: u64 = 64;
/// Connections opened at once: more than the proxy has descriptors for.
const FLOOD: usize = 150;
/// How long the exhausted proxy is watched.
const WINDOW: Duration = Duration::from_secs(3);

fn say(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{line}");
    let _ = e.flush();
}

/// A running `wsproxy` whose stderr lines arrive on a channel, each with its arrival time.
struct Daemon {
    child: Child,
    lines: mpsc::UnboundedReceiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
}

impl Daemon {
    fn start(config: &std::path::Path) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: setrlimit is async-signal-safe; the closure allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                let l = libc::rlimit {
                    rlim_cur: NOFILE,
                    rlim_max: NOFILE,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Daemon {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the first line containing `needle` (after those already seen) and returns its
    /// arrival time.
    async fn wait_for(&mut self, needle: &str) -> Instant {
        if let Some((t, _)) = self.seen.iter().find(|(_, l)| l.contains(needle)) {
            return *t;
        }
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(end, self.lines.recv()).await {
                Ok(Some((t, l))) => {
                    let hit = l.contains(needle);
                    self.seen.push((t, l));
                    if hit {
                        return t;
                    }
                }
                _ => panic!("no log line with {needle:?}; got:\n{}", self.text()),
            }
        }
    }

    /// Takes every line that arrives until `until`.
    async fn collect_until(&mut self, until: Instant) {
        let end = tokio::time::Instant::from_std(until);
        while let Ok(Some(line)) = tokio::time::timeout_at(end, self.lines.recv()).await {
            self.seen.push(line);
        }
    }

    fn text(&self) -> String {
        self.seen.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM, then the exit status (bounded poll: std has no readiness signal for a child's exit).
    fn terminate(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        common::wait_exit(&mut self.child, DEADLINE).expect("wsproxy did not exit after SIGTERM")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

fn fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn temp_config(text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wsproxy-emfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("wsproxy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_backs_off_when_out_of_descriptors_and_recovers() {
    let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = up.local_addr().unwrap();
    tokio::spawn(wsproxy::echo::serve(up, std::future::pending()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Accepted connections that send nothing hold their descriptor for the head timeout (60 s,
    // longer than the test): that is what exhausts the proxy.
    let path = temp_config(&format!(
        "[listen]\naddress = \"127.0.0.1:{port}\"\ndrain_timeout = \"1s\"\n\
         [handshake]\nheader_timeout = \"60s\"\n\
         [limits]\nrequests_per_second = 1000000.0\nburst = 1000000\nmax_connections_per_ip = 0\n\
         [relay]\nmode = \"userspace\"\n\
         [upstreams]\nmain = [{{ address = \"{up_addr}\" }}]\ntimeout = \"5s\"\n"
    ));
    let mut d = Daemon::start(&path);
    d.wait_for("accepting connections").await;
    let fds_idle = fds_of(d.pid());

    // More connections than descriptors: the kernel completes them all (listen backlog 4096);
    // the proxy takes what it can, then accept fails with EMFILE.
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        flood.push(
            tokio::time::timeout(DEADLINE, TcpStream::connect(("127.0.0.1", port)))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let first = d.wait_for("accept failed").await;
    let cpu_start = cpu_time(d.pid());
    let window_start = Instant::now();
    d.collect_until(first + WINDOW).await;
    let cpu = cpu_time(d.pid()) - cpu_start;
    let watched = window_start.elapsed();
    let fds_exhausted = fds_of(d.pid());
    let alive = d.alive();
    let failures: Vec<&String> = d
        .seen
        .iter()
        .filter(|(t, l)| l.contains("accept failed") && *t >= first && *t <= first + WINDOW)
        .map(|(_, l)| l)
        .collect();
    let retries: Vec<u64> = failures
        .iter()
        .filter_map(|l| {
            l.split("retry_in_ms=")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    say(&format!(
        "emfile: RLIMIT_NOFILE {NOFILE}; proxy fds {fds_idle} idle, {fds_exhausted} with {FLOOD} connections offered; \
         {} \"accept failed\" lines in the {:.1} s after the first (retry_in_ms {retries:?}); CPU {} ms over {:.2} s \
         watched ({:.1} % of one core)",
        failures.len(),
        WINDOW.as_secs_f64(),
        cpu.as_millis(),
        watched.as_secs_f64(),
        100.0 * cpu.as_secs_f64() / watched.as_secs_f64()
    ));
    assert!(alive, "the proxy died when out of descriptors:\n{}", d.text());
    assert!(
        failures[0].contains("Too many open files"),
        "not EMFILE: {}",
        failures[0]
    );
    assert!(
        fds_exhausted as u64 >= NOFILE - 2,
        "not exhausted: {fds_exhausted} fds of {NOFILE}"
    );
    // A spinning accept loop would log thousands of lines and burn a core; with the backoff
    // (5 ms doubling to 1 s) about ten lines come in 3 s.
    assert!(
        failures.len() >= 3,
        "the accept loop stopped retrying: {} lines",
        failures.len()
    );
    assert!(
        failures.len() <= 20,
        "{} \"accept failed\" lines in {WINDOW:?}:\n{}",
        failures.len(),
        d.text()
    );
    assert!(
        retries.windows(2).all(|w| w[0] <= w[1]),
        "the backoff does not grow: {retries:?}"
    );
    assert_eq!(
        retries.last(),
        Some(&1000),
        "the backoff does not reach its 1 s cap: {retries:?}"
    );
    assert!(
        cpu <= Duration::from_millis(450),
        "{cpu:?} of CPU in {watched:?} while out of descriptors"
    );

    // Close them: the proxy gets its descriptors back and serves a new client.
    drop(flood);
    let recovered = Instant::now();
    let stream = tokio::time::timeout(DEADLINE, TcpStream::connect(("127.0.0.1", port)))
        .await
        .unwrap()
        .unwrap();
    let url = format!("ws://127.0.0.1:{port}/after");
    let (mut ws, resp) = tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(url, stream))
        .await
        .expect("no handshake after the descriptors were released")
        .expect("handshake after the descriptors were released");
    assert_eq!(resp.status().as_u16(), 101);
    ws.send(Message::text("back")).await.unwrap();
    let echo = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echo, Message::text("back"));
    say(&format!(
        "emfile: after closing the {FLOOD} connections a new client got its 101 and echo in {} ms; proxy fds {}",
        recovered.elapsed().as_millis(),
        fds_of(d.pid())
    ));
    drop(ws);
    let status = d.terminate();
    assert!(status.success(), "exit status {status}");
}
