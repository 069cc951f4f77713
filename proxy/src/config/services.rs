//! `[[service]]` blocks: many sites on one daemon. A service names its listeners and,
//! optionally, the host names it answers for; every section it writes (`[service.limits]`, ...)
//! is laid key by key over the file's top-level sections, which are the defaults of all.
//!
//! The rules between services live here too: unique names, at most one service per listener and
//! host (and one without hosts, the listener's default), one PROXY protocol setting per listener.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;

use super::listen::{ProxyProtocol, ProxyProtocolFile};
use super::sections::{self, Access, Handshake, Headers, Keepalive, Limits, Relay, Sections, Upstreams};
use super::tls::Tls;

/// The keys of a `[[service]]` block that are not sections.
const SERVICE_KEYS: [&str; 4] = ["name", "listen", "hosts", "proxy_protocol"];
/// Longest service name: it is a metric label and a log field.
const MAX_NAME: usize = 64;

/// One service, validated: its listeners and host names, and its own settings.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    /// The addresses it is served on (shared with other services when told apart by host).
    pub listen: Vec<SocketAddr>,
    /// Host names it answers for on those listeners; empty: every host no other service of the
    /// listener names.
    pub hosts: Vec<HostPattern>,
    /// The PROXY protocol its listeners require (`None`: off).
    pub proxy_protocol: Option<ProxyProtocol>,
    pub keepalive: Keepalive,
    pub access: Access,
    pub limits: Limits,
    pub handshake: Handshake,
    pub headers: Headers,
    pub upstreams: Upstreams,
    pub relay: Relay,
    /// TLS termination on its listeners (`None`: plain); services sharing a listener agree.
    pub tls: Option<Tls>,
}

impl Service {
    pub(super) fn new(
        name: String,
        listen: Vec<SocketAddr>,
        hosts: Vec<HostPattern>,
        proxy_protocol: Option<ProxyProtocol>,
        s: Sections,
    ) -> Service {
        Service {
            name,
            listen,
            hosts,
            proxy_protocol,
            keepalive: s.keepalive,
            access: s.access,
            limits: s.limits,
            handshake: s.handshake,
            headers: s.headers,
            upstreams: s.upstreams,
            relay: s.relay,
            tls: s.tls,
        }
    }
}

/// A host name a service answers for, compared case-insensitively without the port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `chat.example.com`.
    Exact(String),
    /// `*.example.com`: any name that ends in `.example.com` (at any depth, not `example.com`
    /// itself); the longest matching suffix wins.
    Suffix(String),
}

impl HostPattern {
    /// `name` or `*.name`, where a name is dot-separated labels of letters, digits, '-' and '_'.
    pub fn parse(written: &str) -> Result<HostPattern, String> {
        let lower = written.to_ascii_lowercase();
        let lower = lower.strip_suffix('.').unwrap_or(&lower);
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower),
        };
        let label_ok = |l: &str| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!(
                "{written:?} is not a host name such as \"chat.example.com\" or \"*.example.com\" (no port)"
            ));
        }
        Ok(if wildcard {
            HostPattern::Suffix(name.to_string())
        } else {
            HostPattern::Exact(name.to_string())
        })
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(n) => f.write_str(n),
            HostPattern::Suffix(n) => write!(f, "*.{n}"),
        }
    }
}

