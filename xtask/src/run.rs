//! `cargo xtask run`: two echo upstreams and the proxy on the shipped config, supervised.
//!
//! How to try it is printed once the proxy is ready, which it says as it says it to systemd:
//! `READY=1` on the datagram socket named by `NOTIFY_SOCKET`, which this task binds. A proxy that
//! fails to start (a port already taken) prints its error and no invitation.
//!
//! Ctrl-C or SIGTERM is forwarded as SIGTERM to every child (SIGKILL after a grace period or a
//! second signal); when any child ends on its own the others are stopped. The exit status is the
//! proxy's.

use std::os::unix::net::UnixDatagram;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

pub const CONFIG: &str = "config/wsproxy.toml";
pub const PROXY_ADDR: &str = "127.0.0.1:8080";
pub const UPSTREAMS: [(&str, &str); 2] = [("127.0.0.1:9001", "main"), ("127.0.0.1:9002", "backup")];

pub const POLL: Duration = Duration::from_millis(100);
const GRACE: Duration = Duration::from_secs(10);

/// Signals received (SIGINT, SIGTERM, SIGHUP); written only by the handler.
pub static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

pub fn catch_signals() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only touches an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, handler) };
    }
}

pub struct Proc {
    pub name: String,
    child: Child,
    pub status: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(name: String, binary: &Path, args: &[&str], envs: &[(&str, &Path)], root: &Path) -> Result<Self> {
        let child = Command::new(binary)
            .args(args)
            .envs(envs.iter().copied())
            .current_dir(root)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("could not start {name} ({})", binary.display()))?;
        Ok(Self {
            name,
            child,
            status: None,
        })
    }

    /// Records the exit status once the child has ended; true if it has.
    pub fn poll(&mut self) -> Result<bool> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status.is_some())
    }

    fn signal(&mut self, sig: libc::c_int) {
        if self.status.is_none() {
            // SAFETY: a pid we have not reaped yet still names our child.
            unsafe { libc::kill(self.child.id().cast_signed(), sig) };
        }
    }
}

/// The exit code that reports `status` the way a shell would (128 + signal when killed).
pub fn exit_code(status: ExitStatus) -> ExitCode {
    ExitCode::from(code_of(status))
}

fn code_of(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
        (None, None) => 1,
    }
}

pub fn run(root: &Path, binary: &Path) -> Result<ExitCode> {
    let config = root.join(CONFIG);
    if !config.is_file() {
        bail!(
            "{} not found: `run` starts the proxy on the shipped config",
            config.display()
        );
    }
    catch_signals();
    let notify = Readiness::bind()?;
    let mut procs = Vec::new();
    let outcome = start_all(root, binary, &notify.path, &mut procs)
        .and_then(|()| {
            if wait_ready(&mut procs, &notify, 1)? {
                print_usage();
            }
            Ok(())
        })
        .and_then(|()| supervise(&mut procs));
    stop_all(&mut procs)?;
    let status = procs.last().and_then(|p| p.status);
    match outcome? {
        Ended::Signal => Ok(status.map_or(ExitCode::FAILURE, exit_code)),
        Ended::Proxy => {
            let status = status.context("proxy status lost")?;
            if !status.success() {
                eprintln!("xtask: wsproxy exited ({status})");
            }
            Ok(exit_code(status))
        }
    }
}

/// Echo upstreams first, the proxy last (so `procs.last()` is the proxy).
fn start_all(root: &Path, binary: &Path, notify: &Path, procs: &mut Vec<Proc>) -> Result<()> {
    for (addr, role) in UPSTREAMS {
        let name = format!("echo upstream {addr} ({role})");
        procs.push(Proc::spawn(
            name,
            binary,
            &["echo-server", "--listen", addr],
            &[],
            root,
        )?);
    }
    let args = ["run", "--config", CONFIG];
    let envs = [("NOTIFY_SOCKET", notify)];
    procs.push(Proc::spawn("wsproxy".to_owned(), binary, &args, &envs, root)?);
    Ok(())
}

/// The socket wsproxy reports its readiness to (sd_notify), removed when dropped.
pub struct Readiness {
    sock: UnixDatagram,
    pub path: PathBuf,
}

impl Readiness {
    pub fn bind() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("wsproxy-xtask-run-{}.notify", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        // The wait for a message doubles as the supervisor's poll interval.
        sock.set_read_timeout(Some(POLL))?;
        Ok(Self { sock, path })
    }

