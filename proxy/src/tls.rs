//! TLS termination at run time: a rustls server configuration per service (its certificate, its
//! lowest version, ALPN `http/1.1`), one session cache and one ticket key for all of them so
//! that a client resumes wherever it lands, and the two halves of a handshake: the ClientHello
//! first (its SNI picks the service, whose admission rules apply before any cryptography), then
//! the rest with the service's configuration.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::{LazyConfigAcceptor, StartHandshake};

use crate::config::{self, TlsVersion};
use crate::stream::{Prefixed, Stream};

/// Sessions kept for resumption by session id (TLS 1.2 clients without tickets).
const SESSION_CACHE: usize = 16 * 1024;

/// Why a TLS handshake failed, as counted in `wsproxy_tls_handshake_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No service of the listener has the ClientHello's name, and none has the default
    /// certificate (or the ClientHello named none).
    NoCertificate,
    /// The client offers no protocol version (or cipher suite, group) the service accepts.
    ProtocolVersion,
    /// Not TLS, or a malformed or unexpected record.
    BadRecord,
    /// Not complete within `tls.handshake_timeout`.
    Timeout,
    /// The client closed or reset the connection during the handshake.
    Closed,
}

impl Failure {
    pub const ALL: [Failure; 5] = [
        Failure::NoCertificate,
        Failure::ProtocolVersion,
        Failure::BadRecord,
        Failure::Timeout,
        Failure::Closed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::NoCertificate => "no_certificate",
            Failure::ProtocolVersion => "protocol_version",
            Failure::BadRecord => "bad_record",
            Failure::Timeout => "timeout",
            Failure::Closed => "closed",
        }
    }

    /// What an I/O error of a handshake means.
    fn of(e: &io::Error) -> Failure {
        use rustls::Error as E;
        match e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
            Some(E::PeerIncompatible(_)) => Failure::ProtocolVersion,
            Some(E::NoCertificatesPresented) => Failure::NoCertificate,
            Some(_) => Failure::BadRecord,
            None if e.kind() == io::ErrorKind::InvalidData => Failure::BadRecord,
            None => Failure::Closed,
        }
    }
}

/// What every service's configuration shares: where sessions are kept for resumption.
pub(crate) struct Resumption {
    cache: Arc<dyn rustls::server::StoresServerSessions>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
}

impl Resumption {
    pub fn new() -> anyhow::Result<Resumption> {
        Ok(Resumption {
            cache: rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE),
            ticketer: rustls::crypto::ring::Ticketer::new()?,
        })
    }

    /// The server configuration of a service with TLS `tls`.
    pub fn server_config(&self, tls: &config::Tls) -> Arc<rustls::ServerConfig> {
        let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
            TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let mut c = rustls::ServerConfig::builder_with_provider(Arc::clone(&tls.provider))
            .with_protocol_versions(versions)
            .expect("validation saw to a suite for each version")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Certificate(Arc::clone(&tls.certified))));
        c.ignore_client_order = tls.server_order;
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        c.session_storage = Arc::clone(&self.cache);
        c.ticketer = Arc::clone(&self.ticketer);
        Arc::new(c)
    }
}

/// A service's one certificate.
#[derive(Debug)]
struct Certificate(Arc<CertifiedKey>);

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// A ClientHello read, the handshake not yet answered.
pub(crate) struct Hello {
    start: StartHandshake<Prefixed<TcpStream>>,
    fd: RawFd,
}

impl Hello {
    /// Reads the ClientHello from `io` (whose prefix is the bytes read past a PROXY protocol
    /// header), by `deadline`.
    pub async fn read(io: Prefixed<TcpStream>, deadline: Instant) -> Result<Hello, Failure> {
        let fd = io.get_ref().as_raw_fd();
        let acceptor = LazyConfigAcceptor::new(Acceptor::default(), io);
        match tokio::time::timeout_at(deadline, acceptor).await {
            Err(_) => Err(Failure::Timeout),
            Ok(Err(e)) => Err(Failure::of(&e)),
            Ok(Ok(start)) => Ok(Hello { start, fd }),
        }
    }

    /// The TCP connection it came on (for its socket options).
    pub fn socket(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor is the socket `start` owns, open as long as `self` is.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }

    /// The name the client asked for, lower-case.
    pub fn server_name(&self) -> Option<String> {
        self.start.client_hello().server_name().map(str::to_ascii_lowercase)
    }

    /// Completes the handshake with `config`, by `deadline`.
    pub async fn finish(self, config: Arc<rustls::ServerConfig>, deadline: Instant) -> Result<Stream, Failure> {
        match tokio::time::timeout_at(deadline, self.start.into_stream(config)).await {
            Err(_) => Err(Failure::Timeout),
            Ok(Err(e)) => Err(Failure::of(&e)),
            Ok(Ok(s)) => Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(s)))),
        }
    }
}
