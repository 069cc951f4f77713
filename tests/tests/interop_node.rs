//! An independent client and server: Node's `ws` (Debian's `node-ws`, installed by `cargo xtask
//! setup`) on both ends, directly and through the proxy in every relay mode. The client offers
//! two subprotocols and permessage-deflate, and the server's choices must come back through the
//! proxy untouched; it echoes text and binary messages of 0 B to 16 MiB (compressed on the wire)
//! and checks every byte; pings with a payload and checks the pong; closes with 4001 and a reason
//! and checks both came back (`tests/interop/node_client.js`, `node_echo_server.js`).
//!
//! Without Node's `ws` the test fails under CI=true and says it was skipped elsewhere.

use std::net::SocketAddr;

use wsproxy_tests::DEADLINE;
use wsproxy_tests::daemon_kit::ServerProxy;
use wsproxy_tests::interop_kit;
use wsproxy_tests::relay_kit::{poll_until, say};

const CONNECTIONS: u64 = 4;

/// Runs the client against `addr`; returns the payload bytes it got back.
async fn run_client(addr: SocketAddr, what: &str) -> u64 {
    let mut client = tokio::process::Command::new("node");
    client
        .arg(interop_kit::script("node_client.js"))
        .arg(format!("ws://{addr}/chat"))
        .arg(CONNECTIONS.to_string())
        .env("NODE_PATH", interop_kit::NODE_PATH);
    interop_kit::run_client(&mut client, CONNECTIONS, what).await
}

#[tokio::test]
async fn node_ws_with_compression_subprotocols_pings_and_close_codes_directly_and_through_every_relay() {
    if !interop_kit::node_ws() {
        return;
    }
    let (_server, upstream) = interop_kit::node_echo_server().await;
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
