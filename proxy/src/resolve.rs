//! Upstreams written as host names: resolved at start and again every
//! `upstreams.resolve_interval`, each address a candidate with the entry's weight. A failed
//! resolution keeps the name's last good set, is logged when the name's state changes (not at
//! every attempt) and counted (`wsproxy_upstream_resolve_failures_total`).
//!
//! The resolver is a function, the system's (`getaddrinfo` through tokio) unless a test gives
//! its own, so that a test controls what a name resolves to and when that changes.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use crate::config::{Target, UpstreamEntry, UpstreamServer};

/// A name and port as written.
pub type Name = (String, u16);

/// The last good addresses of each name (sorted, without repeats).
pub type Resolved = BTreeMap<Name, Vec<SocketAddr>>;

/// Resolves a name to its addresses.
pub type Resolver =
    Arc<dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>> + Send + Sync>;

/// The system resolver.
pub fn system() -> Resolver {
    Arc::new(|host, port| Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), port)).await?.collect()) }))
}

/// The names among `entries`.
pub fn names(entries: &[UpstreamEntry]) -> Vec<Name> {
    entries
        .iter()
        .filter_map(|e| match &e.target {
            Target::Name { host, port } => Some((host.clone(), *port)),
            Target::Address(_) => None,
        })
        .collect()
}

/// The candidates of `entries` (main, backup): addresses as written, names expanded in place to
/// their resolved addresses (none while unresolved). An address that appears twice (written and
/// resolved, or from two names) is a candidate once, at its first place.
pub fn expand(entries: &[UpstreamEntry], resolved: &Resolved) -> (Vec<UpstreamServer>, Vec<UpstreamServer>) {
    let mut lists = (Vec::new(), Vec::new());
    let mut seen = std::collections::HashSet::new();
    for e in entries {
        let addresses = match &e.target {
            Target::Address(a) => vec![*a],
            Target::Name { host, port } => resolved.get(&(host.clone(), *port)).cloned().unwrap_or_default(),
        };
        let list = if e.backup { &mut lists.1 } else { &mut lists.0 };
        for address in addresses {
            if seen.insert(address) {
                list.push(UpstreamServer {
                    address,
                    weight: e.weight,
                    name: match &e.target {
                        Target::Name { host, .. } => Some(host.clone()),
                        Target::Address(_) => None,
                    },
                });
            }
        }
    }
    lists
}

/// One round: every name in `names` resolved again. A name that fails keeps its set in `last`
/// (or none); the failures come back with their errors.
pub async fn refresh(names: &[Name], last: &Resolved, resolver: &Resolver) -> (Resolved, Vec<(Name, io::Error)>) {
    let mut now = Resolved::new();
    let mut failed = Vec::new();
    for name in names {
        let result = resolver(name.0.clone(), name.1).await.and_then(|mut a| {
            if a.is_empty() {
                return Err(io::Error::new(io::ErrorKind::NotFound, "no address"));
            }
            a.sort();
            a.dedup();
            Ok(a)
        });
        match result {
            Ok(a) => {
                now.insert(name.clone(), a);
            }
            Err(e) => {
                if let Some(a) = last.get(name) {
                    now.insert(name.clone(), a.clone());
                }
                failed.push((name.clone(), e));
            }
        }
    }
    (now, failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn entry(target: &str, weight: u32, backup: bool) -> UpstreamEntry {
        let target = match target.parse() {
            Ok(a) => Target::Address(a),
            Err(_) => {
                let (h, p) = target.rsplit_once(':').unwrap();
                Target::Name {
                    host: h.into(),
                    port: p.parse().unwrap(),
                }
            }
        };
        UpstreamEntry { backup, target, weight }
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn names_expand_in_place_with_their_weight_and_repeats_are_dropped() {
        let entries = [
            entry("10.0.0.1:80", 1, false),
            entry("app.internal:80", 3, false),
            entry("spare.internal:80", 1, true),
        ];
        let mut resolved = Resolved::new();
        resolved.insert(("app.internal".into(), 80), vec![a("10.0.0.2:80"), a("10.0.0.1:80")]);
        let (main, backup) = expand(&entries, &resolved);
        let got: Vec<(SocketAddr, u32)> = main.iter().map(|s| (s.address, s.weight)).collect();
        assert_eq!(got, [(a("10.0.0.1:80"), 1), (a("10.0.0.2:80"), 3)]);
        assert!(backup.is_empty(), "an unresolved name has no candidate yet");
    }

    #[tokio::test]
    async fn a_failed_resolution_keeps_the_last_good_set() {
        let answers = Arc::new(Mutex::new(vec![Ok(vec![a("10.0.0.9:80"), a("10.0.0.8:80")])]));
        let queue = Arc::clone(&answers);
        let resolver: Resolver = Arc::new(move |_, _| {
            let next = queue.lock().unwrap().remove(0);
            Box::pin(async move { next })
        });
        let names = vec![("app.internal".to_string(), 80)];
        let (first, failed) = refresh(&names, &Resolved::new(), &resolver).await;
        assert!(failed.is_empty());
        assert_eq!(first[&names[0]], [a("10.0.0.8:80"), a("10.0.0.9:80")], "sorted");
        answers
            .lock()
            .unwrap()
            .push(Err(io::Error::new(io::ErrorKind::TimedOut, "resolver down")));
        let (second, failed) = refresh(&names, &first, &resolver).await;
        assert_eq!(failed.len(), 1);
        assert_eq!(second, first);
        answers.lock().unwrap().push(Ok(vec![]));
        let (third, failed) = refresh(&names, &first, &resolver).await;
        assert_eq!((failed.len(), &third), (1, &first), "an empty answer is a failure too");
    }
}
