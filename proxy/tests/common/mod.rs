//! What the binary-driving tests share (only they know the binary's path): waiting for a child's
//! exit on a pidfd, a running `wsproxy` whose log lines the test reads ([`Daemon`]), optionally
//! under a descriptor limit, configuration files in a directory of the test's own, `wsproxy
//! reload`, and raw requests to the binary's admin listener.
// Each test binary uses a part of it.
#![allow(dead_code)]

use std::io::BufRead;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;

pub mod kernel;

pub const BIN: &str = env!("CARGO_BIN_EXE_wsproxy");

/// Waits for `child` to exit, at most `limit`, on a pidfd (readable once the process has
/// exited): a readiness signal instead of polling its status. `None` when it is still running.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    if let Some(status) = child.try_wait().unwrap() {
        return Some(status);
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor just returned by the kernel, owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut pfd = libc::pollfd {
        fd: fd as i32,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&raw mut pfd, 1, limit.as_millis().min(i32::MAX as u128) as i32) };
    drop(pidfd);
    if ready > 0 { child.try_wait().unwrap() } else { None }
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (a test that opens thousands of
/// client sockets); returns the soft limit now in force.
pub fn raise_nofile() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: an out-pointer to a rlimit.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut l) }, 0);
    l.rlim_cur = l.rlim_max;
    // SAFETY: an in-pointer to a rlimit; raising the soft limit up to the hard one is allowed.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const l) }, 0);
    l.rlim_cur
}

/// Descriptors open in process `pid`.
pub fn fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Deadline of every wait on a [`Daemon`] and on the admin listener of the binary.
pub const DAEMON_DEADLINE: Duration = Duration::from_secs(20);

/// A port for a configuration file the binary reads (it binds the port itself): free, and out of
/// reach of the connections other tests make meanwhile (see `wsproxy_tests::ports`).
#[allow(unused_imports)] // as the rest: each test binary uses a part of it
pub use wsproxy_tests::ports::free_port;

