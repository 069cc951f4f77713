//! A real Redis server for the cluster tests (Debian's `redis-server`, installed by `cargo xtask
//! setup`): started on a loopback address and a free port, without persistence (`--save ""
//! --appendonly no`, a directory of its own), killed and its directory removed when dropped.
//! It can be stalled (SIGSTOP) and resumed, killed (SIGKILL) and started again on the same
//! address with an empty data set, as a store that restarted.
//!
//! Used by `tests/tests/cluster.rs` and `proxy/tests/cluster_cli.rs`. Readiness is the server's
//! own "Ready to accept connections" line, waited for with a deadline.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::ports::free_port;

/// How long a start (or restart) may take.
const START: Duration = Duration::from_secs(10);

/// True when `redis-server` runs. Otherwise the test fails under CI=true and says it was
/// skipped elsewhere (`cargo xtask setup` installs it).
pub fn available() -> bool {
    crate::interop_kit::installed(
        std::process::Command::new("redis-server").arg("--version"),
        "redis-server",
    )
}

/// A running `redis-server`.
pub struct RedisServer {
    pub addr: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on `ip` (a loopback address) and a free port ([`free_port`]).
    pub async fn start(ip: &str) -> RedisServer {
        let port = free_port();
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let dir = std::env::temp_dir().join(format!("wsproxy-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = RedisServer { addr, dir, child: None };
        r.spawn().await;
        r
    }

    async fn spawn(&mut self) {
        let mut child = Command::new("redis-server")
            .args(["--bind", &self.addr.ip().to_string()])
            .args(["--port", &self.addr.port().to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", ""])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = Vec::new();
        let ready = tokio::time::timeout(START, async {
            while let Ok(Some(line)) = lines.next_line().await {
                let ok = line.contains("Ready to accept connections");
                seen.push(line);
                if ok {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            ready == Ok(true),
            "redis-server on {} did not get ready within {START:?}:\n{}",
            self.addr,
            seen.join("\n")
        );
        // Keep its pipe drained.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
    }

    /// `redis://IP:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().and_then(Child::id).expect("running") as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill with a pid of our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// SIGSTOP: connections stay open, nothing is answered.
    pub fn stall(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`RedisServer::stall`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGKILL, waited for: connections are reset, connects refused.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = tokio::time::timeout(START, c.wait()).await;
        }
    }

    /// Starts again on the same address, with no data (as after a crash without persistence).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn().await;
    }

    /// Sends one command and returns its reply's first line (`:3`, `+PONG`, `$-1`, ...).
    pub async fn query(&self, args: &[&str]) -> String {
        let mut s = tokio::time::timeout(START, TcpStream::connect(self.addr))
            .await
            .expect("connect to redis")
            .unwrap();
        let mut cmd = format!("*{}\r\n", args.len());
        for a in args {
            cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(cmd.as_bytes()).await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(START, async {
            let mut b = [0u8; 1];
            while !reply.ends_with(b"\r\n") && s.read(&mut b).await.unwrap() == 1 {
                reply.push(b[0]);
            }
        })
        .await
        .expect("a redis reply");
        String::from_utf8_lossy(&reply).trim_end().to_string()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            if let Some(pid) = c.id() {
                // A stalled server must be able to die.
                // SAFETY: kill with a pid of our own child, not yet reaped.
                unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            }
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
