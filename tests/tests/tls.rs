//! TLS from outside: the ClientHello's name picks the service's certificate (and an unknown name
//! gets the default one, or nothing), a Host other than the TLS name's is 421, versions, ALPN
//! and resumption as `openssl s_client` sees them, admission before any cryptography, hostile
//! TLS input closed cleanly while honest clients are served, certificates replaced on disk under
//! 100 open wss connections, and TLS to upstreams (verified, refused, or explicitly unverified).

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use wsproxy_tests::exposition::Exposition;
use wsproxy_tests::relay_kit::{first_difference, pattern, poll_until};
use wsproxy_tests::tls_kit::{Issued, TestCa, peer_names, write_atomically};
use wsproxy_tests::{DEADLINE, Proxy, Script, Upstream, find, header, request_for, upgrade_status, within};

const OPEN: &str = "[limits]\nrequests_per_second = 1000.0\nburst = 1000\n";

async fn upgrading() -> Upstream {
    Upstream::start(Script::Upgrade { after: Vec::new() }).await
}

/// A TLS `[[service]]` block on `listen` for `hosts`, serving `issued`, in front of `upstream`,
/// with more `[service.tls]` lines.
fn tls_service(
    name: &str,
    listen: &str,
    hosts: &[&str],
    issued: &Issued,
    upstream: SocketAddr,
    tls_more: &str,
) -> String {
    let hosts = hosts.iter().map(|h| format!("{h:?}")).collect::<Vec<_>>().join(", ");
    format!(
        "[[service]]\nname = \"{name}\"\nlisten = [\"{listen}\"]\nhosts = [{hosts}]\n\
         [service.tls]\n{}{tls_more}\n\
         [service.upstreams]\nmain = [{{ address = \"{upstream}\" }}]\n\
         [service.headers]\nadd = [{{ name = \"X-Service\", value = \"{name}\" }}]\n",
        issued.tls_lines()
    )
}

/// Upgrades `s` for `host` and reads the answer head: its status.
async fn upgrade(s: &mut (impl AsyncRead + AsyncWrite + Unpin), host: &str) -> u16 {
    upgrade_status(s, host, "").await
}

/// Writes `len` pattern bytes (seed `seed`, from `offset`) and checks they come back.
async fn echo_checked(s: &mut (impl AsyncRead + AsyncWrite + Unpin), seed: u64, offset: u64, len: usize) {
    s.write_all(pattern(seed, offset, len)).await.unwrap();
    let mut got = vec![0u8; len];
    within("the echo", s.read_exact(&mut got)).await.unwrap();
    assert_eq!(first_difference(seed, offset, &got), None, "connection {seed}");
}

fn failures(proxy: &Proxy, service: &str, reason: &str) -> f64 {
    let m = Exposition::parse(&proxy.server.metrics_text());
    m.sum(
        "wsproxy_tls_handshake_failures_total",
        &[("service", service), ("reason", reason)],
    )
}

#[tokio::test]
async fn the_client_hello_name_picks_the_service_and_its_certificate() {
    let ca = TestCa::new("sni");
    let (a_cert, b_cert) = (ca.issue("a", &["a.test"]), ca.issue("b", &["*.b.test"]));
    let (mut a, mut b) = (upgrading().await, upgrading().await);
    let text = [
        OPEN.to_string(),
        tls_service("a", "127.0.0.1:0", &["a.test"], &a_cert, a.addr, ""),
        tls_service("b", "127.0.0.1:0", &["*.b.test"], &b_cert, b.addr, ""),
    ]
    .concat();
    let proxy = Proxy::start_services(&text).await;
    for (name, names, upstream, service) in [
        ("a.test", ["a.test"], &mut a, "a"),
        ("x.b.test", ["*.b.test"], &mut b, "b"),
    ] {
        let mut s = ca.connect(proxy.addr, name).await.unwrap();
        assert_eq!(peer_names(&s), names, "{name}");
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        assert_eq!(upgrade(&mut s, name).await, 101, "{name}");
        echo_checked(&mut s, 1, 0, 100_000).await;
        drop(s);
        let seen = upstream.next_seen().await;
        assert_eq!(header(&seen.head, "x-service").as_deref(), Some(service));
    }
    // A name no service has, and no default certificate: no handshake, counted.
    assert!(ca.connect(proxy.addr, "c.test").await.is_err());
    assert_eq!(failures(&proxy, "", "no_certificate"), 1.0);
    // The TLS name is a's, the Host b's: a misdirected request.
    let mut s = ca.connect(proxy.addr, "a.test").await.unwrap();
    assert_eq!(upgrade(&mut s, "y.b.test").await, 421);
    proxy.stop().await;
}

