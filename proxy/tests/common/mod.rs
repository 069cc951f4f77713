//! What the binary-driving tests share: waiting for a child's exit on a pidfd, and a running
//! `wsproxy` whose log lines the test reads ([`Daemon`]), optionally under a descriptor limit.
// Each test binary uses a part of it.
#![allow(dead_code)]

use std::io::BufRead;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

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

/// Deadline of every wait on a [`Daemon`].
pub const DAEMON_DEADLINE: Duration = Duration::from_secs(20);

/// A running `wsproxy` whose stderr lines arrive on a channel, each with its arrival time.
pub struct Daemon {
    pub child: Child,
    lines: mpsc::UnboundedReceiver<(Instant, String)>,
    pub seen: Vec<(Instant, String)>,
}

impl Daemon {
    /// Starts `wsproxy ARGS` (RUST_LOG=info), with RLIMIT_NOFILE `nofile` (soft and hard, so
    /// that it cannot raise it) when given.
    pub fn start(args: &[&str], nofile: Option<u64>) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
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
        let mut child = cmd.spawn().unwrap();
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
        let mut d = Daemon::start(&["run", "--config", config.to_str().unwrap()], nofile);
        d.wait_for("accepting connections").await;
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the first line containing `needle` (among all, those already seen included)
    /// and returns its arrival time.
    pub async fn wait_for(&mut self, needle: &str) -> Instant {
        self.wait_for_any(&[needle]).await
    }

    /// Like [`Daemon::wait_for`], for the first line containing any of `needles`.
    pub async fn wait_for_any(&mut self, needles: &[&str]) -> Instant {
        let hit = |l: &str| needles.iter().any(|n| l.contains(n));
        if let Some((t, _)) = self.seen.iter().find(|(_, l)| hit(l)) {
            return *t;
        }
        let end = tokio::time::Instant::now() + DAEMON_DEADLINE;
        loop {
            match tokio::time::timeout_at(end, self.lines.recv()).await {
                Ok(Some((t, l))) => {
                    let found = hit(&l);
                    self.seen.push((t, l));
                    if found {
                        return t;
                    }
                }
                _ => panic!("no log line with any of {needles:?}; got:\n{}", self.text()),
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

    pub fn text(&self) -> String {
        self.seen.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM; waits for the exit and then for the rest of its log lines.
    pub async fn terminate(&mut self) -> ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = tokio::task::block_in_place(|| wait_exit(&mut self.child, DAEMON_DEADLINE))
            .unwrap_or_else(|| panic!("wsproxy did not exit after SIGTERM; log:\n{}", self.text()));
        // The stderr pipe closes with the process: the channel ends.
        while let Ok(Some(l)) = tokio::time::timeout(DAEMON_DEADLINE, self.lines.recv()).await {
            self.seen.push(l);
        }
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
