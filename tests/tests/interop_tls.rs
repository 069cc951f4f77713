//! Independent clients over wss: the proxy terminates TLS for one name (`wsproxy.test`, its
//! certificate from a test CA made for the run) and relays to a plain ws upstream.
//!
//! - Python's `websockets` trusts only the test CA, offers ALPN `http/1.1` and checks the proxy
//!   chose it; echoes text and binary messages of 0 B to 4 MiB on several connections at once
//!   and checks every byte; closes with 1000 and a reason and checks both came back.
//! - Node's `ws` (`tests/interop/node_client.js`, the test CA through `NODE_EXTRA_CA_CERTS`) runs
//!   its whole matrix against Node's echo server: permessage-deflate and a subprotocol through
//!   the proxy, text and binary of 0 B to 16 MiB, a ping, a close code and reason.
//! - Headless Chromium runs the page of the Chromium interop test (`chromium_page.html`, the same
//!   matrix and close) over `wss://`, accepting the proxy's certificate by its key for this
//!   browser's profile only.
//!
//! Every client asks for the name (SNI, certificate check, Host) and connects to 127.0.0.1, as a
//! hosts file entry would have it. The proxy's side of each run: the upgrades and nothing else
//! (no refusal, no failed TLS handshake), each connection relayed in userspace (a TLS leg never
//! goes to the kernel relay, even in the default `auto` mode) until it ended, bytes both ways.
//!
//! Without a client the test needs, it fails under CI=true and says it was skipped elsewhere.

use std::net::SocketAddr;
use std::path::Path;

use base64::Engine;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use wsproxy::relay::TotalsSnapshot;
use wsproxy_tests::DEADLINE;
use wsproxy_tests::daemon_kit::ServerProxy;
use wsproxy_tests::echo_upstream;
use wsproxy_tests::exposition::Exposition;
use wsproxy_tests::interop_kit::{self, Chromium, NODE_PATH, script};
use wsproxy_tests::relay_kit::{poll_until, say};
use wsproxy_tests::tls_kit::{Issued, TestCa};

/// The one name the proxy has a certificate for; clients resolve it to 127.0.0.1 themselves.
const NAME: &str = "wsproxy.test";
const SERVICE: &str = "wss";

/// The Python client's matrix: each size once as text, once as binary, on every connection.
const PYTHON_SIZES: [u64; 8] = [0, 1, 125, 126, 65535, 65536, 1 << 20, 4 << 20];
const PYTHON_CONNECTIONS: u64 = 4;
/// As many as the plain-ws Node interop test opens: 16 MiB messages each, compressed.
const NODE_CONNECTIONS: u64 = 4;

const PYTHON_CLIENT: &str = r#"
import asyncio, random, ssl, sys
from websockets.asyncio.client import connect

url, ca, address, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sizes = [int(s) for s in sys.argv[5:]]

# 1 + 2 + 3 + 4 bytes of UTF-8: text of exactly `size` bytes with characters of every length,
# which a byte-exact relay keeps whole.
UNIT = "a\u00e9\u20ac\U0001F600"

def text(size):
    return UNIT * (size // 10) + "a" * (size % 10)

def difference(got, want):
    return next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))

async def one(i, tls):
    rnd = random.Random(i)
    total = 0
    # host: the name (SNI, certificate, Host) stays the URL's, the connection goes to `address`.
    # proxy=None: straight to the proxy under test, whatever proxy the environment names.
    # No keepalive pings: the proxy's byte counts must be the messages' and the close's alone.
    async with connect(url, ssl=tls, host=address, proxy=None, compression=None, max_size=None,
                       ping_interval=None, open_timeout=20) as ws:
        alpn = ws.transport.get_extra_info("ssl_object").selected_alpn_protocol()
        if alpn != "http/1.1":
            raise SystemExit(f"connection {i}: ALPN {alpn!r}, want 'http/1.1'")
        for size in sizes:
            for sent in (text(size), rnd.randbytes(size)):
                kind = "text" if isinstance(sent, str) else "binary"
                await ws.send(sent)
                got = await ws.recv()
                if type(got) is not type(sent):
                    raise SystemExit(f"connection {i}: a {size} B {kind} message came back as the other kind")
                if got != sent:
                    a, b = (got.encode(), sent.encode()) if kind == "text" else (got, sent)
                    raise SystemExit(f"connection {i}: the {size} B {kind} echo differs at byte {difference(a, b)}")
                total += size
        await ws.close(code=1000, reason="done")
    if (ws.close_code, ws.close_reason) != (1000, "done"):
        raise SystemExit(f"connection {i}: closed with {ws.close_code} {ws.close_reason!r}")
    return total