#[tokio::test]
async fn a_default_certificate_answers_unknown_names_and_hellos_without_one() {
    let ca = TestCa::new("default");
    let (a_cert, d_cert) = (
        ca.issue("a", &["a.test"]),
        ca.issue("d", &["default.test", "127.0.0.1"]),
    );
    let up = upgrading().await;
    let text = [
        OPEN.to_string(),
        tls_service("a", "127.0.0.1:0", &["a.test"], &a_cert, up.addr, ""),
        tls_service(
            "d",
            "127.0.0.1:0",
            &["default.test"],
            &d_cert,
            up.addr,
            "default_certificate = true\n",
        ),
    ]
    .concat();
    let proxy = Proxy::start_services(&text).await;
    // An unknown name gets the default certificate (which a strict client then refuses, as it
    // should: the name is not in it).
    let names = |c: &rustls::ClientConnection| -> Vec<u8> { c.peer_certificates().unwrap()[0].to_vec() };
    let mut config = (*ca.client_config()).clone();
    config
        .dangerous()
        .set_certificate_verifier(Arc::new(AnyCertificate(wsproxy::config::provider())));
    let any = Arc::new(config);
    let s = wsproxy_tests::tls_kit::connect_with(Arc::clone(&any), proxy.addr, "c.test")
        .await
        .unwrap();
    let d_der = CertificateDer::from_pem_file(&d_cert.certificate).unwrap();
    assert_eq!(names(s.get_ref().1), d_der.to_vec());
    // An IP address sends no SNI at all: the default certificate too, and it is valid for it.
    let mut s = ca.connect(proxy.addr, "127.0.0.1").await.unwrap();
    assert_eq!(upgrade(&mut s, "default.test").await, 101);
    proxy.stop().await;
}

/// Accepts any certificate: to look at which one an unknown name gets.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn openssl() -> bool {
    wsproxy_tests::interop_kit::installed(std::process::Command::new("openssl").arg("version"), "openssl")
}

/// `openssl s_client ARGS` against `to`, with `input` on its standard input: what it printed.
async fn s_client(to: SocketAddr, args: &[&str], input: &str) -> String {
    let mut child = tokio::process::Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(to.to_string())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let out = within("openssl s_client", child.wait_with_output()).await.unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn openssl_sees_the_versions_alpn_name_and_resumption() {
    if !openssl() {
        return;
    }
    let ca = TestCa::new("openssl");
    let (a_cert, m_cert) = (ca.issue("a", &["a.test"]), ca.issue("m", &["modern.test"]));
    let up = upgrading().await;
    let text = [
        OPEN.to_string(),
        tls_service("a", "127.0.0.1:0", &["a.test"], &a_cert, up.addr, ""),
        tls_service(
            "m",
            "127.0.0.2:0",
            &["modern.test"],
            &m_cert,
            up.addr,
            "min_version = \"1.3\"\n",
        ),
    ]
    .concat();
    let proxy = Proxy::start_services(&text).await;
    let (a, m) = (proxy.bound("127.0.0.1:0").await, proxy.bound("127.0.0.2:0").await);
    let ca_file = ca.ca_pem.display().to_string();
    let base = ["-servername", "a.test", "-CAfile", &ca_file, "-alpn", "http/1.1"];
    for (version, shown) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let out = s_client(a, &[&base[..], &[version]].concat(), "").await;
        assert!(out.contains(&format!("New, {shown}")), "{version}: {out}");
        assert!(out.contains("Verify return code: 0 (ok)"), "{version}: {out}");
        assert!(out.contains("ALPN protocol: http/1.1"), "{version}: {out}");
        assert!(
            out.contains("subject=CN=a.test") || out.contains("subject=CN = a.test"),
            "{version}: {out}"
        );
    }
    // The service of modern.test accepts TLS 1.3 only.
    let out = s_client(m, &["-servername", "modern.test", "-tls1_2", "-brief"], "").await;
    assert!(!out.contains("Protocol version"), "{out}");
    assert_eq!(failures(&proxy, "m", "protocol_version"), 1.0);
    // Resumption: a session saved by one connection resumes on the next (TLS 1.2, tickets).
    let session = ca.dir.join("session.pem");
    let session = session.display().to_string();
    let out = s_client(a, &[&base[..], &["-tls1_2", "-sess_out", &session]].concat(), "").await;
    assert!(out.contains("New, TLSv1.2"), "{out}");
    let out = s_client(a, &[&base[..], &["-tls1_2", "-sess_in", &session]].concat(), "").await;
    assert!(out.contains("Reused, TLSv1.2"), "{out}");
    proxy.stop().await;
}

