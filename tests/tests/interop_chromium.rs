//! An independent client: headless Chromium (Debian's `chromium`, installed by `cargo xtask
//! setup`) against Node's `ws` echo server, directly and through the proxy in every relay mode.
//! Its page (`tests/interop/chromium_page.html`, served by `node_echo_server.js`) opens one
//! WebSocket offering two subprotocols and checks that the server's choice and permessage-deflate
//! came back; echoes text and binary messages of 0 B to 16 MiB and checks every byte; closes with
//! 4001 and a reason and checks both came back. The page's result is read over the DevTools
//! protocol (`tests/interop/chromium_driver.js`, with Node's `ws`), which also saves a screenshot
//! of each finished page for CI: `target/interop/chromium-<run>.png`, next to Chromium's own log,
//! `chromium.log`.
//!
//! Without Chromium or Node's `ws` the test fails under CI=true and says it was skipped elsewhere.

use std::net::SocketAddr;

use wsproxy_tests::DEADLINE;
use wsproxy_tests::daemon_kit::ServerProxy;
use wsproxy_tests::interop_kit::{self, Chromium};
use wsproxy_tests::relay_kit::{poll_until, say};

/// The page, served by the echo server at `page_from`, with its WebSocket to `ws`.
fn page(page_from: SocketAddr, ws: SocketAddr) -> String {
    format!("http://{page_from}/?ws=ws://{ws}/chat")
}

/// The page opens one WebSocket per run; the proxy must see that one and nothing else.
const CONNECTIONS: u64 = 1;

#[tokio::test]
async fn chromium_echoes_text_and_binary_up_to_16_mib_and_a_close_code_directly_and_through_every_relay() {
    if !interop_kit::node_ws() || !interop_kit::chromium_installed() {
        return;
    }
    let (_server, upstream) = interop_kit::node_echo_server().await;
    let browser = Chromium::start("chromium.log", &[]).await;
    let direct = browser.run(&page(upstream, upstream), "direct").await;
    for mode in ["userspace", "kernel", "auto"] {
        let Some(p) = ServerProxy::in_mode(mode, upstream, "").await else {
            continue;
        };
        let through = browser.run(&page(upstream, p.addr), mode).await;
        assert_eq!(through, direct, "{mode}: the same messages, the same bytes back");
        let t = poll_until(DEADLINE, || {
            let t = p.server.totals();
            (t.ended.iter().sum::<u64>() >= CONNECTIONS).then_some(t)
        })
        .await
        .unwrap_or_else(|| panic!("{mode}: not every connection ended: {:?}", p.server.totals()));
        // Which relay carried it (index: kernel 0, userspace 1): `auto` moves it to the kernel
        // relay, since the page begins with small messages.
        let want = match mode {
            "userspace" => [0, CONNECTIONS],
            _ => [CONNECTIONS, 0],
        };
        assert_eq!((t.ended, t.open, t.fallbacks), (want, [0, 0], 0), "{mode}: {t:?}");
        say(&format!(
            "interop chromium {mode}: {CONNECTIONS} connection, {through} payload bytes echoed with permessage-deflate, subprotocol and close code"
        ));
        p.stop().await;
    }
    browser.close().await;
}
