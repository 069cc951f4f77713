//! wss for the TLS workloads: the certificate every contender terminates TLS with, and the load
//! generator's TLS client.
//!
//! - **The certificate.** One ECDSA P-256 key and self-signed certificate for `SNI`, made with
//!   `openssl req` when a run with TLS workloads starts, in the run's directory; every proxy
//!   gets the same pair (HAProxy as one PEM file with the key after the certificate).
//! - **The cipher suite.** TLS 1.3 only, TLS_AES_128_GCM_SHA256, key exchange X25519: the proxies
//!   are pinned to TLS 1.3 and that suite where their configuration allows it, and the generator
//!   offers nothing else, so that every contender does the same cryptography whatever its own
//!   preference (which `preferred` finds out separately, with a client that offers everything).
//! - **Trust.** The generator pins the generated certificate: the server's must be those bytes,
//!   with no chain; the handshake's signature is verified with its key as usual. The
//!   certificate's own self-signature is not verified again on every handshake: it is the same
//!   bytes, and that verification would be generator cost that no proxy causes.
//! - **Resumption** is off for `tls-handshakes` (every handshake is a full one) and on, with a
//!   fresh store per measurement, for `tls-resumed` (TLS 1.3 tickets, PSK with (EC)DHE, the only
//!   mode rustls offers). Each ticket is used once, as RFC 8446 asks; the store keeps up to
//!   `TICKETS` of them, not rustls's 8 per server: 50 handshake loops at the maximum take and
//!   return tickets in bursts, and with 8 most of a burst would find none and do a full handshake,
//!   more or less often depending on how each server's timing bunches them.
//!
//! rustls with the *ring* provider, as wsproxy has.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientSessionStore, Resumption, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CommonState, DigitallySignedStruct, HandshakeKind, NamedGroup, SignatureScheme};
use serde::{Deserialize, Serialize};

/// The name every TLS request carries, as SNI and in its Host field; the certificate's only name.
pub const SNI: &str = "bench.wsproxy.test";
/// The suite the proxies are pinned to and the generator offers, in the proxies' spelling.
pub const SUITE: &str = "TLS_AES_128_GCM_SHA256";
/// TLS 1.3 tickets the resuming client keeps (the newest are used first, the oldest dropped).
const TICKETS: usize = 1024;

/// The certificate and key of a run, as files and as the DER the generator pins.
pub struct Files {
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// The certificate, then the key, in one file (HAProxy's `crt`).
    pub combined: PathBuf,
    pub der: CertificateDer<'static>,
}