/// A path `name` in a directory of this test process's own (each test binary is a process).
pub fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wsproxy-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Writes `text` to [`temp_path`]`(name)` and returns the path.
pub fn temp_config(name: &str, text: &str) -> PathBuf {
    let path = temp_path(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `wsproxy reload --config PATH`: (exit code, stdout, stderr).
pub async fn reload_command(path: &Path) -> (Option<i32>, String, String) {
    let path = path.to_path_buf();
    let out = tokio::task::spawn_blocking(move || Command::new(BIN).args(["reload", "--config"]).arg(path).output())
        .await
        .unwrap()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sends `request` as it is to the admin listener on 127.0.0.1:`port` and reads to the close:
/// (status, body).
pub async fn admin_tcp(port: u16, request: &str) -> (u16, String) {
    let s = tokio::time::timeout(DAEMON_DEADLINE, TcpStream::connect(("127.0.0.1", port)))
        .await
        .expect("admin connect timed out")
        .unwrap();
    admin_exchange(s, request).await
}

/// Like [`admin_tcp`], on the admin listener's Unix socket.
pub async fn admin_unix(path: &Path, request: &str) -> (u16, String) {
    admin_exchange(UnixStream::connect(path).await.unwrap(), request).await
}

async fn admin_exchange(mut s: impl AsyncRead + AsyncWrite + Unpin, request: &str) -> (u16, String) {
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DAEMON_DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("no admin answer")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A running `wsproxy` whose stderr lines arrive on a channel, each with its arrival time. Every
/// wait on it has the deadline [`DAEMON_DEADLINE`] and fails with the log so far.
pub struct Daemon {
    pub child: Child,
    lines: mpsc::UnboundedReceiver<(Instant, String)>,
    pub seen: Vec<(Instant, String)>,
}

impl Daemon {
    /// Starts `wsproxy ARGS` (RUST_LOG=info), with RLIMIT_NOFILE `nofile` (soft and hard, so
    /// that it cannot raise it) when given.
    pub fn start(args: &[&str], nofile: Option<u64>) -> Daemon {
        Self::start_from(Path::new(BIN), args, nofile, &[])
    }

    /// [`Daemon::start`] of the executable at `binary` (a copy a test may replace).
    pub fn start_binary(binary: &Path, args: &[&str]) -> Daemon {
        Self::start_from(binary, args, None, &[])
    }

    /// [`Daemon::start`] with more environment variables (NOTIFY_SOCKET: the test is systemd).
    pub fn start_with_env(args: &[&str], env: &[(&str, &Path)]) -> Daemon {
        Self::start_from(Path::new(BIN), args, None, env)
    }

    fn start_from(binary: &Path, args: &[&str], nofile: Option<u64>, env: &[(&str, &Path)]) -> Daemon {
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(n) = nofile {
            // SAFETY: setrlimit is async-signal-safe; the closure allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // A binary a test copied may still be open for writing in a child another test thread
        // forked meanwhile (until that child's exec): ETXTBSY for a moment. Retried, bounded.
        let busy_until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut child = loop {
            match cmd.spawn() {
                Ok(c) => break c,
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && std::time::Instant::now() < busy_until => {
                    std::thread::sleep(std::time::Duration::from_millis(5)); // poll interval of a deadline-bounded retry
                }
                Err(e) => panic!("cannot start {}: {e}", cmd.get_program().to_string_lossy()),
            }
        };
        let (tx, lines) = mpsc::unbounded_channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
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

    /// `wsproxy run --config PATH`, waited for until it accepts connections.
    pub async fn run(config: &Path, nofile: Option<u64>) -> Daemon {
        Self::run_args(&["run", "--config", config.to_str().unwrap()], nofile).await
    }

    /// [`Daemon::run`] with JSON log lines (`--log-format json`).
    pub async fn run_json(config: &Path) -> Daemon {
        Self::run_args(
            &["--log-format", "json", "run", "--config", config.to_str().unwrap()],
            None,
        )
        .await
    }

    async fn run_args(args: &[&str], nofile: Option<u64>) -> Daemon {
        let mut d = Daemon::start(args, nofile);
        d.wait_for("accepting connections").await;
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the first line containing `needle` (among all, those already seen included)
    /// and returns it.
    pub async fn wait_for(&mut self, needle: &str) -> String {
        self.wait_for_nth(needle, 1).await
    }

    /// Waits for the `n`th line (from 1) containing `needle` and returns it.
    pub async fn wait_for_nth(&mut self, needle: &str, n: usize) -> String {
        self.wait_line(&format!("#{n} with {needle:?}"), |l| l.contains(needle), n)
            .await
            .1
    }

    /// Waits for the first line containing any of `needles` and returns its arrival time.
    pub async fn wait_for_any(&mut self, needles: &[&str]) -> Instant {
        self.wait_line(
            &format!("with any of {needles:?}"),
            |l| needles.iter().any(|n| l.contains(n)),
            1,
        )
        .await
        .0
    }

    async fn wait_line(&mut self, what: &str, hit: impl Fn(&str) -> bool, n: usize) -> (Instant, String) {
        let end = tokio::time::Instant::now() + DAEMON_DEADLINE;
        loop {
            if let Some(found) = self.seen.iter().filter(|(_, l)| hit(l)).nth(n - 1) {
                return found.clone();
            }
            match tokio::time::timeout_at(end, self.lines.recv()).await {
                Ok(Some(line)) => self.seen.push(line),
                _ => panic!("no log line {what}; got:\n{}", self.text()),
            }
        }
    }

    /// Takes every line that arrives until `until`.
    pub async fn collect_until(&mut self, until: Instant) {
        let end = tokio::time::Instant::from_std(until);
        while let Ok(Some(line)) = tokio::time::timeout_at(end, self.lines.recv()).await {
            self.seen.push(line);
        }
    }

    /// Lines seen so far containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.seen.iter().filter(|(_, l)| l.contains(needle)).count()
    }

    /// The lines seen so far, one per line.
    pub fn text(&self) -> String {
        self.seen.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig).unwrap();
    }

    /// Waits (within `limit`) for the process to exit; then for the rest of its log lines.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let status = tokio::task::block_in_place(|| wait_exit(&mut self.child, limit))
            .unwrap_or_else(|| panic!("wsproxy did not exit within {limit:?}; log:\n{}", self.text()));
        // The stderr pipe closes with the process: the channel ends.
        while let Ok(Some(l)) = tokio::time::timeout(DAEMON_DEADLINE, self.lines.recv()).await {
            self.seen.push(l);
        }
        status
    }

    /// SIGTERM; waits for the exit and then for the rest of its log lines.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(DAEMON_DEADLINE).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