    /// True once a `READY=1` message has arrived; waits at most one poll interval.
    pub fn ready(&self) -> bool {
        let mut buf = [0u8; 512];
        self.sock.recv(&mut buf).is_ok_and(|n| is_ready(&buf[..n]))
    }
}

impl Drop for Readiness {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An sd_notify message (newline-separated assignments) that says `READY=1`.
fn is_ready(message: &[u8]) -> bool {
    message.split(|&b| b == b'\n').any(|line| line == b"READY=1")
}

/// Waits until `proxies` proxies have said they are ready (true), or a signal arrives or a child
/// ends first (false: `supervise` then reports it).
pub fn wait_ready(procs: &mut [Proc], notify: &Readiness, proxies: usize) -> Result<bool> {
    let mut ready = 0;
    while ready < proxies {
        if SIGNALS.load(Ordering::SeqCst) > 0 {
            return Ok(false);
        }
        for proc in procs.iter_mut() {
            if proc.poll()? {
                return Ok(false);
            }
        }
        if notify.ready() {
            ready += 1;
        }
    }
    Ok(true)
}

fn print_usage() {
    let [(main, _), (backup, _)] = UPSTREAMS;
    println!();
    println!("wsproxy on {PROXY_ADDR} ({CONFIG}), upstreams {main} (main) and {backup} (backup).");
    println!("It is ready. Talk to it with the client the set-up installed (type a line, see it echoed):");
    println!("  python3 -m websockets ws://{PROXY_ADDR}/");
    println!("or look at the handshake itself (expect `HTTP/1.1 101 Switching Protocols`; curl then keeps");
    println!("the connection open, printing nothing more, until you press Ctrl-C):");
    println!(
        "  curl -i -N -H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' \
         -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' http://{PROXY_ADDR}/"
    );
    println!("Ctrl-C here stops the proxy and the upstreams.");
    println!();
}

enum Ended {
    Signal,
    Proxy,
}

/// Waits until a signal arrives or a child ends; an upstream ending is an error.
fn supervise(procs: &mut [Proc]) -> Result<Ended> {
    loop {
        if SIGNALS.load(Ordering::SeqCst) > 0 {
            return Ok(Ended::Signal);
        }
        let proxy = procs.len() - 1;
        for (i, proc) in procs.iter_mut().enumerate() {
            if proc.poll()? {
                if i == proxy {
                    return Ok(Ended::Proxy);
                }
                let status = proc.status.expect("polled");
                bail!("{} exited early ({status}); stopped the others", proc.name);
            }
        }
        thread::sleep(POLL);
    }
}

/// SIGTERM to every child still running, SIGKILL after the grace period or another signal.
pub fn stop_all(procs: &mut [Proc]) -> Result<()> {
    for proc in procs.iter_mut() {
        proc.signal(libc::SIGTERM);
    }
    let signals_at_start = SIGNALS.load(Ordering::SeqCst);
    let deadline = Instant::now() + GRACE;
    let mut killed = false;
    loop {
        let mut running = 0;
        for proc in procs.iter_mut() {
            if !proc.poll()? {
                running += 1;
            }
        }
        if running == 0 {
            return Ok(());
        }
        let insist = SIGNALS.load(Ordering::SeqCst) > signals_at_start;
        if !killed && (Instant::now() >= deadline || insist) {
            eprintln!("xtask: killing {running} child process(es) that did not stop");
            for proc in procs.iter_mut() {
                proc.signal(libc::SIGKILL);
            }
            killed = true;
        }
        thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_is_the_ready_line_of_a_notify_message() {
        assert!(is_ready(b"READY=1"));
        assert!(is_ready(b"STATUS=serving\nREADY=1\n"));
        assert!(!is_ready(b"RELOADING=1\nMONOTONIC_USEC=5"));
        assert!(!is_ready(b"READY=10"));
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(code_of(ExitStatus::from_raw(0)), 0);
        assert_eq!(code_of(ExitStatus::from_raw(2 << 8)), 2);
        assert_eq!(code_of(ExitStatus::from_raw(libc::SIGTERM)), 128 + 15);
        assert_eq!(code_of(ExitStatus::from_raw(libc::SIGKILL)), 128 + 9);
    }
}
