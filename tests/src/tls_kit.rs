//! TLS for the tests: a test CA (rcgen) that issues certificates into PEM files of a fresh
//! directory, a rustls client that trusts only it, and a `wss` connection through it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::within;

/// A certificate authority the tests trust, and the directory its files go to.
pub struct TestCa {
    pub dir: PathBuf,
    /// The CA certificate (PEM): what clients trust.
    pub ca_pem: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key as files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

impl Issued {
    /// The `[tls]` lines that serve it.
    pub fn tls_lines(&self) -> String {
        format!(
            "certificate = \"{}\"\nkey = \"{}\"\n",
            self.certificate.display(),
            self.key.display()
        )
    }
}

impl TestCa {
    /// A new CA with its files in a fresh directory of the temp dir.
    pub fn new(tag: &str) -> TestCa {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wsproxy-tls-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("wsproxy test CA {tag}"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, issuer.pem()).unwrap();
        TestCa { dir, ca_pem, issuer }
    }

    /// A certificate for `names` (DNS names or IP addresses) signed by this CA, written as
    /// `STEM.pem` and `STEM.key`.
    pub fn issue(&self, stem: &str, names: &[&str]) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().unwrap()),
            })
            .collect();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let issued = Issued {
            certificate: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
        };
        write_atomically(&issued.certificate, cert.pem().as_bytes());
        write_atomically(&issued.key, key.serialize_pem().as_bytes());
        issued
    }

    /// A client configuration that trusts this CA only, offering ALPN `http/1.1`.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(&self.ca_pem).unwrap()).unwrap();
        let mut c = rustls::ClientConfig::builder_with_provider(wsproxy::config::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(c)
    }

    /// A TLS connection to `to` asking for `name`, verified against this CA.
    pub async fn connect(&self, to: SocketAddr, name: &str) -> std::io::Result<TlsStream<TcpStream>> {
        connect_with(self.client_config(), to, name).await
    }
}

impl Drop for TestCa {
    /// Its files go with it: every test makes its own.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS connection to `to` asking for `name` with client configuration `config`.
pub async fn connect_with(
    config: Arc<rustls::ClientConfig>,
    to: SocketAddr,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = within("a TCP connect", TcpStream::connect(to)).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    within(
        "a TLS handshake",
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
}

/// The subject alternative DNS names of the certificate a TLS connection got.
pub fn peer_names(s: &TlsStream<TcpStream>) -> Vec<String> {
    let cert = &s.get_ref().1.peer_certificates().unwrap()[0];
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect()
}

/// Writes `bytes` to `path` through a file renamed into place: a reader never sees half a file
/// (as certificate renewal tools do).
pub fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
