//! The request forwarded to the upstream: the client's request line and header fields as sent
//! (order and case kept), with the proxy's own fields.
//!
//! Fields that state facts about the connection (`X-Real-IP`, `X-Forwarded-Proto`,
//! `X-Request-ID`) are the proxy's own view and replace whatever the client claimed, so that an
//! application can trust them. `X-Forwarded-For` and `Forwarded` are chains: the client's value is
//! kept and the proxy's hop is appended, as RFC 7239 and common practice expect.

use std::net::IpAddr;

use crate::config::{self, UnderscoreHeaders};
use crate::handshake::Request;

/// Builds the request head for the upstream.
pub fn forwarded_request(req: &Request, client: IpAddr, request_id: &str, cfg: &config::Headers) -> Vec<u8> {
    let client = client.to_canonical();
    let mut out = Vec::with_capacity(req.request_line().len() + 512);
    out.extend_from_slice(req.request_line());
    out.extend_from_slice(b"\r\n");

    let replaced = |name: &str| {
        ["x-real-ip", "x-forwarded-proto", "x-request-id"]
            .iter()
            .any(|r| name.eq_ignore_ascii_case(r))
            || cfg.add.iter().any(|a| a.name.eq_ignore_ascii_case(name))
    };
    let xff = chain(req, "x-forwarded-for");
    let fwd = cfg.forwarded.then(|| chain(req, "forwarded"));
    let mut xff_written = false;
    let mut fwd_written = false;
    for (name, value) in req.headers() {
        if replaced(name) || (cfg.underscore_headers == UnderscoreHeaders::Drop && name.contains('_')) {
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            // All of the client's X-Forwarded-For fields become one, where the first stood.
            if !xff_written {
                push_field(&mut out, name, &append_hop(&xff, client.to_string().as_bytes()));
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
    if !xff_written {
        push_field(&mut out, "X-Forwarded-For", client.to_string().as_bytes());
    }
    if cfg.forwarded && !fwd_written {
        push_field(
            &mut out,
            "Forwarded",
            forwarded_element(client, &cfg.forwarded_proto).as_bytes(),
        );
    }
    push_field(&mut out, "X-Real-IP", client.to_string().as_bytes());
    push_field(&mut out, "X-Forwarded-Proto", cfg.forwarded_proto.as_bytes());
    push_field(&mut out, "X-Request-ID", request_id.as_bytes());
    for a in &cfg.add {
        push_field(&mut out, &a.name, a.value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The values of every field named `name`, joined as one list.
fn chain(req: &Request, name: &str) -> Vec<u8> {
    let mut v = Vec::new();
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

    fn request(extra: &str) -> Request {
        let text = format!(
            "GET /a HTTP/1.1\r\nHost: h\r\n{extra}Upgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let n = text.len();
        crate::handshake::validate(
            RawHead {
                buf: text.into_bytes(),
                head_len: n,
            },
            100,
            UnderscoreHeaders::Keep,
        )
        .unwrap()
    }

    fn build(extra: &str, cfg: &config::Headers, ip: &str) -> String {
        String::from_utf8(forwarded_request(&request(extra), ip.parse().unwrap(), "rid-1", cfg)).unwrap()
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

    #[test]
    fn chains_are_appended_and_claims_replaced() {
        let extra = "x-forwarded-for: 10.0.0.1\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-For: 10.0.0.2\r\n\
                     x-request-id: forged\r\nX-Forwarded-Proto: https\r\n";
        let out = build(extra, &config::Headers::default(), "192.0.2.7");
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
