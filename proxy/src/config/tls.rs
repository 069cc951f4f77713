//! `[tls]` (TLS termination on a service's listeners) and `[upstreams.tls]` (TLS to its
//! upstreams): the settings as written, and validation that reads every certificate and key
//! file, so that a bad or mismatched one is refused at load (naming the file) and never
//! replaces a good one at reload.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use serde::Deserialize;

/// Largest certificate or key file read: a chain is a few KiB; a path such as /dev/zero must
/// not be read to its end.
const MAX_PEM_FILE: u64 = 1 << 20;

/// The lowest TLS version accepted from clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// TLS termination, validated: the certificate and key are loaded and match.
#[derive(Debug, Clone)]
pub struct Tls {
    pub certificate: PathBuf,
    pub key: PathBuf,
    pub certified: Arc<CertifiedKey>,
    /// The end-entity certificate's notAfter.
    pub not_after: SystemTime,
    /// This service's certificate answers a ClientHello without SNI, or whose name no service
    /// of the listener has; without one such service, those handshakes are refused.
    pub default_certificate: bool,
    /// The whole TLS handshake must be done within this time.
    pub handshake_timeout: Duration,
    pub min_version: TlsVersion,
    /// The cryptography of its handshakes: [`provider`], with only the configured cipher suites
    /// in the configured order when `tls.cipher_suites` is set.
    pub provider: Arc<rustls::crypto::CryptoProvider>,
    /// `tls.cipher_suites` is set: its order is the proxy's preference, the client's is not.
    pub server_order: bool,
    /// A certificate closer than this to its notAfter is logged as a warning (at start, at each
    /// reload and once a day).
    pub expiry_warning: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct TlsFile {
    certificate: Option<PathBuf>,
    key: Option<PathBuf>,
    default_certificate: bool,
    #[serde(with = "humantime_serde")]
    handshake_timeout: Duration,
    min_version: TlsVersion,
    /// IANA names, in the proxy's order of preference; `None`: every suite of the provider,
    /// in the client's order.
    cipher_suites: Option<Vec<String>>,
    #[serde(with = "humantime_serde")]
    expiry_warning: Duration,
}

impl Default for TlsFile {
    fn default() -> Self {
        Self {
            certificate: None,
            key: None,
            default_certificate: false,
            handshake_timeout: Duration::from_secs(10),
            min_version: TlsVersion::Tls12,
            cipher_suites: None,
            expiry_warning: Duration::from_secs(21 * 24 * 3600),
        }
    }
}

impl TlsFile {
    /// `None` when TLS is off (no certificate) or a problem went to `p`.
    pub(super) fn validate(&self, p: &mut Vec<String>) -> Option<Tls> {
        let problems = p.len();
        if self.handshake_timeout.is_zero() || self.handshake_timeout > Duration::from_secs(60) {
            p.push(format!(
                "tls.handshake_timeout: must be above 0 and at most 60s, got {:?}",
                self.handshake_timeout
            ));
        }
        let (certificate, key) = match (&self.certificate, &self.key) {
            (None, None) => return None,
            (Some(c), Some(k)) => (c, k),
            (Some(_), None) => {
                p.push("tls.key: a certificate needs its key".into());
                return None;
            }
            (None, Some(_)) => {
                p.push("tls.certificate: a key needs its certificate".into());
                return None;
            }
        };
        let provider = match &self.cipher_suites {
            None => provider(),
            Some(names) => with_suites(names, self.min_version, p),
        };
        let loaded = load_certified(certificate, key, "tls.certificate", "tls.key", p);
        let (certified, not_after) = loaded?;
        (p.len() == problems).then(|| Tls {
            certificate: certificate.clone(),
            key: key.clone(),
            certified,
            not_after,
            default_certificate: self.default_certificate,
            handshake_timeout: self.handshake_timeout,
            min_version: self.min_version,
            provider,
            server_order: self.cipher_suites.is_some(),
            expiry_warning: self.expiry_warning,
        })
    }
}

impl Tls {
    /// The same settings with the certificate and key read again (they changed on disk); the
    /// problems, each naming its file, when they cannot be used.
    pub fn reloaded(&self) -> Result<Tls, Vec<String>> {
        let mut p = Vec::new();
        match load_certified(&self.certificate, &self.key, "tls.certificate", "tls.key", &mut p) {
            Some((certified, not_after)) if p.is_empty() => Ok(Tls {
                certified,
                not_after,
                ..self.clone()
            }),
            _ => Err(p),
        }
    }
}

/// TLS to a service's upstreams, validated.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub client: Arc<rustls::ClientConfig>,
    /// The name sent and verified; `None`: the upstream's host name (its address when written as
    /// an IP).
    pub server_name: Option<ServerName<'static>>,
    /// False only when `verify = false` was written: logged at start as insecure.
    pub verify: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct UpstreamTlsFile {
    enabled: bool,
    server_name: Option<String>,
    ca_file: Option<PathBuf>,
    client_certificate: Option<PathBuf>,
    client_key: Option<PathBuf>,
    verify: bool,
}

impl Default for UpstreamTlsFile {
    fn default() -> Self {
        Self {
            enabled: false,
            server_name: None,
            ca_file: None,
            client_certificate: None,
            client_key: None,
            verify: true,
        }
    }
}

impl UpstreamTlsFile {
    /// `None` when off or a problem went to `p`.
    pub(super) fn validate(&self, p: &mut Vec<String>) -> Option<UpstreamTls> {
        if !self.enabled {
            return None;
        }
        let problems = p.len();
        let server_name = self
            .server_name
            .as_ref()
            .and_then(|n| match ServerName::try_from(n.clone()) {
                Ok(name) => Some(name),
                Err(_) => {
                    p.push(format!(
                        "upstreams.tls.server_name: {n:?} is not a DNS name or an IP address"
                    ));
                    None
                }
            });
        let roots = match &self.ca_file {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certificates(path, "upstreams.tls.ca_file", p).unwrap_or_default() {
                    if let Err(e) = roots.add(cert) {
                        p.push(format!("upstreams.tls.ca_file: {}: {e}", path.display()));
                    }
                }
                Arc::new(roots)
            }
            None => system_roots(),
        };
        let client = match (&self.client_certificate, &self.client_key) {
            (None, None) => None,
            (Some(c), Some(k)) => {
                load_certified(c, k, "upstreams.tls.client_certificate", "upstreams.tls.client_key", p)
            }
            _ => {
                p.push("upstreams.tls.client_certificate: set together with client_key, or neither".into());
                None
            }
        };
        if p.len() > problems {
            return None;
        }
        let provider = provider();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default versions");
        let builder = if self.verify {
            builder.with_root_certificates(roots)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
        };
        let mut config = match client {
            None => builder.with_no_client_auth(),
            Some((certified, _)) => builder.with_client_cert_resolver(Arc::new(ClientCertificate(certified))),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Some(UpstreamTls {
            client: Arc::new(config),
            server_name,
            verify: self.verify,
        })
    }
}

/// The cryptography of every TLS connection: rustls with *ring*, which builds with the
/// toolchain the project already needs. (It lacks the post-quantum key exchange, hence rustls's
/// deprecation note; clients fall back to X25519.)
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    #[allow(deprecated)]
    let make = || Arc::new(rustls::crypto::ring::default_provider());
    Arc::clone(PROVIDER.get_or_init(make))
}

