//! The sections a service is made of (`[limits]`, `[handshake]`, `[headers]`, `[upstreams]`,
//! `[relay]`, `[keepalive]`, `[access]`, `[tls]`, `[cluster]`): their types as validated, as written, and their
//! validation. The top level of the file holds their defaults; a `[[service]]` block overrides
//! them key by key (`services`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::cluster::{Cluster, ClusterFile};
use super::tls::{Tls, TlsFile, UpstreamTls, UpstreamTlsFile};
use super::{is_field_value, is_token, networks};

/// `[access]`: which clients and pages may open a WebSocket through the proxy; the rest get 403.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Client networks allowed; empty: every client (but the denied).
    pub allow: Vec<ipnet::IpNet>,
    /// Client networks refused, whatever `allow` says.
    pub deny: Vec<ipnet::IpNet>,
    /// `Origin` values allowed (compared case-insensitively); empty: any Origin, or none.
    pub origins: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AccessFile {
    allow: Vec<String>,
    deny: Vec<String>,
    origins: Vec<String>,
}

impl AccessFile {
    fn validate(self, p: &mut Vec<String>) -> Access {
        for o in &self.origins {
            // What a browser sends: a scheme, "://" and a host (with a port when not the
            // scheme's), nothing after it.
            let ok = o
                .split_once("://")
                .is_some_and(|(scheme, host)| !scheme.is_empty() && !host.is_empty() && !host.contains('/'));
            if !ok && o != "null" {
                p.push(format!(
                    "access.origins: {o:?} is not an origin such as \"https://chat.example.com\""
                ));
            }
        }
        Access {
            allow: networks("access.allow", &self.allow, p),
            deny: networks("access.deny", &self.deny, p),
            origins: self.origins,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Handshake requests admitted per second and client (token bucket refill rate).
    pub requests_per_second: f64,
    /// Requests a client may make in a burst (token bucket size).
    pub burst: u32,
    /// Connections a client may hold open at once (0: no limit).
    pub max_connections_per_ip: u32,
    /// IPv6 clients are keyed by this prefix length, since one host usually owns a whole /64.
    pub ipv6_prefix: u8,
    /// Upper bound of client entries kept in memory; idle entries are expired to stay under it.
    pub max_tracked_clients: usize,
    /// Connections all clients of one network may hold open at once (0: no limit): a network is
    /// an IPv4 prefix of `network_prefix_v4` bits or an IPv6 prefix of `network_prefix_v6` bits,
    /// so that one holder of many addresses cannot multiply the per-client cap.
    pub max_connections_per_network: u32,
    pub network_prefix_v4: u8,
    pub network_prefix_v6: u8,
    /// Connections all clients of a service may hold open at once (0: no cap of its own;
    /// `listen.max_connections` still bounds the process).
    pub max_connections: u32,
    /// The limits the service shares with the other nodes of its fleet (`[cluster]`, a section
    /// of its own in the file; `None`: this node's limits only). Carried with the node's limits:
    /// both are one admission, and a reload reconfigures them together.
    #[serde(skip)]
    pub cluster: Option<std::sync::Arc<Cluster>>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            requests_per_second: 20.0,
            burst: 40,
            max_connections_per_ip: 256,
            ipv6_prefix: 64,
            max_tracked_clients: 100_000,
            max_connections_per_network: 0,
            network_prefix_v4: 24,
            network_prefix_v6: 48,
            max_connections: 0,
            cluster: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Handshake {
    /// Largest request head accepted, in bytes (request line, headers and the blank line).
    pub max_head_bytes: usize,
    /// Most header fields accepted in a request.
    pub max_headers: usize,
    /// Time a client has to send its complete request head.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
}

impl Default for Handshake {
    fn default() -> Self {
        Self {
            max_head_bytes: 16 * 1024,
            max_headers: 100,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// What to do with request header fields whose name contains an underscore. They are dropped by
/// default because `X_Real_IP` and `X-Real-IP` may reach an application as the same variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnderscoreHeaders {
    Drop,
    Keep,
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Headers {
    pub underscore_headers: UnderscoreHeaders,
    /// Value of `X-Forwarded-Proto` (the scheme clients used to reach the proxy).
    pub forwarded_proto: String,
    /// Also add an RFC 7239 `Forwarded` field.
    pub forwarded: bool,
    /// Append the client to `X-Forwarded-For` (start it at the client when it may not be
    /// trusted); off: the proxy writes none.
    pub forwarded_for: bool,
    /// The field that carries the client's address (such as `X-Real-IP`, or the name an
    /// application already reads, e.g. `X-Qrator-IP-Source`).
    pub client_address_header: String,
    /// The field that carries the request id the proxy gives every handshake.
    pub request_id_header: String,
    /// Fields added to every forwarded request, replacing any the client sent with the same name.
    pub add: Vec<StaticHeader>,
    /// Clients (networks or addresses, as written) that are proxies themselves: their
    /// `X-Forwarded-For` and `Forwarded` chains are appended to and their `True-Client-IP` and
    /// `CF-Connecting-IP` kept. From any other client those fields are removed.
    pub trusted_proxies: Vec<String>,
    /// `trusted_proxies`, validated.
    #[serde(skip)]
    pub trusted: Vec<ipnet::IpNet>,
}

impl Default for Headers {
    fn default() -> Self {
        Self {
            underscore_headers: UnderscoreHeaders::Drop,
            forwarded_proto: "http".into(),
            forwarded: false,
            forwarded_for: true,
            client_address_header: "X-Real-IP".into(),
            request_id_header: "X-Request-ID".into(),
            add: Vec::new(),
            trusted_proxies: Vec::new(),
            trusted: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticHeader {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone)]
pub struct Upstreams {
    /// The candidates in effect: the addresses written, and those the names resolved to
    /// (`resolve`); in file order, names expanded in place.
    pub main: Vec<UpstreamServer>,
    pub backup: Vec<UpstreamServer>,
    /// The upstreams as written, which a name's resolution expands into `main` and `backup`.
    pub entries: Vec<UpstreamEntry>,
    /// How often upstream names are resolved again.
    pub resolve_interval: Duration,
    pub health: Health,
    /// Connect, send the request and receive the whole response head within this time.
    pub timeout: Duration,
    /// Largest upstream response head accepted, in bytes.
    pub max_head_bytes: usize,
    /// Begin every upstream connection with a PROXY protocol v2 header: the client's address,
    /// and the request id as a TLV (`PP2_TYPE_UNIQUE_ID`); active WebSocket probes send LOCAL.
    pub send_proxy_protocol: bool,
    /// What a client gets when its upstream answers anything but a valid 101.
    pub on_refusal: OnRefusal,
    /// How a client's first upstream is chosen (the rest follow as its failover order).
    pub balance: Balance,
    /// TLS to the upstreams; `None`: plain.
    pub tls: Option<UpstreamTls>,
}

impl Upstreams {
    /// The entries of one list that are addresses, as candidates.
    pub fn literal(entries: &[UpstreamEntry], backup: bool) -> Vec<UpstreamServer> {
        entries
            .iter()
            .filter(|e| e.backup == backup)
            .filter_map(|e| match e.target {
                Target::Address(address) => Some(UpstreamServer {
                    address,
                    weight: e.weight,
                    name: None,
                }),
                Target::Name { .. } => None,
            })
            .collect()
    }
}

/// `upstreams.balance` (see `balance`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// By a consistent hash of the client's address: the same upstream for a client on every
    /// node and after restarts.
    #[default]
    IpHash,
    /// In turn, in proportion to the weights.
    RoundRobin,
    /// The upstream with the fewest open connections (handshakes and relays) per unit of weight.
    LeastConnections,
}

impl Balance {
    /// As written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::IpHash => "ip-hash",
            Balance::RoundRobin => "round-robin",
            Balance::LeastConnections => "least-connections",
        }
    }
}

/// `upstreams.on_refusal`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRefusal {
    /// Both connections are closed; the client learns only that its connection closed.
    #[default]
    Drop,
    /// The upstream's status, fields and (short) body go to the client, then both close: a
    /// browser can tell a 403 from a network error.
    Forward,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamServer {
    pub address: SocketAddr,
    /// Share of clients relative to the others; 0 takes the server out of rotation.
    #[serde(default = "one")]
    pub weight: u32,
    /// The host name it was resolved from (the name TLS sends and verifies by default).
    #[serde(skip)]
    pub name: Option<String>,
}

/// One upstream as written: an address, or a host name and port whose every address becomes a
/// candidate of the entry's weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamEntry {
    pub backup: bool,
    pub target: Target,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Address(SocketAddr),
    Name { host: String, port: u16 },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Address(a) => write!(f, "{a}"),
            Target::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// An upstream entry of the file: `address` is "IP:PORT" or "NAME:PORT".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamEntryFile {
    address: String,
    #[serde(default = "one")]
    weight: u32,
}

/// "IP:PORT" or "NAME:PORT" (a DNS name: letters, digits, '-' and '.').
fn parse_target(a: &str) -> Result<Target, String> {
    if let Ok(addr) = a.parse::<SocketAddr>() {
        return Ok(Target::Address(addr));
    }
    let bad = || {
        format!("{a:?} is neither IP:PORT nor NAME:PORT, such as \"10.0.0.5:9001\" or \"chat-backend.internal:9001\"")
    };
    let (host, port) = a.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !name_ok || port == 0 {
        return Err(bad());
    }
    Ok(Target::Name {
        host: host.to_ascii_lowercase(),
        port,
    })
}

fn one() -> u32 {
    1
}

/// Passive and active upstream health checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    /// Consecutive failed handshakes (connect error, timeout, reset, invalid answer) that mark an
    /// upstream down.
    pub max_fails: u32,
    /// How long a down upstream is skipped before it is tried again.
    #[serde(with = "humantime_serde")]
    pub fail_timeout: Duration,
    /// Interval of active probes; `None`: no probes.
    #[serde(with = "humantime_serde::option")]
    pub probe_interval: Option<Duration>,
    pub probe: Probe,
    /// Whether a 5xx answer counts as a failed handshake. Off by default: a 5xx can be the
    /// application's answer to one request; 3xx and 4xx never count (any client can provoke them).
    pub count_5xx: bool,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            max_fails: 3,
            fail_timeout: Duration::from_secs(10),
            probe_interval: None,
            probe: Probe::Tcp,
            count_5xx: false,
        }
    }
}

/// What an active probe does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Probe {
    /// A TCP connect.
    Tcp,
    /// A full WebSocket handshake, checked like a client's.
    Websocket,
}

