//! `[cluster]`: the limits a fleet of nodes shares through a Redis (or Valkey) server, so that a
//! client's handshake rate and open connections count once for the whole fleet instead of once
//! per node. Off while `url` is empty; a service sets its own in `[service.cluster]` (key by key
//! over the top-level table, like every section; `url = ""` turns it off for one service).
//!
//! The validated [`Cluster`] travels in [`super::Limits::cluster`]: the per-node limiter and the
//! cluster limiter are the two lines of one admission, and a reload reaches both together.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// What a node does with a handshake when the store did not answer within `cluster.timeout`
/// (or is known to be down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Admit it on the node's own limits alone (its lease is recorded once the store answers).
    #[default]
    Allow,
    /// Refuse it (429).
    Deny,
}

impl OnStoreError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnStoreError::Allow => "allow",
            OnStoreError::Deny => "deny",
        }
    }
}

/// `[cluster]`, validated; present only when `url` is set.
#[derive(Clone, PartialEq)]
pub struct Cluster {
    /// The store: `redis://[user:password@]host:port[/db]`, or `redis+unix:///path[?db=N]`.
    pub url: String,
    /// Every key the fleet writes begins with it (`PREFIX:{SERVICE:CLIENT}:rate` and `:leases`).
    pub key_prefix: String,
    /// Handshakes per second a client may make across the fleet (GCRA); 0: no shared rate.
    pub requests_per_second: f64,
    /// Handshakes a client may make at once across the fleet.
    pub burst: u32,
    /// Connections a client may hold open across the fleet; 0: no shared cap.
    pub max_connections_per_ip: u32,
    /// A node renews its leases every third of this; a node that died stops counting when its
    /// leases expire, at most this long after its last renewal.
    pub lease_ttl: Duration,
    /// The most a handshake waits for the store.
    pub timeout: Duration,
    pub on_store_error: OnStoreError,
}