/// The IANA name of a cipher suite (rustls names the TLS 1.3 ones `TLS13_...`).
fn iana_name(suite: rustls::SupportedCipherSuite) -> String {
    let name = suite.suite().as_str().unwrap_or("unknown");
    name.replacen("TLS13_", "TLS_", 1)
}

/// [`provider`] with only the suites `names` (IANA names, case-insensitive), in that order; each
/// problem (an unknown or repeated name, no suite for a version `min_version` allows) to `p`.
fn with_suites(names: &[String], min_version: TlsVersion, p: &mut Vec<String>) -> Arc<rustls::crypto::CryptoProvider> {
    let all = provider();
    let mut chosen: Vec<rustls::SupportedCipherSuite> = Vec::new();
    for name in names {
        match all
            .cipher_suites
            .iter()
            .find(|s| iana_name(**s).eq_ignore_ascii_case(name))
        {
            Some(s) if chosen.contains(s) => p.push(format!("tls.cipher_suites: {name:?} is named twice")),
            Some(s) => chosen.push(*s),
            None => {
                let known: Vec<String> = all.cipher_suites.iter().map(|s| iana_name(*s)).collect();
                p.push(format!(
                    "tls.cipher_suites: unknown suite {name:?} (known: {})",
                    known.join(", ")
                ));
            }
        }
    }
    let for_version = |v: &rustls::SupportedProtocolVersion| chosen.iter().any(|s| s.version() == v);
    if !for_version(&rustls::version::TLS13) {
        p.push("tls.cipher_suites: names no TLS 1.3 suite (TLS 1.3 is always accepted)".into());
    }
    if min_version == TlsVersion::Tls12 && !for_version(&rustls::version::TLS12) {
        p.push(
            "tls.cipher_suites: names no TLS 1.2 suite while tls.min_version = \"1.2\" (name one, or set \"1.3\")"
                .into(),
        );
    }
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: chosen,
        ..(*all).clone()
    })
}

