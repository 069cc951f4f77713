//! `cargo xtask run`: two echo upstreams and the proxy on the shipped config, supervised.
//!
//! Ctrl-C or SIGTERM is forwarded as SIGTERM to every child (SIGKILL after a grace period or a
//! second signal); when any child ends on its own the others are stopped. The exit status is the
//! proxy's.

use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

pub const CONFIG: &str = "config/wsproxy.toml";
pub const PROXY_ADDR: &str = "127.0.0.1:8080";
pub const UPSTREAMS: [(&str, &str); 2] = [("127.0.0.1:9001", "main"), ("127.0.0.1:9002", "backup")];

const POLL: Duration = Duration::from_millis(100);
const GRACE: Duration = Duration::from_secs(10);

/// Signals received (SIGINT, SIGTERM, SIGHUP); written only by the handler.
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

fn catch_signals() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only touches an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, handler) };
    }
}

struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
}

impl Proc {
    fn spawn(name: String, binary: &Path, args: &[&str], root: &Path) -> Result<Self> {
        let child = Command::new(binary)
            .args(args)
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
    fn poll(&mut self) -> Result<bool> {
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
    let mut procs = Vec::new();
    let started = start_all(root, binary, &mut procs);
    if started.is_ok() {
        print_usage();
    }
    let outcome = started.and_then(|()| supervise(&mut procs));
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
fn start_all(root: &Path, binary: &Path, procs: &mut Vec<Proc>) -> Result<()> {
    for (addr, role) in UPSTREAMS {
        let name = format!("echo upstream {addr} ({role})");
        procs.push(Proc::spawn(name, binary, &["echo-server", "--listen", addr], root)?);
    }
    let args = ["run", "--config", CONFIG];
    procs.push(Proc::spawn("wsproxy".to_owned(), binary, &args, root)?);
    Ok(())
}

fn print_usage() {
    let [(main, _), (backup, _)] = UPSTREAMS;
    println!();
    println!("wsproxy on {PROXY_ADDR} ({CONFIG}), upstreams {main} (main) and {backup} (backup).");
    println!("Try a handshake (expect `HTTP/1.1 101 Switching Protocols`):");
    println!(
        "  curl -i -N -H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' \
         -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' http://{PROXY_ADDR}/"
    );
    println!("Any WebSocket client works too, e.g. `websocat ws://{PROXY_ADDR}/` echoes what you type.");
    println!("Ctrl-C stops the proxy and the upstreams.");
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
fn stop_all(procs: &mut [Proc]) -> Result<()> {
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
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(code_of(ExitStatus::from_raw(0)), 0);
        assert_eq!(code_of(ExitStatus::from_raw(2 << 8)), 2);
        assert_eq!(code_of(ExitStatus::from_raw(libc::SIGTERM)), 128 + 15);
        assert_eq!(code_of(ExitStatus::from_raw(libc::SIGKILL)), 128 + 9);
    }
}
