//! Helpers of the hardening tests (`tests/hostile_input.rs`, `tests/floods.rs`) and of the soak
//! driver (`src/bin/soak.rs`): this process's resident memory and descriptors (the proxy runs
//! in-process, so they are the proxy's plus the test's own clients), the descriptor limit, and a
//! raw upstream that answers a valid 101 and then echoes bytes untouched. (Their proxy is
//! [`crate::Proxy::try_start`].)

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::{find, header};

// ---- this process ----

/// A `kB` field of /proc/self/status (VmRSS, VmHWM, ...), in bytes.
pub fn proc_status_bytes(field: &str) -> u64 {
    kib_field_bytes("/proc/self/status", field)
}

/// A `Field:   N kB` line of a /proc file (/proc/self/status, /proc/meminfo), in bytes.
pub fn kib_field_bytes(file: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(file).unwrap();
    let line = text
        .lines()
        .find(|l| l.split(':').next() == Some(field))
        .unwrap_or_else(|| panic!("no {field} in {file}"));
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Resident memory of this process, in bytes.
pub fn vm_rss() -> u64 {
    proc_status_bytes("VmRSS")
}

/// Open descriptors of this process (entries of /proc/self/fd).
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Raises this process's soft RLIMIT_NOFILE towards `want` (never above the hard limit, never
/// lowers it); returns the soft limit now in force.
pub fn raise_nofile(want: u64) -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: an out-pointer to a rlimit.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut l) }, 0);
    let target = want.min(l.rlim_max);
    if l.rlim_cur < target {
        let new = libc::rlimit {
            rlim_cur: target,
            rlim_max: l.rlim_max,
        };
        // SAFETY: an in-pointer to a rlimit; raising the soft limit up to the hard one is allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const new) } == 0 {
            return target;
        }
    }
    l.rlim_cur
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

// ---- a raw echo upstream ----

/// An upstream that reads a request head, answers a valid 101 for its key, then echoes every
/// byte untouched until the proxy's FIN, and closes. A request for a path starting with
/// `/reset` is answered, then reset once the first payload byte arrived (an upstream failing
/// mid-relay).
pub struct RawEcho {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl RawEcho {
    pub async fn start() -> RawEcho {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        tokio::spawn(raw_echo(s));
                    }
                    // Out of descriptors: the soak's own bound; retry after the others closed.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        RawEcho { addr, task }
    }
}

impl Drop for RawEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_echo(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let head_len = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 64 * 1024 {
            return;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let reset = head.split_whitespace().nth(1).is_some_and(|p| p.starts_with("/reset"));
    let accept = wsproxy::upstream::accept_key(&header(&head, "sec-websocket-key").unwrap_or_default());
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if s.write_all(answer.as_bytes()).await.is_err() || s.write_all(&buf[head_len..]).await.is_err() {
        return;
    }
    let mut first = buf.len() > head_len;
    loop {
        if reset && first {
            crate::relay_kit::reset(s);
            return;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                first = true;
                if s.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown().await;
}