/// TCP keepalive on both sockets of every connection, so dead peers are noticed and freed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Keepalive {
    pub enabled: bool,
    /// Idle time before the first probe.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// Time between probes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub count: u32,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            enabled: true,
            idle: Duration::from_secs(60),
            interval: Duration::from_secs(10),
            count: 6,
        }
    }
}

/// Which relay carries the payload after the 101.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// Userspace first; a connection that shows message traffic moves to the kernel relay
    /// (when its programs loaded), at a point where no byte is in userspace's hands
    /// (`relay::promotion`).
    Auto,
    Kernel,
    Userspace,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Relay {
    pub mode: RelayMode,
    /// `auto`: messages (frames, both directions; of a stream that is not WebSocket, each read)
    /// a connection carries in userspace before it moves to the kernel relay; 0 moves it at once.
    pub promote_after_messages: u64,
    /// `auto`: a connection whose average message is larger (bulk) stays in userspace, where
    /// the kernel relay is no cheaper per byte.
    pub promote_max_average_message: u64,
    /// `auto`: the longest those messages may take (a message rate): a connection slower than
    /// that stays in userspace.
    #[serde(with = "humantime_serde")]
    pub promote_within: Duration,
    /// Kernel relay: bytes one direction may have redirected but not yet taken by the
    /// destination's TCP. Past it the sender is held back by its own TCP window.
    pub max_in_flight_bytes: u64,
    /// Kernel relay: the same bound in socket buffers (a sender of tiny segments would otherwise
    /// hold far more memory than its bytes).
    pub max_in_flight_skbs: u64,
    /// After one side closed, time the other side's TCP gets to take the remaining bytes before
    /// both are cut.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Close a relayed connection after this long without a byte either way; `None`: never
    /// (WebSockets are long-lived, and quiet ones are normal).
    #[serde(with = "humantime_serde::option")]
    pub idle_timeout: Option<Duration>,
    /// Cut a relayed connection this long after its 101 (plus up to `max_lifetime_jitter`);
    /// `None`: never.
    #[serde(with = "humantime_serde::option")]
    pub max_lifetime: Option<Duration>,
    /// Up to this much is added to each connection's `max_lifetime` (a share of it fixed by the
    /// request id), so that connections opened together do not end, and reconnect, together.
    #[serde(with = "humantime_serde")]
    pub max_lifetime_jitter: Duration,
    /// Cut a relayed connection once a peer has taken no byte for this long while bytes wait for
    /// it (a peer that stopped reading holds the proxy's socket memory); zero: never.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Kernel relay: a pair with nothing waiting in its sockets is parked (its task keeps only
    /// a small record until a FIN, an error, passed bytes, bytes waiting for a peer or a timer
    /// wakes it; the verdict relays meanwhile): at once when the relay takes it, and once it
    /// has run again, at the first look, one every `park_after`, that finds nothing waiting;
    /// zero: never.
    #[serde(with = "humantime_serde")]
    pub park_after: Duration,
    /// Socket buffer caps of the relayed sockets, in bytes (`SO_SNDBUF`, `SO_RCVBUF`; the kernel
    /// doubles the value for its bookkeeping and clamps it to `net.core.wmem_max`/`rmem_max`);
    /// `None`: the kernel autotunes the buffer, but for a send buffer the kernel relay
    /// redirects into, which gets the in-flight window (`relay::buffers::for_kernel_relay`).
    pub client_sndbuf: Option<u32>,
    pub client_rcvbuf: Option<u32>,
    pub upstream_sndbuf: Option<u32>,
    pub upstream_rcvbuf: Option<u32>,
}

