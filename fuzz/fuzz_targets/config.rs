//! The configuration loader: any text is a valid configuration or a list of problems, never a
//! panic, and every problem names its field or says where the syntax broke.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = wsproxy::Config::parse(text, "fuzz") {
        assert!(!e.problems.is_empty());
    }
});