async def main():
    tls = ssl.create_default_context(cafile=ca)
    tls.set_alpn_protocols(["http/1.1"])
    totals = await asyncio.wait_for(asyncio.gather(*(one(i, tls) for i in range(n))), 90)
    print("ok", len(totals), sum(totals))

asyncio.run(main())
"#;

/// A proxy terminating TLS for [`NAME`] only (no service without hosts, no default certificate:
/// a client that asks for another name or none gets no certificate) in front of `upstream`
/// (plain ws), with a certificate of a fresh test CA; the CA, the certificate and the proxy.
async fn wss_proxy(tag: &str, upstream: SocketAddr) -> (TestCa, Issued, ServerProxy) {
    let ca = TestCa::new(tag);
    let leaf = ca.issue("leaf", &[NAME]);
    // `listen` is the harness's to choose: it serves on a fresh loopback port instead.
    let config = format!(
        "[limits]\nrequests_per_second = 1000.0\nburst = 1000\n\
         [upstreams]\nmain = [{{ address = \"{upstream}\" }}]\ntimeout = \"5s\"\n\
         [[service]]\nname = \"{SERVICE}\"\nlisten = [\"127.0.0.1:0\"]\nhosts = [\"{NAME}\"]\n\
         [service.tls]\n{}",
        leaf.tls_lines()
    );
    let proxy = ServerProxy::start(&config).await;
    (ca, leaf, proxy)
}

/// Checks the proxy's side of a client's run of `connections` WebSockets: each an upgrade, and
/// nothing refused or failed (TLS handshakes included); each relayed in userspace, never moved to
/// the kernel relay, until it ended; bytes both ways. Returns the relay totals.
async fn proxy_saw(p: &ServerProxy, connections: u64, what: &str) -> TotalsSnapshot {
    let t = poll_until(DEADLINE, || {
        let t = p.server.totals();
        (t.ended.iter().sum::<u64>() >= connections).then_some(t)
    })
    .await
    .unwrap_or_else(|| panic!("{what}: not every connection ended: {:?}", p.server.totals()));
    // Index: kernel 0, userspace 1.
    assert_eq!(
        (t.ended, t.open, t.fallbacks, t.promotions),
        ([0, connections], [0, 0], 0, 0),
        "{what}: {t:?}"
    );
    assert!(
        t.client_to_upstream[1] > 0 && t.upstream_to_client[1] > 0,
        "{what}: {t:?}"
    );
    let m = Exposition::parse(&p.server.metrics_text());
    let upgraded = [("service", SERVICE), ("outcome", "upgraded"), ("status", "101")];
    assert_eq!(
        m.value("wsproxy_handshakes_total", &upgraded),
        connections as f64,
        "{what}:\n{}",
        m.text
    );
    assert_eq!(
        m.sum("wsproxy_handshakes_total", &[]),
        connections as f64,
        "{what}: a handshake that did not upgrade:\n{}",
        m.text
    );
    assert_eq!(
        m.sum("wsproxy_tls_handshake_failures_total", &[]),
        0.0,
        "{what}: a failed TLS handshake:\n{}",
        m.text
    );
    t
}