impl Default for Relay {
    fn default() -> Self {
        Self {
            mode: RelayMode::Auto,
            promote_after_messages: 8,
            promote_max_average_message: 32 * 1024,
            promote_within: Duration::from_secs(1),
            max_in_flight_bytes: 4 * 1024 * 1024,
            max_in_flight_skbs: 4096,
            drain_timeout: Duration::from_secs(10),
            idle_timeout: None,
            max_lifetime: None,
            max_lifetime_jitter: Duration::ZERO,
            send_timeout: Duration::from_secs(60),
            park_after: Duration::from_millis(500),
            client_sndbuf: None,
            client_rcvbuf: None,
            upstream_sndbuf: None,
            upstream_rcvbuf: None,
        }
    }
}

/// Bounds of the relay's socket buffer caps: below a few KiB a socket holds less than one
/// segment; above 64 MiB a cap bounds nothing an operator would notice.
const MIN_SOCKET_BUFFER: u32 = 4096;
const MAX_SOCKET_BUFFER: u32 = 64 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpstreamsFile {
    #[serde(default)]
    main: Vec<UpstreamEntryFile>,
    #[serde(default)]
    backup: Vec<UpstreamEntryFile>,
    #[serde(default = "default_resolve_interval", with = "humantime_serde")]
    resolve_interval: Duration,
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    timeout: Duration,
    #[serde(default = "default_upstream_head")]
    max_head_bytes: usize,
    #[serde(default)]
    send_proxy_protocol: bool,
    #[serde(default)]
    on_refusal: OnRefusal,
    #[serde(default)]
    balance: Balance,
    #[serde(default)]
    health: Health,
    #[serde(default)]
    tls: UpstreamTlsFile,
}