/// The system's trusted roots, read once.
fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    Arc::clone(ROOTS.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!(
                "upstream TLS: no trusted root certificates found on this system; set upstreams.tls.ca_file"
            );
        }
        Arc::new(roots)
    }))
}

/// The one client certificate of a service's upstream connections.
#[derive(Debug)]
struct ClientCertificate(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCertificate {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `verify = false`: any certificate is accepted (signatures still checked, so that the
/// handshake itself is sound).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A certificate chain and its key, checked to match; with the end-entity certificate's
/// notAfter. Problems name `cert_field` or `key_field` and the file.
fn load_certified(
    certificate: &Path,
    key: &Path,
    cert_field: &str,
    key_field: &str,
    p: &mut Vec<String>,
) -> Option<(Arc<CertifiedKey>, SystemTime)> {
    let chain = read_certificates(certificate, cert_field, p);
    let key_der = read_key(key, key_field, p);
    let (chain, key_der) = (chain?, key_der?);
    let not_after = match x509_parser::parse_x509_certificate(&chain[0]) {
        Ok((_, cert)) => {
            let secs = cert.validity().not_after.timestamp();
            UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
        }
        Err(e) => {
            p.push(format!(
                "{cert_field}: {}: not an X.509 certificate: {e}",
                certificate.display()
            ));
            return None;
        }
    };
    match CertifiedKey::from_der(chain, key_der, &provider()) {
        Ok(c) => Some((Arc::new(c), not_after)),
        Err(rustls::Error::InconsistentKeys(_)) => {
            p.push(format!(
                "{key_field}: {} is not the key of the certificate in {}",
                key.display(),
                certificate.display()
            ));
            None
        }
        Err(e) => {
            p.push(format!("{key_field}: {}: unusable key: {e}", key.display()));
            None
        }
    }
}

/// Every certificate of a PEM file (at least one).
fn read_certificates(path: &Path, field: &str, p: &mut Vec<String>) -> Option<Vec<CertificateDer<'static>>> {
    let bytes = read_pem(path, field, p)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    match certs {
        Ok(c) if !c.is_empty() => Some(c),
        Ok(_) => {
            p.push(format!("{field}: {}: no PEM certificate in it", path.display()));
            None
        }
        Err(e) => {
            p.push(format!("{field}: {}: {e}", path.display()));
            None
        }
    }
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &Path, field: &str, p: &mut Vec<String>) -> Option<PrivateKeyDer<'static>> {
    let bytes = read_pem(path, field, p)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(k) => Some(k),
        Err(e) => {
            p.push(format!("{field}: {}: no usable PEM private key ({e})", path.display()));
            None
        }
    }
}

/// A regular file of at most [`MAX_PEM_FILE`] bytes.
fn read_pem(path: &Path, field: &str, p: &mut Vec<String>) -> Option<Vec<u8>> {
    use std::io::Read;
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            p.push(format!("{field}: cannot read {shown}: {e}"));
            return None;
        }
    };
    if !meta.is_file() {
        p.push(format!("{field}: {shown} is not a regular file"));
        return None;
    }
    let mut bytes = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(MAX_PEM_FILE + 1).read_to_end(&mut bytes));
    if let Err(e) = read {
        p.push(format!("{field}: cannot read {shown}: {e}"));
        return None;
    }
    if bytes.len() as u64 > MAX_PEM_FILE {
        p.push(format!("{field}: {shown} is larger than {MAX_PEM_FILE} bytes"));
        return None;
    }
    Some(bytes)
}
