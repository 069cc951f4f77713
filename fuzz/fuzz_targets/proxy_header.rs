//! The PROXY protocol header at the start of a connection: any bytes give "incomplete",
//! "invalid" or a complete header no longer than the input and the cap, never a panic; and a
//! complete header stays complete, with the same length, whatever follows it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsproxy::proxy_protocol::{MAX_HEADER, Parsed, parse};

fuzz_target!(|data: &[u8]| {
    if let Parsed::Complete { len, source } = parse(data) {
        assert!(len <= data.len() && len <= MAX_HEADER);
        let mut more = data.to_vec();
        more.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(parse(&more), Parsed::Complete { len, source });
    }
});