impl Default for UpstreamsFile {
    fn default() -> Self {
        Self {
            main: Vec::new(),
            backup: Vec::new(),
            resolve_interval: default_resolve_interval(),
            timeout: default_upstream_timeout(),
            max_head_bytes: default_upstream_head(),
            send_proxy_protocol: false,
            on_refusal: OnRefusal::default(),
            balance: Balance::default(),
            health: Health::default(),
            tls: UpstreamTlsFile::default(),
        }
    }
}

fn default_resolve_interval() -> Duration {
    Duration::from_secs(30)
}

fn default_upstream_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_upstream_head() -> usize {
    16 * 1024
}

/// The sections of a service as written: the top level of the file, or the top level with a
/// `[[service]]` block's sections laid over it.
#[derive(Debug, Default)]
pub(super) struct SectionsFile {
    limits: Limits,
    handshake: Handshake,
    headers: Headers,
    upstreams: UpstreamsFile,
    relay: Relay,
    keepalive: Keepalive,
    access: AccessFile,
    tls: TlsFile,
    cluster: ClusterFile,
}

/// The names of the sections, the keys a `[[service]]` block may override.
pub(super) const SECTIONS: [&str; 9] = [
    "limits",
    "handshake",
    "headers",
    "upstreams",
    "relay",
    "keepalive",
    "access",
    "tls",
    "cluster",
];

