//! An independent client and server: Node's `ws` (Debian's `node-ws`, installed by `cargo xtask
//! setup`) on both ends, directly and through the proxy in every relay mode. The client offers
//! two subprotocols and permessage-deflate, and the server's choices must come back through the
//! proxy untouched; it echoes text and binary messages of 0 B to 16 MiB (compressed on the wire)
//! and checks every byte; pings with a payload and checks the pong; closes with 4001 and a reason
//! and checks both came back (`tests/interop/node_client.js`, `node_echo_server.js`).
//!
//! Without Node's `ws` the test fails under CI=true and says it was skipped elsewhere.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use wsproxy_tests::DEADLINE;
use wsproxy_tests::daemon_kit::ServerProxy;
use wsproxy_tests::interop_kit;
use wsproxy_tests::relay_kit::{poll_until, say};

const CONNECTIONS: u64 = 4;
/// Where Debian's `node-*` packages put their modules (not on the search path of every Node).
const NODE_PATH: &str = "/usr/share/nodejs";

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop").join(name)
}

fn node_ws() -> bool {
    interop_kit::installed(
        std::process::Command::new("node")
            .args(["-e", "require('ws')"])
            .env("NODE_PATH", NODE_PATH),
        "Node's ws",
    )
}

/// Starts the Node echo server; returns it (killed on drop) and its address.
async fn start_server() -> (tokio::process::Child, SocketAddr) {
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

/// Runs the client against `addr`; returns the payload bytes it got back.
async fn run_client(addr: SocketAddr, what: &str) -> u64 {
    let mut client = tokio::process::Command::new("node");
    client
        .arg(script("node_client.js"))
        .arg(format!("ws://{addr}/chat"))
        .arg(CONNECTIONS.to_string())
        .env("NODE_PATH", NODE_PATH);
    interop_kit::run_client(&mut client, CONNECTIONS, what).await
}

#[tokio::test]
async fn node_ws_with_compression_subprotocols_pings_and_close_codes_directly_and_through_every_relay() {
    if !node_ws() {
        return;
    }
    let (_server, upstream) = start_server().await;
    let direct = run_client(upstream, "direct").await;
    for mode in ["userspace", "kernel", "auto"] {
        let Some(p) = ServerProxy::in_mode(mode, upstream, "").await else {
            continue;
        };
        let through = run_client(p.addr, mode).await;
        assert_eq!(through, direct, "{mode}: the same messages, the same bytes back");
        let t = poll_until(DEADLINE, || {
            let t = p.server.totals();
            (t.ended.iter().sum::<u64>() == CONNECTIONS).then_some(t)
        })
        .await
        .unwrap_or_else(|| panic!("{mode}: not every connection ended: {:?}", p.server.totals()));
        // Which relay carried them (index: kernel 0, userspace 1): `auto` moves these to the
        // kernel relay, since each begins with small messages.
        let want = match mode {
            "userspace" => [0, CONNECTIONS],
            _ => [CONNECTIONS, 0],
        };
        assert_eq!((t.ended, t.fallbacks), (want, 0), "{mode}: {t:?}");
        say(&format!(
            "interop node {mode}: {CONNECTIONS} connections, {through} payload bytes echoed with permessage-deflate, subprotocol, ping and close code"
        ));
        p.stop().await;
    }
}
