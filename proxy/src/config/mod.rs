//! The configuration file: TOML as written by the operator, and the validated [`Config`] the
//! rest of the proxy uses.
//!
//! Every field has a default so that a short file works, unknown fields are refused (a typo must not
//! silently fall back to a default), and validation reports every bad value at once, each naming
//! its field (and its service), so that an operator fixes a file in one pass.
//!
//! One concern per file: `listen` and `admin` are the process's own settings, `sections` the
//! settings a service is made of, `services` the `[[service]]` blocks and the rules between them.

mod admin;
mod cluster;
mod listen;
mod sections;
mod services;
#[cfg(test)]
mod tests;
mod tls;
mod upgrade;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use admin::{Admin, AdminAddress, Token};
pub use cluster::{Cluster, OnStoreError};
pub use listen::ProxyProtocol;
pub use sections::*;
pub use services::{HostPattern, Service};
pub use tls::{Tls, TlsVersion, UpstreamTls, provider};
pub use upgrade::Upgrade;

/// The listener of a file without `[[service]]` blocks and without `listen.address`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The name of the one service of a file without `[[service]]` blocks.
pub const DEFAULT_SERVICE: &str = "default";

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Cap on connections open at once (all clients together); accept waits while it is reached.
    pub max_connections: usize,
    /// At shutdown, and when a listener is removed, time open connections get to finish before
    /// they are closed.
    pub drain_timeout: Duration,
    /// Connections still open when a drain ends are closed over this window, each at its own
    /// moment (fixed by its request id), so that their clients do not reconnect at once.
    pub close_spread: Duration,
    /// Admin listener (metrics, health, reload); `None`: off.
    pub admin: Option<Admin>,
    /// Binary upgrades (`wsproxy upgrade`, SIGUSR2); `None`: off.
    pub upgrade: Option<Upgrade>,
    /// At least one; names, and listener and host pairs, are unique.
    pub services: Vec<Service>,
}

impl Config {
    /// Every address some service listens on, each once, in file order.
    pub fn listeners(&self) -> Vec<SocketAddr> {
        let mut seen = std::collections::HashSet::new();
        self.services
            .iter()
            .flat_map(|s| s.listen.iter().copied())
            .filter(|a| seen.insert(*a))
            .collect()
    }

    /// Whether any service may use the kernel relay (then it is loaded at start), and whether
    /// one requires it (then a kernel relay that cannot load stops the start).
    pub fn kernel_relay_wanted(&self) -> (bool, bool) {
        let modes = || self.services.iter().map(|s| s.relay.mode);
        (
            modes().any(|m| m != RelayMode::Userspace),
            modes().any(|m| m == RelayMode::Kernel),
        )
    }

    /// The in-flight windows (`relay.max_in_flight_bytes`) of the services the kernel relay may
    /// carry (`relay.mode` other than `userspace`).
    pub fn kernel_relay_windows(&self) -> impl Iterator<Item = u64> + '_ {
        self.services
            .iter()
            .filter(|s| s.relay.mode != RelayMode::Userspace)
            .map(|s| s.relay.max_in_flight_bytes)
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// Networks written as "10.0.0.0/8" or as an address (a network of one); every entry that is
/// neither goes to `p`, named by `field`.
fn networks(field: &str, written: &[String], p: &mut Vec<String>) -> Vec<ipnet::IpNet> {
    let mut nets = Vec::new();
    for net in written {
        match net
            .parse::<ipnet::IpNet>()
            .or_else(|_| net.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        {
            Ok(n) => nets.push(n.trunc()),
            Err(_) => p.push(format!(
                "{field}: {net:?} is not a network such as \"10.0.0.0/8\" or an address"
            )),
        }
    }
    nets
}

/// Everything wrong with a configuration, one entry per bad field.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration {}:", self.source_name)?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates a file. Every error (unreadable, syntax, values) is a [`ConfigError`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            problems: vec![format!("cannot read the file: {e}")],
        })?;
        Self::parse(&text, &name)
    }

    /// Parses and validates TOML text; `source_name` names it in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            source_name: source_name.to_string(),
            problems,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| fail(vec![toml_problem(&e)]))?;
        from_table(table).map_err(fail)
    }
}

/// toml's message spans several lines with a source excerpt; keep its first line and the position.
fn toml_problem(e: &toml::de::Error) -> String {
    let message = e.message().trim().to_string();
    match e.span() {
        Some(span) => format!("syntax: {message} (at byte {})", span.start),
        None => format!("syntax: {message}"),
    }
}

/// An HTTP token (RFC 9110 section 5.6.2): what a header name must be.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_field_value(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// Splits the file into the process's settings, the sections' defaults and the services, and
/// validates all of it.
fn from_table(mut table: toml::Table) -> Result<Config, Vec<String>> {
    let mut p = Vec::new();
    let listen: listen::ListenFile = take(&mut table, "listen", "", &mut p).unwrap_or_default();
    let admin_file: admin::AdminFile = take(&mut table, "admin", "", &mut p).unwrap_or_default();
    let upgrade_file: upgrade::UpgradeFile = take(&mut table, "upgrade", "", &mut p).unwrap_or_default();
    let upgrade = upgrade_file.validate(&mut p);
    if listen.close_spread > Duration::from_secs(3600) {
        p.push(format!(
            "listen.close_spread: must be at most 1h, got {:?}",
            listen.close_spread
        ));
    }
    let blocks = table.remove("service");
    if listen.max_connections == 0 {
        p.push("listen.max_connections: must be at least 1".into());
    }
    let admin = admin_file.validate(&mut p);
    let proxy_protocol = listen
        .proxy_protocol
        .as_ref()
        .and_then(|pp| pp.validate("listen.proxy_protocol", &mut p));
    let services = match blocks {
        None => {
            let address = listen.address.as_deref().unwrap_or(DEFAULT_LISTEN);
            let address = match address.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    p.push(format!(
                        "listen.address: {address:?} is not an IP address and port such as \"127.0.0.1:8080\""
                    ));
                    None
                }
            };
            let sections = sections::from_table(table, "", &mut p).and_then(|f| f.validate(&mut p, true));
            match (address, sections) {
                (Some(a), Some(s)) => vec![Service::new(
                    DEFAULT_SERVICE.into(),
                    vec![a],
                    Vec::new(),
                    proxy_protocol,
                    s,
                )],
                _ => Vec::new(),
            }
        }
        Some(blocks) => {
            if listen.address.is_some() {
                p.push("listen.address: a file with [[service]] blocks names the listeners in each service (`listen = [...]`)".into());
            }
            services::from_blocks(table, blocks, listen.proxy_protocol.as_ref(), &mut p)
        }
    };
    if !p.is_empty() {
        return Err(p);
    }
    Ok(Config {
        max_connections: listen.max_connections,
        drain_timeout: listen.drain_timeout,
        close_spread: listen.close_spread,
        admin,
        upgrade,
        services,
    })
}

/// Removes `key` from `table` and reads it as a `T`; `None` when absent or unreadable (then the
/// problem, named `{prefix}{key}`, goes to `p`).
fn take<T: serde::de::DeserializeOwned>(
    table: &mut toml::Table,
    key: &str,
    prefix: &str,
    p: &mut Vec<String>,
) -> Option<T> {
    let value = table.remove(key)?;
    match value.try_into() {
        Ok(v) => Some(v),
        Err(e) => {
            p.push(format!("{prefix}{key}: {}", toml_message(&e)));
            None
        }
    }
}

/// toml's message without its source excerpt.
fn toml_message(e: &toml::de::Error) -> String {
    e.message().trim().lines().next().unwrap_or("").to_string()
}