/// `tls.cipher_suites` pins the suites and their order: the proxy's choice, whatever the
/// client prefers; a client with none of them is refused and counted.
#[tokio::test]
async fn pinned_cipher_suites_are_chosen_in_the_proxys_order() {
    if !openssl() {
        return;
    }
    let ca = TestCa::new("suites");
    let cert = ca.issue("a", &["a.test"]);
    let up = upgrading().await;
    let pinned = "min_version = \"1.3\"\ncipher_suites = [\"TLS_AES_256_GCM_SHA384\", \"TLS_AES_128_GCM_SHA256\"]\n";
    let text = [
        OPEN.to_string(),
        tls_service("a", "127.0.0.1:0", &["a.test"], &cert, up.addr, pinned),
    ]
    .concat();
    let proxy = Proxy::start_services(&text).await;
    let ca_file = ca.ca_pem.display().to_string();
    let base = ["-servername", "a.test", "-CAfile", &ca_file, "-tls1_3"];
    // The client prefers AES-128; the proxy's order puts AES-256 first.
    let prefers_128 = ["-ciphersuites", "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384"];
    let out = s_client(proxy.addr, &[&base[..], &prefers_128].concat(), "").await;
    assert!(out.contains("Cipher is TLS_AES_256_GCM_SHA384"), "{out}");
    // Only a suite the proxy does not take: refused, counted.
    let other = ["-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"];
    let out = s_client(proxy.addr, &[&base[..], &other].concat(), "").await;
    assert!(!out.contains("Cipher is TLS_CHACHA20"), "{out}");
    let refused = poll_until(DEADLINE, || {
        (failures(&proxy, "a", "protocol_version") == 1.0).then_some(())
    })
    .await;
    assert!(refused.is_some(), "the refusal counted as protocol_version");
    proxy.stop().await;
}

#[tokio::test]
async fn per_client_limits_refuse_before_any_tls_handshake() {
    let ca = TestCa::new("admission");
    let cert = ca.issue("a", &["a.test"]);
    let up = upgrading().await;
    let text = format!(
        "[limits]\nrequests_per_second = 0.01\nburst = 2\n{}",
        tls_service("a", "127.0.0.1:0", &["a.test"], &cert, up.addr, "")
    );
    let proxy = Proxy::start_services(&text).await;
    for _ in 0..2 {
        let mut s = ca.connect(proxy.addr, "a.test").await.unwrap();
        assert_eq!(upgrade(&mut s, "a.test").await, 101);
    }
    // Over the rate: closed before a ServerHello, whatever the ClientHello said.
    let err = ca.connect(proxy.addr, "a.test").await.unwrap_err();
    let m = Exposition::parse(&proxy.server.metrics_text());
    assert_eq!(
        m.sum(
            "wsproxy_handshakes_total",
            &[("service", "a"), ("outcome", "rate_limited")]
        ),
        1.0,
        "{err}"
    );
    assert_eq!(
        m.sum("wsproxy_tls_handshake_failures_total", &[]),
        0.0,
        "no handshake was begun"
    );
    proxy.stop().await;
}

/// The bytes of a ClientHello for `name`, as a rustls client would send it.
fn client_hello(ca: &TestCa, name: &str) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut c = rustls::ClientConnection::new(ca.client_config(), name).unwrap();
    let mut out = Vec::new();
    c.write_tls(&mut out).unwrap();
    out
}

/// Reads until the proxy closes (EOF or reset): true when it did within the deadline.
async fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    within("the proxy to close", async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    })
    .await
}

