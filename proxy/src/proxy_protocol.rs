//! The PROXY protocol (v1 and v2, parsed by `ppp`) on a listener behind an L4 layer (scrubbing,
//! anycast, a load balancer) that passes the real client address in a header before the
//! connection's own bytes.
//!
//! Only a peer in `listen.proxy_protocol.trusted` may send one; any other peer is refused before
//! a byte is read, so that nobody can claim an address by sending a header directly. A bad, too
//! long or slow header is refused too. Refusals close the connection without an answer (the peer
//! speaks the PROXY protocol, not HTTP) and are counted by reason.

use std::net::{IpAddr, SocketAddr};

use ppp::{HeaderResult, PartialResult};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::ProxyProtocol;

/// A v1 header is at most 107 bytes; a v2 header 16 bytes and its addresses and TLVs. Senders
/// put a few small TLVs there; a longer header is refused rather than buffered.
pub const MAX_HEADER: usize = 1024;
/// The longest v1 header, CRLF included (the protocol's own bound).
const V1_MAX: usize = 107;

/// Why a connection was refused before its first HTTP byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The peer is not in `trusted`.
    Untrusted,
    /// Not a PROXY protocol header, a malformed one, or one longer than [`MAX_HEADER`].
    BadHeader,
    /// No complete header within `header_timeout`.
    Timeout,
    /// The peer closed (or failed) before its header was complete.
    Closed,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::Untrusted,
        Refusal::BadHeader,
        Refusal::Timeout,
        Refusal::Closed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Untrusted => "untrusted",
            Refusal::BadHeader => "bad_header",
            Refusal::Timeout => "timeout",
            Refusal::Closed => "closed",
        }
    }
}

/// What the start of a connection holds, as far as it has arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// Not a valid header (or longer than [`MAX_HEADER`]).
    Invalid,
    /// A header of `len` bytes; `source` is the client's address, or `None` when the header
    /// carries none (v2 LOCAL, such as the sender's own health checks; v1 UNKNOWN; a family
    /// other than IPv4 and IPv6): the connection's own peer is then the client.
    Complete { len: usize, source: Option<SocketAddr> },
}

/// Reads the header at the start of `buf`. Pure and total: any bytes from the network.
pub fn parse(buf: &[u8]) -> Parsed {
    // A v1 header is judged whole, up to its CRLF: `ppp` takes some cuts inside one (after a
    // port) for errors, and a header may arrive in pieces.
    let v1 = b"PROXY ";
    if buf[..buf.len().min(v1.len())] == v1[..buf.len().min(v1.len())]
        && !buf.windows(2).any(|w| w == b"\r\n")
        && buf.len() < V1_MAX
    {
        return Parsed::Incomplete;
    }
    let header = HeaderResult::parse(buf);
    if header.is_incomplete() {
        return if buf.len() >= MAX_HEADER {
            Parsed::Invalid
        } else {
            Parsed::Incomplete
        };
    }
    match header {
        HeaderResult::V1(Ok(h)) => {
            use ppp::v1::Addresses;
            let source = match h.addresses {
                Addresses::Tcp4(a) => Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
                Addresses::Tcp6(a) => Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
                Addresses::Unknown => None,
            };
            complete(h.header.len(), source)
        }
        HeaderResult::V2(Ok(h)) => {
            use ppp::v2::{Addresses, Command};
            let source = match (h.command, h.addresses) {
                (Command::Local, _) => None,
                (Command::Proxy, Addresses::IPv4(a)) => {
                    Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                (Command::Proxy, Addresses::IPv6(a)) => {
                    Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                }
                (Command::Proxy, Addresses::Unspecified | Addresses::Unix(_)) => None,
            };
            complete(h.len(), source)
        }
        HeaderResult::V1(Err(_)) | HeaderResult::V2(Err(_)) => Parsed::Invalid,
    }
}

fn complete(len: usize, source: Option<SocketAddr>) -> Parsed {
    if len > MAX_HEADER {
        Parsed::Invalid
    } else {
        Parsed::Complete { len, source }
    }
}

/// The PROXY protocol v2 header an upstream connection begins with when the service sends one:
/// the client's address and the address it connected to (as IPv6 when their families differ),
/// and the request id as `PP2_TYPE_UNIQUE_ID`.
pub fn v2_header(client: SocketAddr, local: SocketAddr, request_id: &str) -> Vec<u8> {
    use ppp::v2::{Builder, Command, Protocol, Type, Version};
    let v6 = |a: SocketAddr| {
        let ip = match a.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        SocketAddr::new(IpAddr::V6(ip), a.port())
    };
    let (client, local) = match (client.ip().to_canonical(), local.ip().to_canonical()) {
        (IpAddr::V4(c), IpAddr::V4(l)) => (
            SocketAddr::new(c.into(), client.port()),
            SocketAddr::new(l.into(), local.port()),
        ),
        _ => (v6(client), v6(local)),
    };
    // The id is at most 128 bytes by the protocol; the proxy's are 32.
    let id = &request_id.as_bytes()[..request_id.len().min(128)];
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (client, local))
        .write_tlv(Type::UniqueId, id)
        .and_then(Builder::build)
        .expect("a header of two addresses and a short TLV fits")
}