/// Whether `key` names a section.
pub(super) fn is_section(key: &str) -> bool {
    SECTIONS.contains(&key)
}

/// A service's settings, validated.
#[derive(Debug, Clone)]
pub struct Sections {
    pub keepalive: Keepalive,
    pub access: Access,
    pub limits: Limits,
    pub handshake: Handshake,
    pub headers: Headers,
    pub upstreams: Upstreams,
    pub relay: Relay,
    /// TLS termination on the service's listeners; `None`: plain.
    pub tls: Option<Tls>,
}

impl SectionsFile {
    /// Every problem goes to `p`, named by its field. `need_upstreams`: false for the defaults
    /// of a file whose services name their own.
    pub(super) fn validate(self, p: &mut Vec<String>, need_upstreams: bool) -> Option<Sections> {
        let problems = p.len();
        let trusted_proxies = networks("headers.trusted_proxies", &self.headers.trusted_proxies, p);
        let access = self.access.validate(p);
        let tls = self.tls.validate(p);
        let upstream_tls = self.upstreams.tls.validate(p);
        let cluster = self.cluster.validate(p).map(std::sync::Arc::new);
        let k = &self.keepalive;
        if k.enabled && (k.idle.as_secs() < 1 || k.interval.as_secs() < 1 || k.count == 0) {
            p.push("keepalive: idle and interval must be at least 1s, count at least 1".into());
        }

        let l = &self.limits;
        if !(l.requests_per_second.is_finite() && l.requests_per_second > 0.0) {
            p.push(format!(
                "limits.requests_per_second: must be above 0, got {}",
                l.requests_per_second
            ));
        }
        if l.burst == 0 {
            p.push("limits.burst: must be at least 1".into());
        }
        if !(1..=32).contains(&l.network_prefix_v4) {
            p.push(format!(
                "limits.network_prefix_v4: must be 1 to 32, got {}",
                l.network_prefix_v4
            ));
        }
        if !(1..=128).contains(&l.network_prefix_v6) {
            p.push(format!(
                "limits.network_prefix_v6: must be 1 to 128, got {}",
                l.network_prefix_v6
            ));
        }
        if l.ipv6_prefix == 0 || l.ipv6_prefix > 128 {
            p.push(format!("limits.ipv6_prefix: must be 1 to 128, got {}", l.ipv6_prefix));
        }
        if l.max_tracked_clients == 0 {
            p.push("limits.max_tracked_clients: must be at least 1".into());
        }

        let h = &self.handshake;
        if h.max_head_bytes < 256 || h.max_head_bytes > 1024 * 1024 {
            p.push(format!(
                "handshake.max_head_bytes: must be 256 to 1048576, got {}",
                h.max_head_bytes
            ));
        }
        if h.max_headers < 8 || h.max_headers > 1000 {
            p.push(format!(
                "handshake.max_headers: must be 8 to 1000, got {}",
                h.max_headers
            ));
        }
        if h.header_timeout.is_zero() {
            p.push("handshake.header_timeout: must be above 0".into());
        }

        if !is_token(&self.headers.forwarded_proto) {
            p.push(format!(
                "headers.forwarded_proto: {:?} is not a valid value",
                self.headers.forwarded_proto
            ));
        }
        for (field, name) in [
            ("client_address_header", &self.headers.client_address_header),
            ("request_id_header", &self.headers.request_id_header),
        ] {
            if !is_token(name) {
                p.push(format!("headers.{field}: {name:?} is not a valid header name"));
            }
        }
        if self
            .headers
            .client_address_header
            .eq_ignore_ascii_case(&self.headers.request_id_header)
        {
            p.push("headers.request_id_header: the same field as client_address_header".into());
        }
        for (i, sh) in self.headers.add.iter().enumerate() {
            if !is_token(&sh.name) {
                p.push(format!(
                    "headers.add[{i}].name: {:?} is not a valid header name",
                    sh.name
                ));
            }
            if !is_field_value(&sh.value) {
                p.push(format!("headers.add[{i}].value: control characters are not allowed"));
            }
        }

        let u = &self.upstreams;
        if !need_upstreams {
        } else if u.main.is_empty() {
            p.push("upstreams.main: at least one upstream is needed".into());
        } else if u.main.iter().all(|s| s.weight == 0) {
            p.push("upstreams.main: every weight is 0, so no client could be served".into());
        }
        let mut seen = BTreeSet::new();
        let mut entries = Vec::new();
        for (list, servers) in [("main", &u.main), ("backup", &u.backup)] {
            for (i, s) in servers.iter().enumerate() {
                let target = match parse_target(&s.address) {
                    Ok(t) => t,
                    Err(e) => {
                        p.push(format!("upstreams.{list}[{i}].address: {e}"));
                        continue;
                    }
                };
                if !seen.insert(target.clone()) {
                    p.push(format!("upstreams.{list}[{i}].address: {target} is listed twice"));
                }
                if s.weight > 10_000 {
                    p.push(format!(
                        "upstreams.{list}[{i}].weight: must be 0 to 10000, got {}",
                        s.weight
                    ));
                }
                entries.push(UpstreamEntry {
                    backup: list == "backup",
                    target,
                    weight: s.weight,
                });
            }
        }
        if u.resolve_interval < Duration::from_secs(1) {
            p.push(format!(
                "upstreams.resolve_interval: must be at least 1s, got {:?}",
                u.resolve_interval
            ));
        }
        if u.timeout.is_zero() {
            p.push("upstreams.timeout: must be above 0".into());
        }
        if u.max_head_bytes < 256 || u.max_head_bytes > 1024 * 1024 {
            p.push(format!(
                "upstreams.max_head_bytes: must be 256 to 1048576, got {}",
                u.max_head_bytes
            ));
        }
        if u.health.max_fails == 0 {
            p.push("upstreams.health.max_fails: must be at least 1".into());
        }
        if u.health.probe_interval.is_some_and(|i| i < Duration::from_millis(100)) {
            p.push("upstreams.health.probe_interval: must be at least 100ms".into());
        }

        let r = &self.relay;
        if r.max_in_flight_bytes < 64 * 1024 || r.max_in_flight_bytes > 1 << 30 {
            p.push(format!(
                "relay.max_in_flight_bytes: must be 65536 to 1073741824, got {}",
                r.max_in_flight_bytes
            ));
        }
        if r.max_in_flight_skbs < 16 || r.max_in_flight_skbs > 1 << 20 {
            p.push(format!(
                "relay.max_in_flight_skbs: must be 16 to 1048576, got {}",
                r.max_in_flight_skbs
            ));
        }
        if !r.park_after.is_zero()
            && (r.park_after < Duration::from_millis(10) || r.park_after > Duration::from_secs(3600))
        {
            p.push(format!(
                "relay.park_after: must be 10ms to 1h (or \"0s\": never), got {:?}",
                r.park_after
            ));
        }
        if r.promote_within.is_zero() {
            p.push("relay.promote_within: must be more than 0s".into());
        }
        if r.promote_max_average_message == 0 {
            p.push("relay.promote_max_average_message: must be at least 1".into());
        }
        if r.max_lifetime.is_some_and(|t| t.is_zero()) {
            p.push("relay.max_lifetime: must be above 0 (leave it out for no limit)".into());
        }
        if r.drain_timeout.is_zero() {
            p.push("relay.drain_timeout: must be above 0".into());
        }
        if r.idle_timeout.is_some_and(|t| t < Duration::from_secs(1)) {
            p.push("relay.idle_timeout: must be at least 1s (or left out for none)".into());
        }
        if !r.send_timeout.is_zero() && r.send_timeout < Duration::from_secs(1) {
            p.push("relay.send_timeout: must be at least 1s (or \"0s\" for none)".into());
        }
        for (field, size) in [
            ("client_sndbuf", r.client_sndbuf),
            ("client_rcvbuf", r.client_rcvbuf),
            ("upstream_sndbuf", r.upstream_sndbuf),
            ("upstream_rcvbuf", r.upstream_rcvbuf),
        ] {
            if let Some(b) = size.filter(|b| !(MIN_SOCKET_BUFFER..=MAX_SOCKET_BUFFER).contains(b)) {
                p.push(format!(
                    "relay.{field}: must be {MIN_SOCKET_BUFFER} to {MAX_SOCKET_BUFFER} (or left out for the kernel's autotuning), got {b}"
                ));
            }
        }

        (p.len() == problems).then(|| Sections {
            keepalive: self.keepalive,
            access,
            limits: Limits { cluster, ..self.limits },
            handshake: self.handshake,
            headers: Headers {
                trusted: trusted_proxies,
                ..self.headers
            },
            upstreams: Upstreams {
                // Addresses only: names are resolved by the server (`resolve`).
                main: Upstreams::literal(&entries, false),
                backup: Upstreams::literal(&entries, true),
                entries,
                resolve_interval: self.upstreams.resolve_interval,
                timeout: self.upstreams.timeout,
                max_head_bytes: self.upstreams.max_head_bytes,
                send_proxy_protocol: self.upstreams.send_proxy_protocol,
                on_refusal: self.upstreams.on_refusal,
                balance: self.upstreams.balance,
                health: self.upstreams.health,
                tls: upstream_tls,
            },
            relay: self.relay,
            tls,
        })
    }
}

