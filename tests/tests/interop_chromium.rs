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

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use wsproxy_tests::DEADLINE;
use wsproxy_tests::daemon_kit::ServerProxy;
use wsproxy_tests::interop_kit::{self, NODE_PATH, script};
use wsproxy_tests::relay_kit::{poll_until, say};

/// The page opens one WebSocket per run; the proxy must see that one and nothing else.
const CONNECTIONS: u64 = 1;

/// Headless as root, and none of the background traffic (updates, sync, QUIC probes)
/// that a closed network refuses and that would otherwise stall or clutter the run.
const FLAGS: [&str; 8] = [
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
const START: Duration = Duration::from_secs(30);

fn chromium() -> bool {
    interop_kit::installed(Command::new("chromium").arg("--version"), "Chromium")
}

/// A headless Chromium with a fresh profile, its DevTools on a loopback port it chose itself. One
/// browser serves every run: each run is a new tab. Killed, and its profile removed, on drop.
struct Chromium {
    child: std::process::Child,
    profile: PathBuf,
    devtools_port: u16,
}

impl Chromium {
    async fn start() -> Chromium {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let profile = std::env::temp_dir().join(format!("wsproxy-chromium-{}-{nanos}", std::process::id()));
        // create_dir, not create_dir_all: the profile must be new and empty.
        std::fs::create_dir(&profile).unwrap_or_else(|e| panic!("{}: {e}", profile.display()));
        let log = File::create(interop_kit::artifacts().join("chromium.log")).unwrap();
        let child = Command::new("chromium")
            .args(FLAGS)
            .arg(format!("--user-data-dir={}", profile.display()))
            // Port 0: the browser picks a free one and writes it to DevToolsActivePort.
            .arg("--remote-debugging-port=0")
            .arg("about:blank")
            // Crash reports and caches go under the XDG directories, not the profile: keep them
            // in the throw-away profile too rather than in the user's home.
            .env("XDG_CONFIG_HOME", profile.join("xdg-config"))
            .env("XDG_CACHE_HOME", profile.join("xdg-cache"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut browser = Chromium {
            child,
            profile,
            devtools_port: 0,
        };
        let active = browser.profile.join("DevToolsActivePort");
        let port = poll_until(START, || {
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
            Some(Err(status)) => panic!("Chromium exited ({status}); see target/interop/chromium.log"),
            None => panic!("Chromium did not open DevTools within {START:?}; see target/interop/chromium.log"),
        };
        browser
    }

    /// Loads the page from `page_from` (the echo server) in a new tab, its WebSocket to `ws`;
    /// returns the payload bytes the page got back. `what` names the run and its screenshot.
    async fn run(&self, page_from: SocketAddr, ws: SocketAddr, what: &str) -> u64 {
        let shot = interop_kit::artifacts().join(format!("chromium-{what}.png"));
        // An earlier run's screenshot must not pass for this one's.
        let _ = std::fs::remove_file(&shot);
        let mut driver = tokio::process::Command::new("node");
        driver
            .arg(script("chromium_driver.js"))
            .arg(self.devtools_port.to_string())
            .arg(format!("http://{page_from}/?ws=ws://{ws}/chat"))
            .arg(&shot)
            .env("NODE_PATH", NODE_PATH);
        let bytes = interop_kit::run_client(&mut driver, CONNECTIONS, what).await;
        let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("{what}: {}: {e}", shot.display()));
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{what}: {} is no PNG",
            shot.display()
        );
        bytes
    }

    /// Stops the browser and removes its profile.
    async fn close(mut self) {
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

#[tokio::test]
async fn chromium_echoes_text_and_binary_up_to_16_mib_and_a_close_code_directly_and_through_every_relay() {
    if !interop_kit::node_ws() || !chromium() {
        return;
    }
    let (_server, upstream) = interop_kit::node_echo_server().await;
    let browser = Chromium::start().await;
    let direct = browser.run(upstream, upstream, "direct").await;
    for mode in ["userspace", "kernel", "auto"] {
        let Some(p) = ServerProxy::in_mode(mode, upstream, "").await else {
            continue;
        };
        let through = browser.run(upstream, p.addr, mode).await;
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