/// The base64 SHA-256 of a PEM certificate's public key (its SubjectPublicKeyInfo): what
/// Chromium's `--ignore-certificate-errors-spki-list` names a certificate it accepts by.
fn spki_sha256(certificate: &Path) -> String {
    let der = CertificateDer::from_pem_file(certificate).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    // SHA-256 as the proxy's own cryptography (ring, through rustls) computes it.
    let rustls::SupportedCipherSuite::Tls13(suite) = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
    else {
        unreachable!("a TLS 1.3 suite");
    };
    let digest = suite.common.hash_provider.hash(cert.tbs_certificate.subject_pki.raw);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

#[tokio::test]
async fn python_websockets_over_wss_echoes_text_and_binary_up_to_4_mib_with_every_byte_checked() {
    if !interop_kit::python_websockets() {
        return;
    }
    let upstream = echo_upstream().await;
    let (ca, _, p) = wss_proxy("python", upstream).await;
    let mut client = tokio::process::Command::new("python3");
    client
        .args(["-c", PYTHON_CLIENT, &format!("wss://{NAME}:{}/", p.addr.port())])
        .arg(&ca.ca_pem)
        .arg(p.addr.ip().to_string())
        .arg(PYTHON_CONNECTIONS.to_string())
        .args(PYTHON_SIZES.map(|s| s.to_string()));
    let echoed = interop_kit::run_client(&mut client, PYTHON_CONNECTIONS, "python over wss").await;
    assert_eq!(echoed, PYTHON_CONNECTIONS * 2 * PYTHON_SIZES.iter().sum::<u64>());
    let t = proxy_saw(&p, PYTHON_CONNECTIONS, "python").await;
    // The proxy counts what it relays inside TLS: each way the same frames (the messages and a
    // close each), but a client's carry a 4-byte mask key.
    let frames = PYTHON_CONNECTIONS * (2 * PYTHON_SIZES.len() as u64 + 1);
    assert_eq!(
        t.client_to_upstream[1],
        t.upstream_to_client[1] + 4 * frames,
        "python: {t:?}"
    );
    assert!(t.upstream_to_client[1] > echoed, "python: {t:?}");
    say(&format!(
        "interop tls python: {PYTHON_CONNECTIONS} connections over wss, {echoed} payload bytes echoed, {} and {} relayed in userspace",
        t.client_to_upstream[1], t.upstream_to_client[1]
    ));
    p.stop().await;
}

#[tokio::test]
async fn node_ws_over_wss_with_compression_subprotocols_pings_and_close_codes() {
    if !interop_kit::node_ws() {
        return;
    }
    let (_server, upstream) = interop_kit::node_echo_server().await;
    let (ca, _, p) = wss_proxy("node", upstream).await;
    let mut client = tokio::process::Command::new("node");
    client
        .arg(script("node_client.js"))
        .arg(format!("wss://{NAME}:{}/chat", p.addr.port()))
        .arg(NODE_CONNECTIONS.to_string())
        .arg(p.addr.ip().to_string())
        .env("NODE_PATH", NODE_PATH)
        // Added to Node's own roots when it starts: the only way it can trust the proxy.
        .env("NODE_EXTRA_CA_CERTS", &ca.ca_pem);
    let echoed = interop_kit::run_client(&mut client, NODE_CONNECTIONS, "node over wss").await;
    assert!(echoed > 0);
    let t = proxy_saw(&p, NODE_CONNECTIONS, "node").await;
    say(&format!(
        "interop tls node: {NODE_CONNECTIONS} connections over wss, {echoed} payload bytes echoed with permessage-deflate, subprotocol, ping and close code, {} and {} relayed in userspace",
        t.client_to_upstream[1], t.upstream_to_client[1]
    ));
    p.stop().await;
}

#[tokio::test]
async fn chromium_over_wss_echoes_text_and_binary_up_to_16_mib_and_a_close_code() {
    if !interop_kit::node_ws() || !interop_kit::chromium_installed() {
        return;
    }
    // The page comes from Node's echo server over plain http, as in the Chromium interop test;
    // only its WebSocket is wss, to the proxy.
    let (_server, upstream) = interop_kit::node_echo_server().await;
    let (_ca, leaf, p) = wss_proxy("chromium", upstream).await;
    let flags = [
        // The name is on loopback for this browser only.
        format!("--host-resolver-rules=MAP {NAME} {}", p.addr.ip()),
        // Straight to the proxy under test, whatever proxy the environment names.
        "--no-proxy-server".to_string(),
        // The browser does not trust the test CA: it accepts the proxy's certificate by its key,
        // and no other certificate it would refuse, for this profile only.
        format!(
            "--ignore-certificate-errors-spki-list={}",
            spki_sha256(&leaf.certificate)
        ),
    ];
    let browser = Chromium::start("chromium-wss.log", &flags).await;
    let page = format!("http://{upstream}/?ws=wss://{NAME}:{}/chat", p.addr.port());
    let echoed = browser.run(&page, "wss").await;
    assert!(echoed > 0);
    let t = proxy_saw(&p, 1, "chromium").await;
    say(&format!(
        "interop tls chromium: 1 connection over wss, {echoed} payload bytes echoed with permessage-deflate, subprotocol and close code, {} and {} relayed in userspace",
        t.client_to_upstream[1], t.upstream_to_client[1]
    ));
    browser.close().await;
    p.stop().await;
}
