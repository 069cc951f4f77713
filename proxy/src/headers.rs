//! The request forwarded to the upstream: the client's request line and header fields as sent
//! (order and case kept), with the proxy's own fields.
//!
//! Fields that state facts about the connection (`X-Real-IP`, `X-Forwarded-Proto`,
//! `X-Request-ID`) are the proxy's own view and replace whatever the client claimed, so that an
//! application can trust them. `X-Forwarded-For` and `Forwarded` are chains: from a client that is
//! a trusted proxy (`headers.trusted_proxies`) its value is kept and this hop appended, as RFC 7239
//! and common practice expect; from any other client the chain starts at the client, and the
//! single-address claims `True-Client-IP` and `CF-Connecting-IP` are removed, so that nobody can
//! name an address an application would take for the client's.
//!
//! Hop-by-hop fields (RFC 9110 section 7.6.1) are the client's connection to the proxy, not the
//! upstream's: every field the client's `Connection` names is removed, and so are the standard
//! ones, and `Connection` itself becomes `Connection: Upgrade`, the only option this hop asks
//! of the next. The proxy's own fields are written after that removal, so a client cannot make
//! them disappear by naming them (`Connection: Upgrade, X-Real-IP`).

use std::fmt::{self, Write as _};
use std::net::IpAddr;

use crate::config::{self, UnderscoreHeaders};
use crate::handshake::Request;

/// Builds the request head for the upstream.
pub fn forwarded_request(req: &Request, client: IpAddr, request_id: &str, cfg: &config::Headers) -> Vec<u8> {
    let client = client.to_canonical();
    let client_text = IpText::new(client);
    let trusted = cfg.trusted.iter().any(|net| net.contains(&client));
    let mut out = Vec::with_capacity(req.request_line().len() + 512);
    out.extend_from_slice(req.request_line());
    out.extend_from_slice(b"\r\n");

    let replaced = |name: &str| {
        [&cfg.client_address_header, "x-forwarded-proto", &cfg.request_id_header]
            .iter()
            .any(|r| name.eq_ignore_ascii_case(r))
            || cfg.add.iter().any(|a| a.name.eq_ignore_ascii_case(name))
            || (!trusted && CLIENT_CLAIMS.iter().any(|c| name.eq_ignore_ascii_case(c)))
    };
    let hop_by_hop = hop_by_hop(req);
    // Without `forwarded_for` a trusted proxy's X-Forwarded-For passes as it came.
    let xff = cfg.forwarded_for.then(|| chain(req, "x-forwarded-for", &hop_by_hop));
    let fwd = cfg.forwarded.then(|| chain(req, "forwarded", &hop_by_hop));
    let mut xff_written = false;
    let mut fwd_written = false;
    let mut connection_written = false;
    for (name, value) in req.headers() {
        if name.eq_ignore_ascii_case("connection") {
            // Where the client's first Connection field stood, in its spelling.
            if !connection_written {
                push_field(&mut out, name, b"Upgrade");
                connection_written = true;
            }
            continue;
        }
        if replaced(name)
            || hop_by_hop.is(name)
            || (cfg.underscore_headers == UnderscoreHeaders::Drop && name.contains('_'))
        {
            continue;
        }
        if let Some(authority) = req.target_authority()
            && name.eq_ignore_ascii_case("host")
        {
            // An absolute-form target's authority is the host that counts (RFC 9112 section
            // 3.2.2): the upstream is told that one, not a Host field the proxy ignored.
            push_field(&mut out, name, authority.as_bytes());
            continue;
        }
        if let Some(xff) = &xff
            && name.eq_ignore_ascii_case("x-forwarded-for")
        {
            // All of the client's X-Forwarded-For fields become one, where the first stood.
            if !xff_written {
                push_field(&mut out, name, &append_hop(xff, client_text.as_bytes()));
                xff_written = true;
            }
            continue;
        }
        if let Some(fwd) = &fwd
            && name.eq_ignore_ascii_case("forwarded")
        {
            if !fwd_written {
                push_field(
                    &mut out,
                    name,
                    &append_hop(fwd, forwarded_element(client, &cfg.forwarded_proto).as_bytes()),
                );
                fwd_written = true;
            }
            continue;
        }
        push_field(&mut out, name, value);
    }
    if cfg.forwarded_for && !xff_written {
        push_field(&mut out, "X-Forwarded-For", client_text.as_bytes());
    }
    if cfg.forwarded && !fwd_written {
        push_field(
            &mut out,
            "Forwarded",
            forwarded_element(client, &cfg.forwarded_proto).as_bytes(),
        );
    }
    push_field(&mut out, &cfg.client_address_header, client_text.as_bytes());
    push_field(&mut out, "X-Forwarded-Proto", cfg.forwarded_proto.as_bytes());
    push_field(&mut out, &cfg.request_id_header, request_id.as_bytes());
    for a in &cfg.add {
        push_field(&mut out, &a.name, a.value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Fields that claim the client's address, believed only from a trusted proxy: the chains are
/// restarted at the client, the others removed.
const CLIENT_CLAIMS: [&str; 5] = [
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "cf-connecting-ip",
];

/// The fields that end at this hop: the standard hop-by-hop ones and those the client's
/// `Connection` fields name (any case, comma lists, several fields).
struct HopByHop<'a> {
    named: Vec<&'a [u8]>,
}

/// Removed whether or not `Connection` names them (RFC 9110 section 7.6.1): `Keep-Alive` and
/// `Proxy-Connection` describe the client's connection, and `TE` what the client accepts on it.
/// `Transfer-Encoding` is also hop-by-hop but never gets here (an upgrade request has no body,
/// handshake.rs refuses it). `Upgrade` is hop-by-hop too, yet this proxy's whole purpose is to
/// ask the next hop for the same upgrade, so it is forwarded. `Trailer` is not hop-by-hop since
/// RFC 9110 (section 6.6.2), and `Proxy-Authorization` is not in the list either: section 11.7.2
/// lets a proxy that does not use the credentials (this one authenticates nobody) relay them to a
/// next proxy that does; both are removed only when `Connection` names them.
const ALWAYS_HOP_BY_HOP: [&str; 3] = ["keep-alive", "proxy-connection", "te"];

fn hop_by_hop(req: &Request) -> HopByHop<'_> {
    let named = req
        .headers()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case(b"upgrade"))
        .collect();
    HopByHop { named }
}