/// Makes a fresh ECDSA P-256 key and a self-signed certificate for `SNI` in `dir`.
pub fn generate(dir: &Path) -> Result<Files> {
    fs::create_dir_all(dir)?;
    let certificate = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&certificate)
        .args(["-days", "30", "-subj", &format!("/CN={SNI}")])
        .args(["-addext", &format!("subjectAltName=DNS:{SNI}")])
        .output()
        .context("running openssl req")?;
    if !out.status.success() {
        bail!(
            "openssl req: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let cert_pem = fs::read(&certificate)?;
    let key_pem = fs::read(&key)?;
    let combined = dir.join("combined.pem");
    fs::write(&combined, [cert_pem.as_slice(), key_pem.as_slice()].concat())?;
    let der =
        CertificateDer::from_pem_slice(&cert_pem).map_err(|e| anyhow::anyhow!("{}: {e}", certificate.display()))?;
    Ok(Files {
        certificate,
        key,
        combined,
        der,
    })
}

/// The *ring* provider, as wsproxy builds it (`wsproxy::config::provider`).
fn ring() -> CryptoProvider {
    // rustls deprecates its *ring* provider for lacking post-quantum key exchange; it is what
    // wsproxy uses, and the bench pins X25519 anyway.
    #[allow(deprecated)]
    rustls::crypto::ring::default_provider()
}

/// The pinned provider: TLS_AES_128_GCM_SHA256 and X25519 only.
fn pinned() -> CryptoProvider {
    let mut p = ring();
    p.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
    p.kx_groups = vec![rustls::crypto::ring::kx_group::X25519];
    p
}

/// Accepts exactly the generated certificate, and verifies the handshake's signature with it.
#[derive(Debug)]
struct Pinned {
    der: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() != self.der.as_ref() || !intermediates.is_empty() {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        // The certificate's key is P-256.
        vec![SignatureScheme::ECDSA_NISTP256_SHA256]
    }
}

/// The generator's TLS client.
#[derive(Clone)]
pub struct Client {
    config: Arc<rustls::ClientConfig>,
    pub name: ServerName<'static>,
}

impl Client {
    /// Pinned to TLS 1.3, TLS_AES_128_GCM_SHA256 and X25519, trusting `der` alone, no resumption,
    /// ALPN http/1.1 (as a browser opening a WebSocket over HTTP/1.1 offers).
    pub fn new(der: &CertificateDer<'static>) -> Result<Client> {
        Client::with(pinned(), der)
    }

    /// As `new`, trusting the certificate in the PEM file `path` (its first).
    pub fn from_pem_file(path: &Path) -> Result<Client> {
        let der = CertificateDer::from_pem_file(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Client::new(&der)
    }

    /// The same trust with every suite and group of the provider, in its order (AES-256-GCM,
    /// AES-128-GCM, ChaCha20-Poly1305; P-384, X25519, P-256, a key share for P-384 alone), TLS 1.2
    /// and 1.3: what a proxy picks when the choice is its own.
    pub fn offering_all(der: &CertificateDer<'static>) -> Result<Client> {
        Client::with(ring(), der)
    }

    fn with(provider: CryptoProvider, der: &CertificateDer<'static>) -> Result<Client> {
        let pinned_suites = provider.cipher_suites.len() == 1;
        let provider = Arc::new(provider);
        let verifier = Arc::new(Pinned {
            der: der.clone(),
            provider: provider.clone(),
        });
        let versions: &[&rustls::SupportedProtocolVersion] = if pinned_suites {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = Resumption::disabled();
        Ok(Client {
            config: Arc::new(config),
            name: ServerName::try_from(SNI)?.to_owned(),
        })
    }

    /// The same client resuming sessions, from a store of its own (empty at first).
    pub fn resuming(&self) -> Client {
        let mut config = (*self.config).clone();
        config.resumption = Resumption::store(Arc::new(Tickets::default()));
        Client {
            config: Arc::new(config),
            name: self.name.clone(),
        }
    }

    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.config.clone())
    }
}

/// The resuming client's tickets, for its one server name: each handed out once, newest first.
#[derive(Debug, Default)]
struct Tickets {
    tls13: Mutex<VecDeque<Tls13ClientSessionValue>>,
    kx_hint: Mutex<Option<NamedGroup>>,
}

impl ClientSessionStore for Tickets {
    fn set_kx_hint(&self, _server_name: ServerName<'static>, group: NamedGroup) {
        *self.kx_hint.lock().expect("not poisoned") = Some(group);
    }

    fn kx_hint(&self, _server_name: &ServerName<'_>) -> Option<NamedGroup> {
        *self.kx_hint.lock().expect("not poisoned")
    }

    // TLS 1.3 only: no TLS 1.2 sessions.
    fn set_tls12_session(&self, _server_name: ServerName<'static>, _value: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _server_name: &ServerName<'static>) {}

    fn insert_tls13_ticket(&self, _server_name: ServerName<'static>, value: Tls13ClientSessionValue) {
        let mut t = self.tls13.lock().expect("not poisoned");
        if t.len() == TICKETS {
            t.pop_front();
        }
        t.push_back(value);
    }

    fn take_tls13_ticket(&self, _server_name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.tls13.lock().expect("not poisoned").pop_back()
    }
}

/// What one connection negotiated, e.g. "TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519".
pub fn negotiated(c: &CommonState) -> String {
    let mut s = String::new();
    match c.protocol_version() {
        Some(v) => {
            let _ = write!(s, "{v:?}");
        }
        None => s.push('?'),
    }
    match c.negotiated_cipher_suite() {
        Some(cs) => {
            let _ = write!(s, " {:?}", cs.suite());
        }
        None => s.push_str(" ?"),
    }
    match c.negotiated_key_exchange_group() {
        Some(g) => {
            let _ = write!(s, " {:?}", g.name());
        }
        None => s.push_str(" ?"),
    }
    s
}

pub fn resumed(c: &CommonState) -> bool {
    c.handshake_kind() == Some(HandshakeKind::Resumed)
}

/// What the TLS connections of one measurement negotiated.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    /// Each combination (`negotiated`) and how many connections or handshakes had it.
    pub negotiated: std::collections::BTreeMap<String, u64>,
    /// Handshakes that resumed a session (`tls-resumed`).
    pub resumed: u64,
}

impl Seen {
    pub fn add(&mut self, negotiated: String, resumed: bool) {
        *self.negotiated.entry(negotiated).or_default() += 1;
        self.resumed += u64::from(resumed);
    }

    /// "TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519 (1,000)", each combination seen.
    pub fn describe(&self) -> String {
        self.negotiated
            .iter()
            .map(|(k, n)| format!("{k} ({})", crate::stats::fmt_int(*n as usize)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What a contender negotiated at its start: with the generator's client, and with a client
/// that offers everything.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Negotiated {
    pub measured: String,
    pub preferred: String,
}

/// What a run with TLS workloads shares: the files, the generator's client, and the client that
/// offers everything (for each proxy's own preference).
pub struct Kit {
    pub files: Files,
    pub client: Client,
    pub offering_all: Client,
}

impl Kit {
    /// Generates the certificate into `dir`.
    pub fn new(dir: &Path) -> Result<Kit> {
        let files = generate(dir)?;
        Ok(Kit {
            client: Client::new(&files.der)?,
            offering_all: Client::offering_all(&files.der)?,
            files,
        })
    }
}
