//! What the interop tests with independent clients share: whether a client is installed (a
//! failure under CI=true, a "SKIPPED" line elsewhere), and running one to its "ok N BYTES" line;
//! Node's `ws` echo server (`tests/interop/node_echo_server.js`) and where the tests leave files
//! for CI to keep.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::DEADLINE;
use crate::relay_kit::say;

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