impl HopByHop<'_> {
    fn is(&self, name: &str) -> bool {
        ALWAYS_HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
            || self.named.iter().any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// The values of every field named `name`, joined as one list; empty when the field is
/// hop-by-hop (the client's value ends here, the proxy's hop still goes on).
fn chain(req: &Request, name: &str, hop_by_hop: &HopByHop) -> Vec<u8> {
    let mut v = Vec::new();
    if hop_by_hop.is(name) {
        return v;
    }
    for (_, value) in req.headers().filter(|(n, _)| n.eq_ignore_ascii_case(name)) {
        if value.is_empty() {
            continue;
        }
        if !v.is_empty() {
            v.extend_from_slice(b", ");
        }
        v.extend_from_slice(value);
    }
    v
}

fn append_hop(chain: &[u8], hop: &[u8]) -> Vec<u8> {
    let mut v = chain.to_vec();
    if !v.is_empty() {
        v.extend_from_slice(b", ");
    }
    v.extend_from_slice(hop);
    v
}

/// An address as text, formatted once on the stack (a request names the client two or three
/// times; a `String` each time was the most frequent allocation of a handshake).
struct IpText {
    buf: [u8; 48],
    len: usize,
}

impl IpText {
    fn new(ip: IpAddr) -> Self {
        let mut t = IpText { buf: [0; 48], len: 0 };
        // The longest address text is 45 bytes (IPv6 with an embedded IPv4 address): it fits.
        let _ = write!(t, "{ip}");
        t
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for IpText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        self.buf
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// One RFC 7239 element; IPv6 nodes are quoted and bracketed as section 6 requires.
fn forwarded_element(client: IpAddr, proto: &str) -> String {
    match client {
        IpAddr::V4(a) => format!("for={a};proto={proto}"),
        IpAddr::V6(a) => format!("for=\"[{a}]\";proto={proto}"),
    }
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StaticHeader;
    use crate::head::RawHead;

    #[test]
    fn address_text_fits_the_longest_address() {
        for ip in [
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
            "::ffff:255.255.255.255",
            "2001:db8::1",
            "255.255.255.255",
            "0.0.0.0",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(IpText::new(ip).as_bytes(), ip.to_string().as_bytes());
        }
    }

    fn build(extra: &str, cfg: &config::Headers, ip: &str) -> String {
        String::from_utf8(forwarded_request(
            &crate::handshake::test_request(extra),
            ip.parse().unwrap(),
            "rid-1",
            cfg,
        ))
        .unwrap()
    }

    #[test]
    fn adds_the_proxy_fields_after_the_clients() {
        let out = build("", &config::Headers::default(), "192.0.2.7");
        assert_eq!(
            out,
            "GET /a HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             X-Forwarded-For: 192.0.2.7\r\nX-Real-IP: 192.0.2.7\r\nX-Forwarded-Proto: http\r\n\
             X-Request-ID: rid-1\r\n\r\n"
        );
    }

    /// Headers whose `trusted` networks hold `nets`.
    fn trusting(nets: &[&str], cfg: config::Headers) -> config::Headers {
        config::Headers {
            trusted: nets.iter().map(|n| n.parse().unwrap()).collect(),
            ..cfg
        }
    }

    #[test]
    fn a_trusted_proxy_s_chains_are_appended_and_claims_replaced() {
        let extra = "x-forwarded-for: 10.0.0.1\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-For: 10.0.0.2\r\n\
                     x-request-id: forged\r\nX-Forwarded-Proto: https\r\nTrue-Client-IP: 10.0.0.1\r\n";
        let out = build(extra, &trusting(&["192.0.2.0/24"], Default::default()), "192.0.2.7");
        assert!(
            out.contains("\r\nx-forwarded-for: 10.0.0.1, 10.0.0.2, 192.0.2.7\r\n"),
            "{out}"
        );
        assert_eq!(out.to_ascii_lowercase().matches("x-forwarded-for").count(), 1, "{out}");
        assert!(
            !out.contains("6.6.6.6") && !out.contains("forged") && !out.contains("https"),
            "{out}"
        );
        assert!(out.contains("X-Real-IP: 192.0.2.7\r\n"));
        assert!(out.contains("True-Client-IP: 10.0.0.1\r\n"), "{out}");
    }

    #[test]
    fn the_client_address_and_request_id_fields_can_be_renamed_and_xff_turned_off() {
        let cfg = config::Headers {
            client_address_header: "X-Qrator-IP-Source".into(),
            request_id_header: "X-Trace".into(),
            forwarded_for: false,
            ..Default::default()
        };
        let out = build(
            "X-Qrator-IP-Source: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-For: 6.6.6.6\r\n",
            &cfg,
            "192.0.2.7",
        );
        assert!(!out.contains("6.6.6.6"), "{out}");
        assert!(out.contains("\r\nX-Qrator-IP-Source: 192.0.2.7\r\n"), "{out}");
        assert!(
            out.contains("\r\nX-Trace: rid-1\r\n") && !out.contains("X-Request-ID"),
            "{out}"
        );
        assert!(!out.contains("X-Real-IP") && !out.contains("X-Forwarded-For"), "{out}");
        // A trusted proxy's chain passes as it came when the proxy adds none.
        let trusted = trusting(&["192.0.2.0/24"], cfg);
        let out = build("X-Forwarded-For: 10.0.0.1\r\n", &trusted, "192.0.2.7");
        assert!(out.contains("\r\nX-Forwarded-For: 10.0.0.1\r\n"), "{out}");
    }

    #[test]
    fn an_untrusted_client_s_address_claims_are_removed_and_the_chains_start_at_it() {
        let extra = "X-Forwarded-For: 10.0.0.1\r\nForwarded: for=10.0.0.1\r\nTrue-Client-IP: 10.0.0.1\r\n\
                     cf-connecting-ip: 10.0.0.1\r\n";
        let cfg = config::Headers {
            forwarded: true,
            ..Default::default()
        };
        for cfg in [cfg.clone(), trusting(&["198.51.100.0/24"], cfg)] {
            let out = build(extra, &cfg, "192.0.2.7");
            assert!(!out.contains("10.0.0.1"), "{out}");
            assert!(out.contains("X-Forwarded-For: 192.0.2.7\r\n"), "{out}");
            assert!(out.contains("Forwarded: for=192.0.2.7;proto=http\r\n"), "{out}");
        }
    }

    #[test]
    fn connection_named_fields_are_removed_and_proxy_fields_kept() {
        let cfg = config::Headers {
            forwarded: true,
            add: vec![StaticHeader {
                name: "X-Edge".into(),
                value: "pop-1".into(),
            }],
            ..Default::default()
        };
        // Several Connection fields, lists, odd case and spaces; the request() helper adds one
        // more `Connection: Upgrade` after these.
        let extra = "connection: close, X-Real-IP ,x-forwarded-for\r\nX-Forwarded-For: 10.0.0.1\r\n\
                     Connection: FORWARDED, x-request-id, X-Edge, Cookie, Upgrade\r\nForwarded: for=10.0.0.2\r\n\
                     Cookie: a=1\r\nX-Kept: yes\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n\
                     TE: trailers\r\nProxy-Authorization: Basic eA==\r\n";
        let out = build(extra, &cfg, "192.0.2.7");
        let lower = out.to_ascii_lowercase();
        let count = |name: &str| lower.matches(&format!("\r\n{name}:")).count();
        // One Connection field, where the first stood, asking for the upgrade only.
        assert_eq!(count("connection"), 1, "{out}");
        assert!(out.contains("\r\nHost: h\r\nconnection: Upgrade\r\n"), "{out}");
        // The fields it named are gone, as are the standard hop-by-hop ones.
        for gone in ["cookie", "keep-alive", "proxy-connection", "te"] {
            assert_eq!(count(gone), 0, "{gone} in {out}");
        }
        assert!(!out.contains("10.0.0.1") && !out.contains("10.0.0.2"), "{out}");
        // The proxy's own fields are all there, once, with the proxy's values.
        for (name, value) in [
            ("X-Forwarded-For", "192.0.2.7"),
            ("Forwarded", "for=192.0.2.7;proto=http"),
            ("X-Real-IP", "192.0.2.7"),
            ("X-Request-ID", "rid-1"),
            ("X-Edge", "pop-1"),
        ] {
            assert_eq!(count(&name.to_ascii_lowercase()), 1, "{name} in {out}");
            assert!(out.contains(&format!("\r\n{name}: {value}\r\n")), "{name} in {out}");
        }
        // Upgrade stays although Connection names it; unnamed end-to-end fields stay.
        assert!(out.contains("\r\nUpgrade: websocket\r\n"), "{out}");
        assert!(out.contains("\r\nX-Kept: yes\r\n"), "{out}");
        assert!(out.contains("\r\nProxy-Authorization: Basic eA==\r\n"), "{out}");
        assert!(out.contains("\r\nSec-WebSocket-Key: "), "{out}");
    }

    #[test]
    fn absolute_form_target_forwards_origin_form_and_its_authority_as_host() {
        let text = "GET http://target.test:81/a?b=1 HTTP/1.1\r\nHOST: other.test\r\nUpgrade: websocket\r\n\
                    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                    Sec-WebSocket-Version: 13\r\n\r\n";
        let req = crate::handshake::validate(
            RawHead {
                buf: text.as_bytes().to_vec(),
                head_len: text.len(),
            },
            100,
            UnderscoreHeaders::Keep,
        )
        .unwrap();
        let out = forwarded_request(&req, "192.0.2.7".parse().unwrap(), "rid-1", &config::Headers::default());
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.starts_with("GET /a?b=1 HTTP/1.1\r\nHOST: target.test:81\r\nUpgrade: websocket\r\n"),
            "{out}"
        );
        assert!(!out.contains("other.test"), "{out}");
    }

    #[test]
    fn underscore_policy_drop_and_keep() {
        let extra = "X_Real_IP: 6.6.6.6\r\nMy_Header: 1\r\n";
        let drop = build(extra, &config::Headers::default(), "192.0.2.7");
        assert!(!drop.contains("My_Header") && !drop.contains("X_Real_IP"), "{drop}");
        let keep_cfg = config::Headers {
            underscore_headers: UnderscoreHeaders::Keep,
            ..Default::default()
        };
        let keep = build(extra, &keep_cfg, "192.0.2.7");
        assert!(
            keep.contains("My_Header: 1\r\n") && keep.contains("X_Real_IP: 6.6.6.6\r\n"),
            "{keep}"
        );
    }

    #[test]
    fn forwarded_and_static_fields() {
        let cfg = config::Headers {
            forwarded: true,
            forwarded_proto: "https".into(),
            add: vec![StaticHeader {
                name: "X-Edge".into(),
                value: "pop-1".into(),
            }],
            ..Default::default()
        };
        let cfg = trusting(&["2001:db8::/32"], cfg);
        let out = build("Forwarded: for=10.0.0.1\r\nx-edge: forged\r\n", &cfg, "2001:db8::5");
        assert!(
            out.contains("Forwarded: for=10.0.0.1, for=\"[2001:db8::5]\";proto=https\r\n"),
            "{out}"
        );
        assert!(out.contains("X-Edge: pop-1\r\n") && !out.contains("forged"), "{out}");
        assert!(out.contains("X-Forwarded-Proto: https\r\n"));
        // An IPv4-mapped client is written as IPv4.
        let out = build("", &cfg, "::ffff:192.0.2.9");
        assert!(
            out.contains("X-Real-IP: 192.0.2.9\r\n") && out.contains("Forwarded: for=192.0.2.9;proto=https\r\n"),
            "{out}"
        );
    }
}