#[tokio::test]
async fn hostile_tls_input_is_closed_cleanly_and_honest_clients_are_served() {
    let ca = TestCa::new("hostile");
    let cert = ca.issue("a", &["a.test"]);
    let up = upgrading().await;
    let text = [
        OPEN.to_string(),
        tls_service(
            "a",
            "127.0.0.1:0",
            &["a.test"],
            &cert,
            up.addr,
            "handshake_timeout = \"1s\"\n",
        ),
    ]
    .concat();
    let proxy = Proxy::start_services(&text).await;

    // Not TLS at all: a plain HTTP request.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(request_for("a.test", "/", "").as_bytes()).await.unwrap();
    assert!(closed(&mut s).await);
    // A record header announcing the largest record, then garbage.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut huge = vec![0x16, 0x03, 0x01, 0xff, 0xff];
    huge.extend(std::iter::repeat_n(0x41, 0xffff));
    let _ = s.write_all(&huge).await;
    assert!(closed(&mut s).await);
    // A ClientHello in one-byte writes: still a handshake.
    let hello = client_hello(&ca, "a.test");
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    for b in &hello {
        s.write_all(std::slice::from_ref(b)).await.unwrap();
    }
    let mut first = [0u8; 1];
    within("a ServerHello", s.read_exact(&mut first)).await.unwrap();
    assert_eq!(
        first[0], 0x16,
        "a handshake record answers a ClientHello, however it came"
    );
    drop(s);
    // Half a ClientHello, then nothing: closed at the handshake timeout, counted.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&hello[..hello.len() / 2]).await.unwrap();
    assert!(closed(&mut s).await);
    let counted = poll_until(DEADLINE, || (failures(&proxy, "a", "timeout") == 1.0).then_some(())).await;
    assert!(counted.is_some(), "the stalled handshake was not counted as a timeout");
    assert!(failures(&proxy, "a", "bad_record") >= 2.0);
    // A renegotiation attempt (TLS 1.2): refused by the proxy's TLS (it has none), which
    // stays up; the client gives up.
    if openssl() {
        let ca_file = ca.ca_pem.display().to_string();
        // s_client says RENEGOTIATING on its standard error: both on one pipe.
        let command = format!(
            "exec openssl s_client -connect {} -servername a.test -CAfile {ca_file} -tls1_2 2>&1",
            proxy.addr
        );
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", &command])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut out = Vec::new();
        within("the handshake before the renegotiation", async {
            let mut buf = [0u8; 4096];
            while find(&out, b"Verify return code").is_none() {
                let n = stdout.read(&mut buf).await.unwrap();
                assert!(n > 0, "s_client ended early: {}", String::from_utf8_lossy(&out));
                out.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"R\n").await.unwrap();
        within("the renegotiation attempt", async {
            let mut buf = [0u8; 4096];
            while find(&out, b"RENEGOTIATING").is_none() {
                let n = stdout.read(&mut buf).await.unwrap();
                assert!(n > 0, "{}", String::from_utf8_lossy(&out));
                out.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        drop(stdin);
        drop(child);
    }
    // And an honest client is served all along.
    let mut s = ca.connect(proxy.addr, "a.test").await.unwrap();
    assert_eq!(upgrade(&mut s, "a.test").await, 101);
    echo_checked(&mut s, 7, 0, 50_000).await;
    proxy.stop().await;
}

#[tokio::test]
async fn certificates_replaced_on_disk_under_100_open_wss_connections() {
    let ca = TestCa::new("reload");
    let cert = ca.issue("a", &["a.test"]);
    let up = upgrading().await;
    let text = [
        OPEN.to_string(),
        tls_service("a", "127.0.0.1:0", &["a.test"], &cert, up.addr, ""),
    ]
    .concat();
    let proxy = Proxy::start_services(&text).await;
    let mut open = Vec::new();
    for i in 0..100u64 {
        let mut s = ca.connect(proxy.addr, "a.test").await.unwrap();
        assert_eq!(upgrade(&mut s, "a.test").await, 101);
        echo_checked(&mut s, i, 0, 4096).await;
        open.push(s);
    }
    // A certificate and key that do not match: refused, the old pair stays.
    let other = ca.issue("other", &["other.test"]);
    write_atomically(&cert.key, &std::fs::read(&other.key).unwrap());
    // Renewal: a new certificate (with one more name) and its key, renamed into place.
    let renewed = ca.issue("renewed", &["a.test", "v2.a.test"]);
    write_atomically(&cert.certificate, &std::fs::read(&renewed.certificate).unwrap());
    write_atomically(&cert.key, &std::fs::read(&renewed.key).unwrap());
    let mut seen_new = None;
    for _ in 0..100 {
        let s = ca.connect(proxy.addr, "a.test").await.unwrap();
        if peer_names(&s).contains(&"v2.a.test".to_string()) {
            seen_new = Some(s);
            break;
        }
        // The watcher looks once a second: wait for its next look.
        let _ = poll_until(Duration::from_millis(200), || None::<()>).await;
    }
    let mut s = seen_new.expect("new handshakes never saw the renewed certificate");
    assert_eq!(upgrade(&mut s, "a.test").await, 101);
    for (i, s) in open.iter_mut().enumerate() {
        echo_checked(s, i as u64, 4096, 4096).await;
    }
    let m = Exposition::parse(&proxy.server.metrics_text());
    assert_eq!(
        m.sum("wsproxy_connections_ended_total", &[("service", "a")]),
        0.0,
        "no open connection ended"
    );
    assert!(m.value("wsproxy_tls_certificate_expiry_seconds", &[("service", "a")]) > 0.0);
    // A reload that names other files: new handshakes get that certificate, open connections
    // stay; one that names a mismatched pair is refused whole, naming the service and file.
    let other = ca.issue("v3", &["a.test", "v3.a.test"]);
    let reloaded = [
        OPEN.to_string(),
        "[listen]\ndrain_timeout = \"1s\"\n".to_string(),
        tls_service("a", "127.0.0.1:0", &["a.test"], &other, up.addr, ""),
    ]
    .concat();
    // The same listener as configured ("127.0.0.1:0"): nothing is bound again.
    let config = wsproxy::Config::parse(&reloaded, "t").unwrap();
    proxy.server.apply(config).unwrap();
    let s = ca.connect(proxy.addr, "a.test").await.unwrap();
    assert!(peer_names(&s).contains(&"v3.a.test".to_string()));
    let mismatched = Issued {
        certificate: other.certificate.clone(),
        key: cert.key.clone(),
    };
    let bad = [
        OPEN.to_string(),
        tls_service("a", "127.0.0.1:0", &["a.test"], &mismatched, up.addr, ""),
    ]
    .concat();
    let e = wsproxy::Config::parse(&bad, "t").unwrap_err();
    assert!(e.problems[0].starts_with("service \"a\": tls.key:"), "{e}");
    for (i, s) in open.iter_mut().enumerate() {
        echo_checked(s, i as u64, 8192, 4096).await;
    }
    drop(open);
    proxy.stop().await;
}

/// A TLS upstream with `issued` that upgrades every request and echoes raw bytes; reports the
/// name each ClientHello asked for.
async fn tls_upstream(issued: &Issued) -> (SocketAddr, mpsc::UnboundedReceiver<Option<String>>) {
    let chain = CertificateDer::pem_file_iter(&issued.certificate)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&issued.key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(wsproxy::config::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    let _ = tx.send(None);
                    return;
                };
                let _ = tx.send(s.get_ref().1.server_name().map(str::to_string));
                if !wsproxy_tests::accept_upgrade(&mut s).await {
                    return;
                }
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() || s.flush().await.is_err() {
                        break;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn tls_to_upstreams_verified_refused_or_explicitly_unverified() {
    let (ca, stranger) = (TestCa::new("upstream"), TestCa::new("stranger"));
    let (up, mut names) = tls_upstream(&ca.issue("up", &["up.test"])).await;
    let (odd, _) = tls_upstream(&stranger.issue("odd", &["up.test"])).await;
    let ca_file = ca.ca_pem.display();
    let service = |name: &str, listen: &str, upstreams: &str, tls: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\nlisten = [\"{listen}\"]\n\
             [service.upstreams]\n{upstreams}\ntimeout = \"2s\"\n\
             [service.upstreams.tls]\nenabled = true\nserver_name = \"up.test\"\n{tls}\n"
        )
    };
    let text = [
        OPEN.to_string(),
        service(
            "verified",
            "127.0.0.1:0",
            &format!("main = [{{ address = \"{up}\" }}]"),
            &format!("ca_file = \"{ca_file}\""),
        ),
        // The main upstream's certificate is from another CA: refused, counted, the backup tried.
        service(
            "failover",
            "127.0.0.2:0",
            &format!("main = [{{ address = \"{odd}\" }}]\nbackup = [{{ address = \"{up}\" }}]"),
            &format!("ca_file = \"{ca_file}\""),
        ),
        service(
            "unverified",
            "127.0.0.3:0",
            &format!("main = [{{ address = \"{odd}\" }}]"),
            "verify = false",
        ),
    ]
    .concat();
    let proxy = Proxy::start_services(&text).await;
    for (i, listen) in ["127.0.0.1:0", "127.0.0.2:0", "127.0.0.3:0"].into_iter().enumerate() {
        let mut s = TcpStream::connect(proxy.bound(listen).await).await.unwrap();
        assert_eq!(upgrade(&mut s, "any.test").await, 101, "{listen}");
        echo_checked(&mut s, i as u64, 0, 200_000).await;
    }
    assert_eq!(
        within("the upstream's SNI", names.recv()).await.unwrap().as_deref(),
        Some("up.test")
    );
    let m = Exposition::parse(&proxy.server.metrics_text());
    let tls_failed = [
        ("service", "failover"),
        ("upstream", &*odd.to_string()),
        ("reason", "tls"),
    ];
    assert_eq!(m.value("wsproxy_upstream_failures_total", &tls_failed), 1.0);
    proxy.stop().await;
}