/// The services of `blocks` (the file's `service` key), each over `defaults` (the file's
/// top-level sections). Every problem goes to `p`: the defaults' own once, unprefixed; a
/// service's prefixed with `service "NAME"`.
pub(super) fn from_blocks(
    defaults: toml::Table,
    blocks: toml::Value,
    proxy_protocol: Option<&ProxyProtocolFile>,
    p: &mut Vec<String>,
) -> Vec<Service> {
    // The defaults alone: a bad default is one problem, not one per service that inherits it.
    let mut global = Vec::new();
    if let Some(f) = sections::from_table(defaults.clone(), "", &mut global) {
        f.validate(&mut global, false);
    }
    p.extend(global.iter().cloned());
    let global: HashSet<String> = global.into_iter().collect();

    let toml::Value::Array(blocks) = blocks else {
        p.push("service: services are [[service]] blocks".into());
        return Vec::new();
    };
    if blocks.is_empty() {
        p.push("service: at least one [[service]] block is needed".into());
    }
    let mut services = Vec::with_capacity(blocks.len());
    let mut heads = Vec::with_capacity(blocks.len());
    let mut names = HashSet::new();
    for (i, block) in blocks.into_iter().enumerate() {
        let toml::Value::Table(block) = block else {
            p.push(format!("service[{i}]: must be a table ([[service]])"));
            continue;
        };
        let mut own = Vec::new();
        let (head, sections) = one_block(&defaults, block, proxy_protocol, &mut own);
        let label = match &head.name {
            Some(name) => format!("service {name:?}"),
            None => format!("service[{i}]"),
        };
        p.extend(
            own.into_iter()
                .filter(|problem| !global.contains(problem))
                .map(|problem| format!("{label}: {problem}")),
        );
        if let Some(name) = &head.name
            && !names.insert(name.clone())
        {
            p.push(format!("{label}: name: another service has the same name"));
        }
        if let (Some(name), Some(listen), Some(hosts), Some(s)) = (&head.name, &head.listen, &head.hosts, sections) {
            services.push(Service::new(
                name.clone(),
                listen.clone(),
                hosts.clone(),
                head.proxy_protocol.clone(),
                s,
            ));
        }
        heads.push(head);
    }
    // Checked on every block whose own keys are readable, valid sections or not: one pass
    // shows every problem.
    between_services(&heads, p);
    tls_between_services(&services, p);
    services
}

/// A block's own keys, read: each `None` when it could not be.
struct Head {
    name: Option<String>,
    listen: Option<Vec<SocketAddr>>,
    hosts: Option<Vec<HostPattern>>,
    proxy_protocol: Option<ProxyProtocol>,
}

/// One block: its own keys, and its sections over the defaults (`None` when anything in them is
/// wrong).
fn one_block(
    defaults: &toml::Table,
    mut block: toml::Table,
    proxy_protocol: Option<&ProxyProtocolFile>,
    p: &mut Vec<String>,
) -> (Head, Option<Sections>) {
    let name = match block.remove("name") {
        Some(toml::Value::String(n)) if valid_name(&n) => Some(n),
        Some(toml::Value::String(n)) => {
            p.push(format!(
                "name: {n:?} must be 1 to {MAX_NAME} letters, digits, '-', '_' or '.'"
            ));
            None
        }
        Some(_) => {
            p.push("name: must be a string".into());
            None
        }
        None => {
            p.push("name: every service needs one".into());
            None
        }
    };
    let listen = addresses(block.remove("listen"), p);
    let hosts = host_patterns(block.remove("hosts"), p);
    let proxy_protocol = match block.remove("proxy_protocol") {
        Some(v) => match v.try_into::<ProxyProtocolFile>() {
            Ok(f) => f.validate("proxy_protocol", p),
            Err(e) => {
                p.push(format!("proxy_protocol: {}", super::toml_message(&e)));
                None
            }
        },
        None => proxy_protocol.and_then(|f| f.validate("proxy_protocol", &mut Vec::new())),
    };
    for key in block.keys() {
        if !sections::is_section(key) {
            p.push(format!(
                "{key}: unknown key (a service has {} and the sections {})",
                SERVICE_KEYS.join(", "),
                sections::SECTIONS.join(", ")
            ));
        }
    }
    block.retain(|k, _| sections::is_section(k));
    let mut merged = defaults.clone();
    merge(&mut merged, block);
    let sections = sections::from_table(merged, "", p).and_then(|f| f.validate(p, true));
    let head = Head {
        name,
        listen,
        hosts,
        proxy_protocol,
    };
    (head, sections)
}