impl Cluster {
    /// The store as logs and metrics show it: the URL without its password.
    pub fn store_name(&self) -> String {
        redacted(&self.url)
    }
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("url", &redacted(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("requests_per_second", &self.requests_per_second)
            .field("burst", &self.burst)
            .field("max_connections_per_ip", &self.max_connections_per_ip)
            .field("lease_ttl", &self.lease_ttl)
            .field("timeout", &self.timeout)
            .field("on_store_error", &self.on_store_error)
            .finish()
    }
}

/// `url` without the password of its user information, if any.
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{}", &rest[at + 1..])
        }
        None => url.to_string(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ClusterFile {
    url: String,
    key_prefix: String,
    requests_per_second: f64,
    burst: u32,
    max_connections_per_ip: u32,
    #[serde(with = "humantime_serde")]
    lease_ttl: Duration,
    #[serde(with = "humantime_serde")]
    timeout: Duration,
    on_store_error: OnStoreError,
}

/// The defaults: the per-node `[limits]` defaults, so that a fleet with `url` set and nothing
/// else behaves as one node would.
impl Default for ClusterFile {
    fn default() -> Self {
        Self {
            url: String::new(),
            key_prefix: "wsproxy".into(),
            requests_per_second: 20.0,
            burst: 40,
            max_connections_per_ip: 256,
            lease_ttl: Duration::from_secs(15),
            timeout: DEFAULT_TIMEOUT,
            on_store_error: OnStoreError::Allow,
        }
    }
}

/// The default deadline of a call to the store. Measured on loopback (Redis 7, this project's
/// 2-vCPU machines): the admission script's p99 is about 0.1 ms idle and stays under 1 ms with
/// the handshake benchmark saturating both CPUs, with rare spikes of a few ms; 5 ms leaves room
/// for a store one network hop away in the same site and bounds what a slow store adds to a
/// handshake. A store farther away needs a larger value.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(5);

const MAX_PREFIX: usize = 64;

impl ClusterFile {
    /// Every problem goes to `p`, named `cluster.FIELD`; `None` when off or invalid.
    pub(super) fn validate(self, p: &mut Vec<String>) -> Option<Cluster> {
        let problems = p.len();
        let url = self.url.trim().to_string();
        if !url.is_empty()
            && let Err(e) = redis::Client::open(url.as_str())
        {
            p.push(format!(
                "cluster.url: {:?} is not a store address such as \"redis://127.0.0.1:6379/\" ({e})",
                redacted(&url)
            ));
        }
        let prefix_ok = |s: &str| {
            (1..=MAX_PREFIX).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
        };
        if !prefix_ok(&self.key_prefix) {
            p.push(format!(
                "cluster.key_prefix: {:?} must be 1 to {MAX_PREFIX} printable characters without spaces, '{{' or '}}'",
                self.key_prefix
            ));
        }
        let rps = self.requests_per_second;
        if !(rps.is_finite() && rps >= 0.0) {
            p.push(format!(
                "cluster.requests_per_second: must be 0 (no shared rate) or above, got {rps}"
            ));
        }
        if rps > 0.0 && self.burst == 0 {
            p.push("cluster.burst: must be at least 1".into());
        }
        if !url.is_empty() && rps == 0.0 && self.max_connections_per_ip == 0 {
            p.push(
                "cluster: requests_per_second and max_connections_per_ip are both 0: nothing to share (leave url empty to turn the cluster limits off)"
                    .into(),
            );
        }
        if self.lease_ttl < Duration::from_secs(1) || self.lease_ttl > Duration::from_secs(3600) {
            p.push(format!("cluster.lease_ttl: must be 1s to 1h, got {:?}", self.lease_ttl));
        }
        if self.timeout < Duration::from_millis(1) || self.timeout > Duration::from_secs(1) {
            p.push(format!("cluster.timeout: must be 1ms to 1s, got {:?}", self.timeout));
        }
        if p.len() != problems || url.is_empty() {
            return None;
        }
        Some(Cluster {
            url,
            key_prefix: self.key_prefix,
            requests_per_second: rps,
            burst: self.burst,
            max_connections_per_ip: self.max_connections_per_ip,
            lease_ttl: self.lease_ttl,
            timeout: self.timeout,
            on_store_error: self.on_store_error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const MINIMAL: &str = "[upstreams]\nmain = [{ address = \"127.0.0.1:9001\" }]\n";

    fn cluster_of(text: &str) -> Option<Cluster> {
        let c = Config::parse(&format!("{MINIMAL}{text}"), "t").unwrap_or_else(|e| panic!("{e}"));
        c.services[0].limits.cluster.as_deref().cloned()
    }

    #[test]
    fn off_unless_a_url_is_set_and_defaults_follow_the_node_limits() {
        assert!(cluster_of("").is_none());
        assert!(cluster_of("[cluster]\nurl = \"\"\n").is_none());
        let c = cluster_of("[cluster]\nurl = \"redis://127.0.0.1:6390/\"\n").unwrap();
        assert_eq!(c.key_prefix, "wsproxy");
        assert_eq!(
            (c.requests_per_second, c.burst, c.max_connections_per_ip),
            (20.0, 40, 256)
        );
        assert_eq!(c.lease_ttl, Duration::from_secs(15));
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        assert_eq!(c.on_store_error, OnStoreError::Allow);
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let text = format!(
            "{MINIMAL}[cluster]\nurl = \"http://nowhere\"\nkey_prefix = \"a{{b}}\"\nrequests_per_second = -1.0\n\
             lease_ttl = \"10ms\"\ntimeout = \"2s\"\n"
        );
        let e = Config::parse(&text, "t").unwrap_err();
        let fields: Vec<&str> = e.problems.iter().map(|p| p.split(':').next().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "cluster.url",
                "cluster.key_prefix",
                "cluster.requests_per_second",
                "cluster.lease_ttl",
                "cluster.timeout"
            ],
            "{e}"
        );
        let e = Config::parse(
            &format!("{MINIMAL}[cluster]\nurl = \"redis://h/\"\nburst = 0\nmax_connections_per_ip = 0\non_store_error = \"maybe\"\n"),
            "t",
        )
        .unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert!(
            e.problems[0].starts_with("cluster: unknown variant `maybe`, expected `allow` or `deny`"),
            "{e}"
        );
        let e = Config::parse(
            &format!("{MINIMAL}[cluster]\nurl = \"redis://h/\"\nburst = 0\nmax_connections_per_ip = 0\nhost = \"x\"\n"),
            "t",
        )
        .unwrap_err();
        assert!(e.problems[0].starts_with("cluster: unknown field `host`"), "{e}");
        let e = Config::parse(
            &format!(
                "{MINIMAL}[cluster]\nurl = \"redis://h/\"\nrequests_per_second = 0.0\nmax_connections_per_ip = 0\n"
            ),
            "t",
        )
        .unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert!(
            e.problems[0].starts_with("cluster: requests_per_second and max_connections_per_ip are both 0"),
            "{e}"
        );
        let e = Config::parse(&format!("{MINIMAL}[cluster]\nurl = \"redis://h/\"\nburst = 0\n"), "t").unwrap_err();
        assert_eq!(e.problems, ["cluster.burst: must be at least 1"], "{e}");
    }

    #[test]
    fn a_service_overrides_the_default_key_by_key_and_may_turn_it_off() {
        let text = "[cluster]\nurl = \"redis://127.0.0.1:6390/\"\ntimeout = \"3ms\"\n\
            [[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:8080\"]\nhosts = [\"a.example\"]\n\
            [service.upstreams]\nmain = [{ address = \"127.0.0.1:9001\" }]\n[service.cluster]\non_store_error = \"deny\"\n\
            [[service]]\nname = \"b\"\nlisten = [\"127.0.0.1:8080\"]\nhosts = [\"b.example\"]\n\
            [service.upstreams]\nmain = [{ address = \"127.0.0.1:9001\" }]\n[service.cluster]\nurl = \"\"\n\
            [[service]]\nname = \"c\"\nlisten = [\"127.0.0.1:8080\"]\n\
            [service.upstreams]\nmain = [{ address = \"127.0.0.1:9001\" }]\n[service.cluster]\nburst = 0\n";
        let e = Config::parse(text, "t").unwrap_err();
        assert_eq!(e.problems, ["service \"c\": cluster.burst: must be at least 1"], "{e}");
        let c = Config::parse(&text.replace("burst = 0", "burst = 5"), "t").unwrap();
        let a = c.service("a").unwrap().limits.cluster.clone().unwrap();
        assert_eq!(
            (a.on_store_error, a.timeout),
            (OnStoreError::Deny, Duration::from_millis(3))
        );
        assert!(c.service("b").unwrap().limits.cluster.is_none());
        let cc = c.service("c").unwrap().limits.cluster.clone().unwrap();
        assert_eq!((cc.on_store_error, cc.burst), (OnStoreError::Allow, 5));
    }

    #[test]
    fn a_password_never_shows() {
        let c = cluster_of("[cluster]\nurl = \"redis://fleet:s3cret@127.0.0.1:6390/2\"\n").unwrap();
        assert_eq!(c.store_name(), "redis://fleet:***@127.0.0.1:6390/2");
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(redacted("redis://127.0.0.1:6390/"), "redis://127.0.0.1:6390/");
        assert_eq!(redacted("redis://:pw@h:1"), "redis://:***@h:1");
    }
}
