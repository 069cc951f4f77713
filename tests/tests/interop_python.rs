//! An independent client: Python's `websockets` (installed by `cargo xtask setup`) opens 200
//! connections at once, directly to the echo server and through the proxy in both relay modes,
//! echoes binary messages of every length class (0 B to 200 kB) on each, checks a SHA-256 of
//! everything it sent against everything that came back, and closes each with 1000.
//!
//! Without Python's `websockets` the test fails under CI=true and says it was skipped elsewhere.

use std::net::SocketAddr;

use wsproxy_tests::DEADLINE;
use wsproxy_tests::daemon_kit::ServerProxy;
use wsproxy_tests::echo_upstream;
use wsproxy_tests::interop_kit;
use wsproxy_tests::relay_kit::{poll_until, say};

const CONNECTIONS: usize = 200;
const MESSAGES: usize = 10;

const CLIENT: &str = r#"
import asyncio, hashlib, random, sys
from websockets.asyncio.client import connect

url, n, msgs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
SIZES = [0, 1, 125, 126, 65535, 65536, 200000]

async def one(i):
    rnd = random.Random(i)
    sent, got, total = hashlib.sha256(), hashlib.sha256(), 0
    async with connect(url, max_size=None, compression=None, open_timeout=20) as ws:
        for _ in range(msgs):
            data = rnd.randbytes(rnd.choice(SIZES))
            sent.update(data)
            await ws.send(data)
            echo = await ws.recv()
            if not isinstance(echo, bytes):
                raise SystemExit(f"connection {i}: a text message came back")
            got.update(echo)
            total += len(echo)
        await ws.close(code=1000, reason="done")
    if sent.digest() != got.digest():
        raise SystemExit(f"connection {i}: what came back differs from what was sent")
    return total

async def main():
    totals = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), 90)
    print("ok", len(totals), sum(totals))

asyncio.run(main())
"#;

/// Runs the client against `addr`; returns the payload bytes it got back.
async fn run_client(addr: SocketAddr, what: &str) -> u64 {
    let mut client = tokio::process::Command::new("python3");
    client
        .args(["-c", CLIENT, &format!("ws://{addr}/")])
        .args([CONNECTIONS.to_string(), MESSAGES.to_string()]);
    interop_kit::run_client(&mut client, CONNECTIONS as u64, what).await
}

#[tokio::test]
async fn python_websockets_clients_get_every_byte_back_directly_and_through_both_relays() {
    if !interop_kit::python_websockets() {
        return;
    }
    let echo = echo_upstream().await;
    let direct = run_client(echo, "direct").await;
    assert!(direct > 0);
    for mode in ["userspace", "kernel"] {
        let Some(p) = ServerProxy::in_mode(mode, echo, "").await else {
            continue;
        };
        let through = run_client(p.addr, mode).await;
        // The same seeded messages: the same bytes back as directly.
        assert_eq!(through, direct, "{mode}");
        // Every connection ended closed, in the relay asked for (index: kernel 0, userspace 1).
        let t = poll_until(DEADLINE, || {
            let t = p.server.totals();
            (t.ended.iter().sum::<u64>() == CONNECTIONS as u64).then_some(t)
        })
        .await
        .unwrap_or_else(|| panic!("{mode}: not every connection ended: {:?}", p.server.totals()));
        let i = if mode == "kernel" { 0 } else { 1 };
        assert_eq!((t.ended[i], t.fallbacks), (CONNECTIONS as u64, 0), "{mode}: {t:?}");
        // Each way the same frames (the messages and a close each), but a client's carry a
        // 4-byte mask key.
        let frames = (CONNECTIONS * (MESSAGES + 1)) as u64;
        assert_eq!(
            t.client_to_upstream[i],
            t.upstream_to_client[i] + 4 * frames,
            "{mode}: {t:?}"
        );
        say(&format!(
            "interop python {mode}: {CONNECTIONS} connections, {through} bytes echoed through the proxy"
        ));
        p.stop().await;
    }
}
