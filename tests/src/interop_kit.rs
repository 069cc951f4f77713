//! What the interop tests with independent clients share: whether a client is installed (a
//! failure under CI=true, a "SKIPPED" line elsewhere), and running one to its "ok N BYTES" line.

use std::process::{Command, Stdio};
use std::time::Duration;

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

/// Runs `client` (killed after 120 s), which must exit 0 and print "ok CONNECTIONS BYTES";
/// returns BYTES. `what` names the run in failures.
pub async fn run_client(client: &mut tokio::process::Command, connections: u64, what: &str) -> u64 {
    let out = tokio::time::timeout(Duration::from_secs(120), client.kill_on_drop(true).output())
        .await
        .unwrap_or_else(|_| panic!("{what}: the client did not finish within 120 s"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let words: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(
        words.get(..2),
        Some(&["ok", connections.to_string().as_str()][..]),
        "{what}: {stdout}"
    );
    words[2].parse().unwrap()
}
