//! Which service a connection belongs to: by the listener it came in on and, where services
//! share a listener, by the request's host name. A lookup is a few hash probes (the host, then
//! each of its parent domains for wildcards), whatever the number of services.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::config::{self, HostPattern, ProxyProtocol, Service};

/// The routing table of one configuration.
#[derive(Debug, Default)]
pub struct Routes {
    listeners: HashMap<SocketAddr, Listener>,
}

/// The services of one listener.
#[derive(Debug)]
pub struct Listener {
    exact: HashMap<String, usize>,
    /// `*.example.com` as `example.com`.
    suffix: HashMap<String, usize>,
    /// The service without host names: every host no other service names.
    fallback: Option<usize>,
    /// The listener's one service, when it has just one: known before the request is read, so
    /// that its admission rules apply before anything is read.
    pub only: Option<usize>,
    /// Shared by all its services (validation sees to it).
    pub proxy_protocol: Option<ProxyProtocol>,
    /// How a request is read before its service is known: the most any of its services allows.
    pub read: config::Handshake,
    /// Its services terminate TLS (validation sees that they all do, or none).
    pub tls: bool,
    /// The longest TLS handshake timeout of its services: the bound of reading a ClientHello.
    pub tls_timeout: std::time::Duration,
    /// The service whose certificate answers a ClientHello without a name, or with a name no
    /// service of the listener has.
    pub default_certificate: Option<usize>,
    /// The keepalive settings all its services share, which its listening socket passes on to
    /// the sockets it accepts (`socket_options`); `None` when they differ.
    pub keepalive: Option<config::Keepalive>,
}

impl Routes {
    /// `services` are indexed by their position.
    pub fn new(services: &[Service]) -> Routes {
        let mut listeners: HashMap<SocketAddr, Listener> = HashMap::new();
        for (i, s) in services.iter().enumerate() {
            for &addr in &s.listen {
                let l = listeners.entry(addr).or_insert_with(|| Listener {
                    exact: HashMap::new(),
                    suffix: HashMap::new(),
                    fallback: None,
                    only: Some(i),
                    proxy_protocol: s.proxy_protocol.clone(),
                    read: s.handshake.clone(),
                    tls: s.tls.is_some(),
                    tls_timeout: std::time::Duration::ZERO,
                    default_certificate: None,
                    keepalive: Some(s.keepalive.clone()),
                });
                if l.keepalive.as_ref() != Some(&s.keepalive) {
                    l.keepalive = None;
                }
                if let Some(t) = &s.tls {
                    l.tls_timeout = l.tls_timeout.max(t.handshake_timeout);
                    if t.default_certificate {
                        l.default_certificate = Some(i);
                    }
                }
                if l.only != Some(i) {
                    l.only = None;
                }
                l.read.max_head_bytes = l.read.max_head_bytes.max(s.handshake.max_head_bytes);
                l.read.max_headers = l.read.max_headers.max(s.handshake.max_headers);
                l.read.header_timeout = l.read.header_timeout.max(s.handshake.header_timeout);
                if s.hosts.is_empty() {
                    l.fallback = Some(i);
                }
                for h in &s.hosts {
                    match h {
                        HostPattern::Exact(n) => l.exact.insert(n.clone(), i),
                        HostPattern::Suffix(n) => l.suffix.insert(n.clone(), i),
                    };
                }
            }
        }
        Routes { listeners }
    }

    pub fn listener(&self, addr: SocketAddr) -> Option<&Listener> {
        self.listeners.get(&addr)
    }
}

impl Listener {
    /// The service whose certificate a ClientHello naming `name` (or none) gets: the one `name`
    /// routes to, else the listener's default certificate.
    pub fn certificate_for(&self, name: Option<&str>) -> Option<usize> {
        name.and_then(|n| self.route(n))
            .or_else(|| name.is_none().then_some(self.fallback).flatten())
            .or(self.default_certificate)
    }

    /// The service for a request whose host (the `Host` field, or an absolute-form target's
    /// authority) is `host`: its exact name, else the longest wildcard that matches, else the
    /// listener's service without host names. `None`: no service of this listener has it.
    pub fn route(&self, host: &str) -> Option<usize> {
        let name = host_name(host);
        if let Some(&i) = self.exact.get(name.as_str()) {
            return Some(i);
        }
        if !self.suffix.is_empty() {
            // Parent domains, longest first: a.b.example.com tries b.example.com, example.com, com.
            let mut rest = name.as_str();
            while let Some((_, parent)) = rest.split_once('.') {
                if let Some(&i) = self.suffix.get(parent) {
                    return Some(i);
                }
                rest = parent;
            }
        }
        self.fallback
    }
}

/// The name of a `host[:port]`, lower-case, without a trailing dot; an IPv6 literal keeps its
/// brackets.
fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = if host.starts_with('[') {
        host.split_once(']').map_or(host, |(h, _)| &host[..h.len() + 1])
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    name.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(text: &str) -> Routes {
        let c = config::Config::parse(text, "t").unwrap_or_else(|e| panic!("{e}"));
        Routes::new(&c.services)
    }

    #[test]
    fn exact_then_most_specific_wildcard_then_the_default() {
        let r = routes(
            r#"
[upstreams]
main = [{ address = "127.0.0.1:9001" }]
[[service]]
name = "exact"
listen = ["127.0.0.1:8080"]
hosts = ["chat.example.com"]
[[service]]
name = "wide"
listen = ["127.0.0.1:8080"]
hosts = ["*.example.com"]
[[service]]
name = "narrow"
listen = ["127.0.0.1:8080"]
hosts = ["*.eu.example.com"]
[[service]]
name = "rest"
listen = ["127.0.0.1:8080", "127.0.0.1:8081"]
[[service]]
name = "alone"
listen = ["127.0.0.1:8082"]
hosts = ["alone.example"]
"#,
        );
        let l = r.listener("127.0.0.1:8080".parse().unwrap()).unwrap();
        assert_eq!(l.only, None);
        for (host, want) in [
            ("chat.example.com", Some(0)),
            ("CHAT.Example.com:8080", Some(0)),
            ("chat.example.com.", Some(0)),
            ("x.example.com", Some(1)),
            ("a.b.example.com", Some(1)),
            ("x.eu.example.com", Some(2)),
            ("a.b.eu.example.com", Some(2)),
            ("eu.example.com", Some(1)),
            ("example.com", Some(3)),
            ("[::1]:8080", Some(3)),
            ("other.test", Some(3)),
        ] {
            assert_eq!(l.route(host), want, "{host}");
        }
        assert_eq!(r.listener("127.0.0.1:8081".parse().unwrap()).unwrap().only, Some(3));
        let alone = r.listener("127.0.0.1:8082".parse().unwrap()).unwrap();
        assert_eq!(alone.only, Some(4));
        assert_eq!(alone.route("alone.example:80"), Some(4));
        assert_eq!(alone.route("other.example"), None);
        assert!(r.listener("127.0.0.1:9".parse().unwrap()).is_none());
    }
}
