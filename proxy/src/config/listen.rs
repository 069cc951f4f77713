//! `[listen]`: the process-wide listener settings, and the PROXY protocol a listener requires.

use std::time::Duration;

use serde::Deserialize;

use super::networks;

/// `[listen.proxy_protocol]`: every connection must begin with a PROXY protocol header (v1 or
/// v2) from a trusted sender, whose source address is then the client's for limits, upstream
/// choice, headers and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocol {
    /// Networks the L4 layer's connections come from; any other peer is refused unread.
    pub trusted: Vec<ipnet::IpNet>,
    /// The whole header must arrive within this time.
    pub header_timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ListenFile {
    /// The listener of a file without `[[service]]` blocks (services name their own).
    pub address: Option<String>,
    pub max_connections: usize,
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub close_spread: Duration,
    /// The default of every service.
    pub proxy_protocol: Option<ProxyProtocolFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProxyProtocolFile {
    trusted: Vec<String>,
    #[serde(default = "default_proxy_header_timeout", with = "humantime_serde")]
    header_timeout: Duration,
}

fn default_proxy_header_timeout() -> Duration {
    Duration::from_secs(5)
}

impl ProxyProtocolFile {
    /// Every problem goes to `p`, named as fields of `field` (such as "listen.proxy_protocol").
    pub(super) fn validate(&self, field: &str, p: &mut Vec<String>) -> Option<ProxyProtocol> {
        let problems = p.len();
        if self.trusted.is_empty() {
            p.push(format!(
                "{field}.trusted: name the networks the PROXY protocol comes from, such as [\"10.0.0.0/8\"]"
            ));
        }
        let trusted = networks(&format!("{field}.trusted"), &self.trusted, p);
        if self.header_timeout.is_zero() || self.header_timeout > Duration::from_secs(60) {
            p.push(format!(
                "{field}.header_timeout: must be above 0 and at most 60s, got {:?}",
                self.header_timeout
            ));
        }
        (p.len() == problems).then_some(ProxyProtocol {
            trusted,
            header_timeout: self.header_timeout,
        })
    }
}

impl Default for ListenFile {
    fn default() -> Self {
        Self {
            address: None,
            max_connections: 50_000,
            drain_timeout: Duration::from_secs(30),
            close_spread: Duration::ZERO,
            proxy_protocol: None,
        }
    }
}
