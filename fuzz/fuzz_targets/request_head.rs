//! The client's request head: parse and validate any bytes; when accepted, the forwarded request
//! must be exactly one complete HTTP/1.1 head with nothing behind it (no request smuggling), and
//! must keep the validated key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsproxy::config::{Headers, UnderscoreHeaders};
use wsproxy::head::RawHead;

const MAX_HEADERS: usize = 100;

fuzz_target!(|data: &[u8]| {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Ok(httparse::Status::Complete(n)) = httparse::Request::new(&mut hs).parse(data) else {
        return;
    };
    for policy in [
        UnderscoreHeaders::Drop,
        UnderscoreHeaders::Keep,
        UnderscoreHeaders::Reject,
    ] {
        let raw = RawHead {
            buf: data.to_vec(),
            head_len: n,
        };
        let Ok(req) = wsproxy::handshake::validate(raw, MAX_HEADERS, policy) else {
            continue;
        };
        assert_eq!(req.rest(), &data[n..]);
        let cfg = Headers {
            underscore_headers: policy,
            forwarded: true,
            ..Default::default()
        };
        let out = wsproxy::headers::forwarded_request(&req, "192.0.2.1".parse().unwrap(), "fuzz", &cfg);
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS + 8];
        let mut again = httparse::Request::new(&mut hs);
        match again.parse(&out) {
            Ok(httparse::Status::Complete(m)) => assert_eq!(m, out.len(), "bytes behind the forwarded head"),
            other => panic!(
                "forwarded head does not parse: {other:?}\n{}",
                String::from_utf8_lossy(&out)
            ),
        }
        assert_eq!(again.method, Some("GET"));
        let keys: Vec<_> = again
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
            .collect();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].value.trim_ascii(), req.key.as_bytes());
        for te in again
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
        {
            panic!("Transfer-Encoding forwarded: {:?}", te.value);
        }
    }
});
