//! The upstream's response head: any bytes are either a valid 101 for the key or an error,
//! never a panic; a head accepted as a 101 really is one.
#![no_main]

use libfuzzer_sys::fuzz_target;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fuzz_target!(|data: &[u8]| {
    if wsproxy::upstream::check_101(data, KEY).is_ok() {
        let mut hs = [httparse::EMPTY_HEADER; 100];
        let mut r = httparse::Response::new(&mut hs);
        assert!(r.parse(data).is_ok());
        assert_eq!(r.code, Some(101));
    }
});