/// The v2 LOCAL header: a connection of the proxy's own (a health probe), no client behind it.
pub fn v2_local() -> Vec<u8> {
    use ppp::v2::{Builder, Command, Version};
    Builder::new(Version::Two | Command::Local, 0)
        .build()
        .expect("an empty header fits")
}

/// Whether `peer` may send a header.
pub fn trusted(cfg: &ProxyProtocol, peer: IpAddr) -> bool {
    let peer = peer.to_canonical();
    cfg.trusted.iter().any(|net| net.contains(&peer))
}

/// Reads the header from `stream` (its peer `peer` must be trusted), within the header timeout.
/// Returns the client's address and the bytes read past the header (the start of the request).
pub async fn read_header(
    stream: &mut TcpStream,
    peer: SocketAddr,
    cfg: &ProxyProtocol,
) -> Result<(SocketAddr, Vec<u8>), Refusal> {
    if !trusted(cfg, peer.ip()) {
        return Err(Refusal::Untrusted);
    }
    let read = async {
        let mut buf = Vec::with_capacity(256);
        loop {
            match parse(&buf) {
                Parsed::Complete { len, source } => return Ok((source.unwrap_or(peer), buf.split_off(len))),
                Parsed::Invalid => return Err(Refusal::BadHeader),
                Parsed::Incomplete => {}
            }
            // Never more than the largest header: what a read takes past it is the request's
            // start, handed on; the cap keeps a slow sender from growing the buffer.
            let mut chunk = [0u8; MAX_HEADER];
            let room = MAX_HEADER - buf.len().min(MAX_HEADER - 1);
            match stream.read(&mut chunk[..room]).await {
                Ok(0) | Err(_) => return Err(Refusal::Closed),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(cfg.header_timeout, read)
        .await
        .unwrap_or(Err(Refusal::Timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIG.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&((addresses.len() + tlvs.len()) as u16).to_be_bytes());
        h.extend_from_slice(addresses);
        h.extend_from_slice(tlvs);
        h
    }

    #[test]
    fn v1_tcp4_and_tcp6_give_the_source() {
        let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 8080\r\nGET /";
        assert_eq!(
            parse(h),
            Parsed::Complete {
                len: h.len() - 5,
                source: Some("192.0.2.7:40000".parse().unwrap())
            }
        );
        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 8080\r\n";
        assert_eq!(
            parse(h),
            Parsed::Complete {
                len: h.len(),
                source: Some("[2001:db8::7]:40000".parse().unwrap())
            }
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Parsed::Complete { len: 15, source: None });
    }

    #[test]
    fn v2_proxy_and_local() {
        // IPv4 over TCP: source 192.0.2.7:40000, destination 198.51.100.1:8080, one TLV.
        let addrs = [192, 0, 2, 7, 198, 51, 100, 1, 0x9c, 0x40, 0x1f, 0x90];
        let h = v2(1, 0x11, &addrs, &[0x05, 0, 2, 1, 2]);
        let mut with_request = h.clone();
        with_request.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(
            parse(&with_request),
            Parsed::Complete {
                len: h.len(),
                source: Some("192.0.2.7:40000".parse().unwrap())
            }
        );
        let local = v2(0, 0x00, &[], &[]);
        assert_eq!(parse(&local), Parsed::Complete { len: 16, source: None });
    }

    #[test]
    fn partial_headers_wait_and_junk_is_refused() {
        let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 8080\r\n";
        for cut in 1..h.len() {
            assert_eq!(parse(&h[..cut]), Parsed::Incomplete, "{cut} bytes");
        }
        let addrs = [192, 0, 2, 7, 198, 51, 100, 1, 0x9c, 0x40, 0x1f, 0x90];
        let h = v2(1, 0x11, &addrs, &[]);
        for cut in 1..h.len() {
            assert_eq!(parse(&h[..cut]), Parsed::Incomplete, "v2, {cut} bytes");
        }
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Parsed::Invalid);
        assert_eq!(
            parse(b"PROXY TCP4 999.0.2.7 198.51.100.1 40000 8080\r\n"),
            Parsed::Invalid
        );
    }

    #[test]
    fn a_header_longer_than_the_cap_is_refused() {
        let addrs = [192, 0, 2, 7, 198, 51, 100, 1, 0x9c, 0x40, 0x1f, 0x90];
        let mut tlv = vec![0xe0];
        tlv.extend_from_slice(&2000u16.to_be_bytes());
        tlv.extend(std::iter::repeat_n(0, 2000));
        let h = v2(1, 0x11, &addrs, &tlv);
        assert_eq!(parse(&h), Parsed::Invalid);
        assert_eq!(
            parse(&h[..MAX_HEADER]),
            Parsed::Invalid,
            "refused once the cap is reached"
        );
    }

    #[test]
    fn the_header_sent_upstream_reads_back_with_the_client_and_the_request_id() {
        let client: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let h = v2_header(client, "127.0.0.1:8080".parse().unwrap(), "abc123");
        assert_eq!(
            parse(&h),
            Parsed::Complete {
                len: h.len(),
                source: Some(client)
            }
        );
        let HeaderResult::V2(Ok(parsed)) = HeaderResult::parse(&h) else {
            panic!("not a v2 header");
        };
        let id: Vec<_> = parsed
            .tlvs()
            .filter_map(Result::ok)
            .filter(|t| t.kind == 0x05)
            .collect();
        assert_eq!(id.len(), 1);
        assert_eq!(&id[0].value[..], b"abc123");
        // Families differ: both as IPv6.
        let h = v2_header(client, "[::1]:8080".parse().unwrap(), "x");
        let want: SocketAddr = "[::ffff:192.0.2.7]:40000".parse().unwrap();
        assert_eq!(
            parse(&h),
            Parsed::Complete {
                len: h.len(),
                source: Some(want)
            }
        );
        let local = v2_local();
        assert_eq!(parse(&local), Parsed::Complete { len: 16, source: None });
    }

    #[test]
    fn trust_is_by_network_and_sees_through_mapped_addresses() {
        let cfg = ProxyProtocol {
            trusted: vec!["10.0.0.0/8".parse().unwrap(), "2001:db8::/32".parse().unwrap()],
            header_timeout: std::time::Duration::from_secs(1),
        };
        assert!(trusted(&cfg, "10.1.2.3".parse().unwrap()));
        assert!(trusted(&cfg, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(trusted(&cfg, "2001:db8::5".parse().unwrap()));
        assert!(!trusted(&cfg, "192.0.2.1".parse().unwrap()));
    }
}