/// The sections of `table`, each read on its own so that a problem names its section; any key
/// that is not a section is a problem. `None` when anything could not be read.
pub(super) fn from_table(mut table: toml::Table, prefix: &str, p: &mut Vec<String>) -> Option<SectionsFile> {
    let problems = p.len();
    for key in table.keys().filter(|k| !is_section(k)) {
        p.push(format!(
            "{prefix}{key}: unknown key (sections are {})",
            SECTIONS.join(", ")
        ));
    }
    let t = &mut table;
    let file = SectionsFile {
        limits: super::take(t, "limits", prefix, p).unwrap_or_default(),
        handshake: super::take(t, "handshake", prefix, p).unwrap_or_default(),
        headers: super::take(t, "headers", prefix, p).unwrap_or_default(),
        upstreams: super::take(t, "upstreams", prefix, p).unwrap_or_default(),
        relay: super::take(t, "relay", prefix, p).unwrap_or_default(),
        keepalive: super::take(t, "keepalive", prefix, p).unwrap_or_default(),
        access: super::take(t, "access", prefix, p).unwrap_or_default(),
        tls: super::take(t, "tls", prefix, p).unwrap_or_default(),
        cluster: super::take(t, "cluster", prefix, p).unwrap_or_default(),
    };
    (p.len() == problems).then_some(file)
}
