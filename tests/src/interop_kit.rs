//! What the interop tests with independent clients share: whether a client is installed (a
//! failure under CI=true, a "SKIPPED" line elsewhere), and running one to its "ok N BYTES" line;
//! Node's `ws` echo server (`tests/interop/node_echo_server.js`), a headless Chromium driven over
//! DevTools ([`Chromium`]) and where the tests leave files for CI to keep.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::DEADLINE;
use crate::relay_kit::{poll_until, say};

/// True when `probe` succeeds. Otherwise fails under CI=true and says it skipped elsewhere;
/// `what` names the missing client (e.g. "Python's websockets").
pub fn installed(probe: &mut Command, what: &str) -> bool {
    let found = probe
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{what} is missing (and CI=true): `cargo xtask setup` installs it"
        );
        say(&format!(
            "SKIPPED: {what} is not installed (`cargo xtask setup` installs it)"
        ));
    }
    found
}

/// Runs `cmd` (killed after `limit`), which must exit 0; returns what it printed. `what` names
/// the run in failures, which show both its outputs.
pub async fn stdout_of(cmd: &mut tokio::process::Command, limit: Duration, what: &str) -> String {
    let out = tokio::time::timeout(limit, cmd.kill_on_drop(true).output())
        .await
        .unwrap_or_else(|_| panic!("{what}: did not finish within {limit:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs `client` (killed after 120 s), which must exit 0 and print "ok CONNECTIONS BYTES";
/// returns BYTES. `what` names the run in failures.
pub async fn run_client(client: &mut tokio::process::Command, connections: u64, what: &str) -> u64 {
    let stdout = stdout_of(client, Duration::from_secs(120), what).await;
    let words: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(
        words.get(..2),
        Some(&["ok", connections.to_string().as_str()][..]),
        "{what}: {stdout}"
    );
    words[2].parse().unwrap()
}

/// Where Debian's `node-*` packages put their modules (not on the search path of every Node).
pub const NODE_PATH: &str = "/usr/share/nodejs";

/// A file of `tests/interop/`.
pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop").join(name)
}

/// True when Node's `ws` loads (see [`installed`]).
pub fn node_ws() -> bool {
    installed(
        Command::new("node")
            .args(["-e", "require('ws')"])
            .env("NODE_PATH", NODE_PATH),
        "Node's ws",
    )
}

/// True when Python's `websockets` (its asyncio client) imports (see [`installed`]).
pub fn python_websockets() -> bool {
    installed(
        Command::new("python3").args(["-c", "import websockets.asyncio.client"]),
        "Python's websockets",
    )
}

/// Starts `node_echo_server.js` (a WebSocket echo server that also serves the Chromium page on
/// GET /); returns it (killed on drop) and its address on 127.0.0.1.
pub async fn node_echo_server() -> (tokio::process::Child, SocketAddr) {
    let mut child = tokio::process::Command::new("node")
        .arg(script("node_echo_server.js"))
        .env("NODE_PATH", NODE_PATH)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("the Node server did not say its port")
        .unwrap()
        .unwrap_or_default();
    let port: u16 = line
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the Node server said {line:?}"));
    (child, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// `interop/` in the workspace's target directory (`CARGO_TARGET_DIR` when set, a relative one
/// taken from the workspace root), created if need be: what the interop tests leave there (e.g.
/// screenshots) outlives the run, for CI to keep.
pub fn artifacts() -> PathBuf {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), |d| workspace.join(d));
    let dir = target.join("interop");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir.canonicalize().unwrap()
}

// ---- headless Chromium ----

/// Headless as root, and none of the background traffic (updates, sync, QUIC probes) that a
/// closed network refuses and that would otherwise stall or clutter the run.
pub const CHROMIUM_FLAGS: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// A cold start on a busy machine takes seconds; give it more than the usual deadline.
const CHROMIUM_START: Duration = Duration::from_secs(30);

/// True when Chromium runs (see [`installed`]).
pub fn chromium_installed() -> bool {
    installed(Command::new("chromium").arg("--version"), "Chromium")
}

/// A headless Chromium with a fresh profile, its DevTools on a loopback port it chose itself. One
/// browser serves every run: each run is a new tab driven by `chromium_driver.js`. Killed, and its
/// profile removed, on drop.
pub struct Chromium {
    child: std::process::Child,
    profile: PathBuf,
    devtools_port: u16,
}

impl Chromium {
    /// Starts one with [`CHROMIUM_FLAGS`] and `flags`, its own output in `artifacts()/LOG`.
    pub async fn start(log: &str, flags: &[String]) -> Chromium {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let profile = std::env::temp_dir().join(format!("wsproxy-chromium-{}-{nanos}", std::process::id()));
        // create_dir, not create_dir_all: the profile must be new and empty.
        std::fs::create_dir(&profile).unwrap_or_else(|e| panic!("{}: {e}", profile.display()));
        let log_file = std::fs::File::create(artifacts().join(log)).unwrap();
        let child = Command::new("chromium")
            .args(CHROMIUM_FLAGS)
            .args(flags)
            .arg(format!("--user-data-dir={}", profile.display()))
            // Port 0: the browser picks a free one and writes it to DevToolsActivePort.
            .arg("--remote-debugging-port=0")
            .arg("about:blank")
            // Crash reports and caches go under the XDG directories, not the profile: keep them
            // in the throw-away profile too rather than in the user's home.
            .env("XDG_CONFIG_HOME", profile.join("xdg-config"))
            .env("XDG_CACHE_HOME", profile.join("xdg-cache"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let mut browser = Chromium {
            child,
            profile,
            devtools_port: 0,
        };
        let active = browser.profile.join("DevToolsActivePort");
        let port = poll_until(CHROMIUM_START, || {
            if let Ok(Some(status)) = browser.child.try_wait() {
                return Some(Err(status));
            }
            // The port is the first line; only a complete line is read, never a half-written one.
            let text = std::fs::read_to_string(&active).ok()?;
            let (port, _) = text.split_once('\n')?;
            port.parse::<u16>().ok().map(Ok)
        })
        .await;
        browser.devtools_port = match port {
            Some(Ok(port)) => port,
            Some(Err(status)) => panic!("Chromium exited ({status}); see target/interop/{log}"),
            None => panic!("Chromium did not open DevTools within {CHROMIUM_START:?}; see target/interop/{log}"),
        };
        browser
    }

    /// Loads `page` (`chromium_page.html` with its `?ws=` URL) in a new tab; returns the payload
    /// bytes the page got back. `what` names the run and its screenshot,
    /// `artifacts()/chromium-WHAT.png`.
    pub async fn run(&self, page: &str, what: &str) -> u64 {
        let shot = artifacts().join(format!("chromium-{what}.png"));
        // An earlier run's screenshot must not pass for this one's.
        let _ = std::fs::remove_file(&shot);
        let mut driver = tokio::process::Command::new("node");
        driver
            .arg(script("chromium_driver.js"))
            .arg(self.devtools_port.to_string())
            .arg(page)
            .arg(&shot)
            .env("NODE_PATH", NODE_PATH);
        // The page opens one WebSocket.
        let bytes = run_client(&mut driver, 1, what).await;
        let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("{what}: {}: {e}", shot.display()));
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{what}: {} is no PNG",
            shot.display()
        );
        bytes
    }

    /// Stops the browser and removes its profile.
    pub async fn close(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its helper processes (network, storage) notice the browser is gone on their own and may
        // still write into the profile for a moment, which makes a removal fail; until they are.
        let removed = poll_until(DEADLINE, || match std::fs::remove_dir_all(&self.profile) {
            Ok(()) => Some(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(()),
            Err(_) => None,
        })
        .await;
        assert!(removed.is_some(), "{} not removed", self.profile.display());
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
