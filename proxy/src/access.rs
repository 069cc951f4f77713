//! `[access]`: which clients and which pages may open a WebSocket through the proxy. A refused
//! one gets 403 (`handshake::Rejection::Forbidden`): a client network before its request is read,
//! an `Origin` once the request is.

use std::net::IpAddr;

use crate::config::Access;
use crate::handshake::Request;

/// Denied networks first, then the allowed ones (all, when none are listed).
pub fn client_allowed(a: &Access, ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    !a.deny.iter().any(|n| n.contains(&ip)) && (a.allow.is_empty() || a.allow.iter().any(|n| n.contains(&ip)))
}

/// With an allow-list, the request's `Origin` must be in it: a request without one (not from a
/// browser page) or with several is refused too, since the list is there to keep out the pages
/// of other sites, and a missing field cannot prove it is not one.
pub fn origin_allowed(a: &Access, req: &Request) -> bool {
    if a.origins.is_empty() {
        return true;
    }
    let mut origins = req
        .headers()
        .filter(|(name, _)| name.eq_ignore_ascii_case("origin"))
        .map(|(_, value)| value);
    match (origins.next(), origins.next()) {
        (Some(origin), None) => a
            .origins
            .iter()
            .any(|allowed| allowed.as_bytes().eq_ignore_ascii_case(origin.trim_ascii())),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::test_request;

    fn access(allow: &[&str], deny: &[&str], origins: &[&str]) -> Access {
        Access {
            allow: allow.iter().map(|n| n.parse().unwrap()).collect(),
            deny: deny.iter().map(|n| n.parse().unwrap()).collect(),
            origins: origins.iter().map(|o| o.to_string()).collect(),
        }
    }

    #[test]
    fn deny_wins_over_allow_and_no_allow_list_allows_all() {
        let a = access(&["10.0.0.0/8"], &["10.6.0.0/16"], &[]);
        assert!(client_allowed(&a, "10.1.2.3".parse().unwrap()));
        assert!(!client_allowed(&a, "10.6.2.3".parse().unwrap()));
        assert!(!client_allowed(&a, "192.0.2.1".parse().unwrap()));
        assert!(client_allowed(&a, "::ffff:10.1.2.3".parse().unwrap()), "mapped IPv4");
        let open = access(&[], &["192.0.2.0/24"], &[]);
        assert!(client_allowed(&open, "198.51.100.1".parse().unwrap()));
        assert!(!client_allowed(&open, "192.0.2.9".parse().unwrap()));
    }

    #[test]
    fn origins_are_matched_whole_and_without_case() {
        let a = access(&[], &[], &["https://chat.example.com"]);
        assert!(origin_allowed(
            &a,
            &test_request("Origin: https://chat.example.com\r\n")
        ));
        assert!(origin_allowed(
            &a,
            &test_request("origin: HTTPS://Chat.Example.com\r\n")
        ));
        assert!(!origin_allowed(
            &a,
            &test_request("Origin: https://chat.example.com.evil\r\n")
        ));
        assert!(!origin_allowed(
            &a,
            &test_request("Origin: http://chat.example.com\r\n")
        ));
        assert!(!origin_allowed(&a, &test_request("")), "no Origin");
        assert!(
            !origin_allowed(
                &a,
                &test_request("Origin: https://chat.example.com\r\nOrigin: https://evil.example\r\n")
            ),
            "two Origins"
        );
        assert!(
            origin_allowed(&access(&[], &[], &[]), &test_request("")),
            "no list: anything"
        );
    }
}
