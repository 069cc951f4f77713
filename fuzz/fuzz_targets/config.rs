//! The configuration loader: any text is a valid configuration or a list of problems, never a
//! panic, and every problem names its field or says where the syntax broke. A valid one has at
//! least one service, unique names, and routes every exact host of a service to that service on
//! each of its listeners.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsproxy::config::HostPattern;
use wsproxy::routes::Routes;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let c = match wsproxy::Config::parse(text, "fuzz") {
        Ok(c) => c,
        Err(e) => {
            assert!(!e.problems.is_empty());
            return;
        }
    };
    assert!(!c.services.is_empty());
    let mut names: Vec<&str> = c.services.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), c.services.len(), "service names are unique");
    let routes = Routes::new(&c.services);
    for (i, s) in c.services.iter().enumerate() {
        for addr in &s.listen {
            let l = routes.listener(*addr).expect("every listener is routed");
            for h in &s.hosts {
                if let HostPattern::Exact(name) = h {
                    assert_eq!(l.route(name), Some(i), "{name} on {addr}");
                }
            }
        }
    }
});