fn valid_name(n: &str) -> bool {
    (1..=MAX_NAME).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// `listen = ["IP:PORT", ...]` (or one string): at least one, each once.
fn addresses(value: Option<toml::Value>, p: &mut Vec<String>) -> Option<Vec<SocketAddr>> {
    let written = match value {
        None => {
            p.push("listen: name at least one address, such as listen = [\"0.0.0.0:8080\"]".into());
            return None;
        }
        Some(v) => strings("listen", v, p)?,
    };
    let problems = p.len();
    let mut out = Vec::new();
    for a in &written {
        match a.parse::<SocketAddr>() {
            Ok(addr) if out.contains(&addr) => p.push(format!("listen: {a:?} is listed twice")),
            Ok(addr) => out.push(addr),
            Err(_) => p.push(format!(
                "listen: {a:?} is not an IP address and port such as \"0.0.0.0:8080\""
            )),
        }
    }
    if written.is_empty() {
        p.push("listen: name at least one address".into());
    }
    (p.len() == problems).then_some(out)
}

/// `hosts = ["name", "*.name", ...]`: each once.
fn host_patterns(value: Option<toml::Value>, p: &mut Vec<String>) -> Option<Vec<HostPattern>> {
    let Some(value) = value else {
        return Some(Vec::new());
    };
    let written = strings("hosts", value, p)?;
    let problems = p.len();
    let mut out = Vec::new();
    for h in &written {
        match HostPattern::parse(h) {
            Ok(pattern) if out.contains(&pattern) => p.push(format!("hosts: {h:?} is listed twice")),
            Ok(pattern) => out.push(pattern),
            Err(e) => p.push(format!("hosts: {e}")),
        }
    }
    (p.len() == problems).then_some(out)
}

/// A string, or an array of strings.
fn strings(field: &str, value: toml::Value, p: &mut Vec<String>) -> Option<Vec<String>> {
    match value {
        toml::Value::String(s) => Some(vec![s]),
        toml::Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    toml::Value::String(s) => out.push(s),
                    other => {
                        p.push(format!("{field}: {other} is not a string"));
                        return None;
                    }
                }
            }
            Some(out)
        }
        other => {
            p.push(format!("{field}: must be a list of strings, got {other}"));
            None
        }
    }
}

/// Lays `over` on `base` key by key: tables merge, anything else (lists too) replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// The rules between services that share a listener.
fn between_services(heads: &[Head], p: &mut Vec<String>) {
    // Per listener: who answers each host, who is the default, and the PROXY protocol setting.
    let mut hosts: HashMap<(SocketAddr, &HostPattern), &str> = HashMap::new();
    let mut defaults: HashMap<SocketAddr, &str> = HashMap::new();
    let mut edge: HashMap<SocketAddr, (&str, &Option<ProxyProtocol>)> = HashMap::new();
    for h in heads {
        let (Some(name), Some(listen), Some(patterns)) = (&h.name, &h.listen, &h.hosts) else {
            continue;
        };
        let label = format!("service {name:?}");
        for &addr in listen {
            if patterns.is_empty()
                && let Some(other) = defaults.insert(addr, name)
            {
                p.push(format!(
                    "{label}: hosts: service {other:?} also takes every host on {addr}; give one of them hosts"
                ));
            }
            for pattern in patterns {
                if let Some(other) = hosts.insert((addr, pattern), name) {
                    p.push(format!(
                        "{label}: hosts: {pattern} on {addr} is service {other:?}'s already"
                    ));
                }
            }
            match edge.get(&addr) {
                Some((other, pp)) if *pp != &h.proxy_protocol => p.push(format!(
                    "{label}: proxy_protocol: differs from service {other:?}'s on the listener {addr} they share"
                )),
                Some(_) => {}
                None => {
                    edge.insert(addr, (name, &h.proxy_protocol));
                }
            }
        }
    }
}

/// The TLS rules between services that share a listener (checked on valid services: whether a
/// service has TLS is known once its sections are): all TLS or all plain, and at most one
/// default certificate.
fn tls_between_services(services: &[Service], p: &mut Vec<String>) {
    let mut first: HashMap<SocketAddr, (&str, bool)> = HashMap::new();
    let mut default: HashMap<SocketAddr, &str> = HashMap::new();
    for s in services {
        let label = format!("service {:?}", s.name);
        for &addr in &s.listen {
            let tls = s.tls.is_some();
            match first.get(&addr) {
                Some((other, other_tls)) if *other_tls != tls => p.push(format!(
                    "{label}: tls: the listener {addr} is {} for service {other:?}; services on one listener are all TLS or all plain",
                    if *other_tls { "TLS" } else { "plain" }
                )),
                Some(_) => {}
                None => {
                    first.insert(addr, (&s.name, tls));
                }
            }
            if s.tls.as_ref().is_some_and(|t| t.default_certificate)
                && let Some(other) = default.insert(addr, &s.name)
            {
                p.push(format!(
                    "{label}: tls.default_certificate: service {other:?} has the default certificate of {addr} already"
                ));
            }
        }
    }
}
