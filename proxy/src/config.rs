//! The configuration file: TOML structs as written by the operator, and the validated [`Config`]
//! the rest of the proxy uses.
//!
//! Every field has a default so that a short file works, unknown fields are refused (a typo must not
//! silently fall back to a default), and validation reports every bad value at once, each naming
//! its field, so that an operator fixes a file in one pass.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Cap on connections open at once (all clients together); accept waits while it is reached.
    pub max_connections: usize,
    /// At shutdown, time open connections get to finish before they are closed.
    pub drain_timeout: Duration,
    /// The PROXY protocol required of every connection (the listener is behind an L4 layer);
    /// `None`: off, the connection's own peer address is the client's.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Admin listener (metrics, health, reload); `None`: off.
    pub admin: Option<Admin>,
    pub keepalive: Keepalive,
    pub access: Access,
    pub limits: Limits,
    pub handshake: Handshake,
    pub headers: Headers,
    pub upstreams: Upstreams,
    pub relay: Relay,
}

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

/// Where the admin listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddress {
    Tcp(SocketAddr),
    /// `unix:PATH`: a Unix stream socket (mode 0600), removed when the listener stops.
    Unix(PathBuf),
}

impl fmt::Display for AdminAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminAddress::Tcp(a) => write!(f, "{a}"),
            AdminAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The admin listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub address: AdminAddress,
    /// A connection without a complete request for this long (from its accept, or from the
    /// previous answer on a kept-alive connection) is closed.
    pub idle_timeout: Duration,
    /// Admin connections open at once; past it a connection is answered 503 and closed.
    pub max_connections: usize,
    /// Where `token` was read from.
    pub token_file: Option<PathBuf>,
    /// When set, `POST /reload` needs `Authorization: Bearer <token>`.
    pub token: Option<Token>,
}

impl Admin {
    /// The defaults of every setting but the address.
    pub fn new(address: AdminAddress) -> Admin {
        let d = AdminFile::default();
        Admin {
            address,
            idle_timeout: d.idle_timeout,
            max_connections: d.max_connections,
            token_file: None,
            token: None,
        }
    }
}

/// A bearer token; its `Debug` form does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(token: impl Into<String>) -> Token {
        Token(token.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Largest token file read: a token is a line, and a path such as /dev/zero must not be read
/// to its end.
const MAX_TOKEN_FILE: u64 = 4096;
/// Longest `sun_path` of a Unix socket address, its terminating NUL excluded.
const MAX_UNIX_PATH: usize = 107;

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
#[derive(Debug, Clone, Deserialize)]
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
    /// `auto`: messages (frames, both directions; a read counts as at least one) a connection
    /// carries in userspace before it moves to the kernel relay; 0 moves it at once.
    pub promote_after_messages: u64,
    /// `auto`: a connection whose average message is larger (bulk) stays in userspace, where
    /// the kernel relay is no cheaper per byte.
    pub promote_max_average_message: u64,
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
    /// Socket buffer caps of the relayed sockets, in bytes (`SO_SNDBUF`, `SO_RCVBUF`; the kernel
    /// doubles the value for its bookkeeping and clamps it to `net.core.wmem_max`/`rmem_max`);
    /// `None`: the kernel autotunes the buffer.
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
            max_in_flight_bytes: 4 * 1024 * 1024,
            max_in_flight_skbs: 4096,
            drain_timeout: Duration::from_secs(10),
            idle_timeout: None,
            max_lifetime: None,
            max_lifetime_jitter: Duration::ZERO,
            send_timeout: Duration::from_secs(60),
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

// ---- the file as written ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    listen: ListenFile,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    handshake: Handshake,
    #[serde(default)]
    headers: Headers,
    upstreams: UpstreamsFile,
    #[serde(default)]
    relay: Relay,
    #[serde(default)]
    admin: AdminFile,
    #[serde(default)]
    keepalive: Keepalive,
    #[serde(default)]
    access: AccessFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AdminFile {
    address: Option<String>,
    #[serde(with = "humantime_serde")]
    idle_timeout: Duration,
    max_connections: usize,
    token_file: Option<PathBuf>,
}

impl Default for AdminFile {
    fn default() -> Self {
        Self {
            address: None,
            idle_timeout: Duration::from_secs(10),
            max_connections: 64,
            token_file: None,
        }
    }
}

impl AdminFile {
    /// The admin listener, or `None` when `address` is unset; every problem goes to `p`.
    fn validate(&self, p: &mut Vec<String>) -> Option<Admin> {
        let address = match self.address.as_deref().map(parse_admin_address) {
            None => None,
            Some(Ok(a)) => Some(a),
            Some(Err(e)) => {
                p.push(format!("admin.address: {e}"));
                None
            }
        };
        let problems = p.len();
        if self.idle_timeout < Duration::from_millis(100) || self.idle_timeout > Duration::from_secs(3600) {
            p.push(format!(
                "admin.idle_timeout: must be 100ms to 1h, got {:?}",
                self.idle_timeout
            ));
        }
        if !(1..=4096).contains(&self.max_connections) {
            p.push(format!(
                "admin.max_connections: must be 1 to 4096, got {}",
                self.max_connections
            ));
        }
        let token = match &self.token_file {
            None => None,
            Some(path) => match read_token(path) {
                Ok(t) => Some(t),
                Err(e) => {
                    p.push(format!("admin.token_file: {e}"));
                    None
                }
            },
        };
        if p.len() > problems {
            return None;
        }
        Some(Admin {
            address: address?,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections,
            token_file: self.token_file.clone(),
            token,
        })
    }
}

/// `"IP:PORT"` or `"unix:/absolute/path"`.
fn parse_admin_address(a: &str) -> Result<AdminAddress, String> {
    if let Some(path) = a.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(format!(
                "{a:?}: the socket path must be absolute, such as \"unix:/run/wsproxy/admin.sock\""
            ));
        }
        if path.as_os_str().len() > MAX_UNIX_PATH {
            return Err(format!("{a:?}: the socket path is longer than {MAX_UNIX_PATH} bytes"));
        }
        return Ok(AdminAddress::Unix(path));
    }
    a.parse::<SocketAddr>().map(AdminAddress::Tcp).map_err(|_| {
        format!("{a:?} is not an IP address and port such as \"127.0.0.1:9090\", nor \"unix:\" and a socket path")
    })
}

/// The token of a token file: its content without surrounding white space (a trailing newline).
fn read_token(path: &Path) -> Result<Token, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display();
    if !path.is_absolute() {
        return Err(format!("{shown}: must be an absolute path"));
    }
    // Non-blocking, so that a FIFO named by mistake is refused below rather than waited on.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(MAX_TOKEN_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if bytes.len() as u64 > MAX_TOKEN_FILE {
        return Err(format!("{shown} is longer than {MAX_TOKEN_FILE} bytes"));
    }
    let token = bytes.trim_ascii();
    if token.is_empty() {
        return Err(format!("{shown} is empty"));
    }
    // What a header value can carry as it is: visible ASCII, no white space.
    if !token.iter().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "the token in {shown} must be visible ASCII characters without spaces"
        ));
    }
    Ok(Token(String::from_utf8_lossy(token).into_owned()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ListenFile {
    address: String,
    max_connections: usize,
    #[serde(with = "humantime_serde")]
    drain_timeout: Duration,
    proxy_protocol: Option<ProxyProtocolFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxyProtocolFile {
    trusted: Vec<String>,
    #[serde(default = "default_proxy_header_timeout", with = "humantime_serde")]
    header_timeout: Duration,
}

fn default_proxy_header_timeout() -> Duration {
    Duration::from_secs(5)
}

impl ProxyProtocolFile {
    /// Every problem goes to `p`.
    fn validate(&self, p: &mut Vec<String>) -> Option<ProxyProtocol> {
        let problems = p.len();
        if self.trusted.is_empty() {
            p.push("listen.proxy_protocol.trusted: name the networks the PROXY protocol comes from, such as [\"10.0.0.0/8\"]".into());
        }
        let trusted = networks("listen.proxy_protocol.trusted", &self.trusted, p);
        if self.header_timeout.is_zero() || self.header_timeout > Duration::from_secs(60) {
            p.push(format!(
                "listen.proxy_protocol.header_timeout: must be above 0 and at most 60s, got {:?}",
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
            address: "127.0.0.1:8080".into(),
            max_connections: 50_000,
            drain_timeout: Duration::from_secs(30),
            proxy_protocol: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamsFile {
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
        let file: File = toml::from_str(text).map_err(|e| fail(vec![toml_problem(&e)]))?;
        file.validate().map_err(fail)
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

impl File {
    fn validate(self) -> Result<Config, Vec<String>> {
        let mut p = Vec::new();
        let listen = match self.listen.address.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                p.push(format!(
                    "listen.address: {:?} is not an IP address and port such as \"127.0.0.1:8080\"",
                    self.listen.address
                ));
                None
            }
        };
        if self.listen.max_connections == 0 {
            p.push("listen.max_connections: must be at least 1".into());
        }
        let proxy_protocol = self.listen.proxy_protocol.as_ref().and_then(|pp| pp.validate(&mut p));
        let trusted_proxies = networks("headers.trusted_proxies", &self.headers.trusted_proxies, &mut p);
        let access = self.access.validate(&mut p);
        let admin = self.admin.validate(&mut p);
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
        if u.main.is_empty() {
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

        match (listen, p.is_empty()) {
            (Some(listen), true) => Ok(Config {
                listen,
                max_connections: self.listen.max_connections,
                drain_timeout: self.listen.drain_timeout,
                proxy_protocol,
                admin,
                keepalive: self.keepalive,
                access,
                limits: self.limits,
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
                },
                relay: self.relay,
            }),
            _ => Err(p),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[upstreams]\nmain = [{ address = \"127.0.0.1:9001\" }]\n";

    #[test]
    fn minimal_file_gets_defaults() {
        let c = Config::parse(MINIMAL, "t").unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.handshake.max_head_bytes, 16384);
        assert_eq!(c.handshake.max_headers, 100);
        assert_eq!(c.handshake.header_timeout, Duration::from_secs(10));
        assert_eq!(c.upstreams.timeout, Duration::from_secs(5));
        assert_eq!(c.limits.ipv6_prefix, 64);
        assert_eq!(c.headers.underscore_headers, UnderscoreHeaders::Drop);
        assert_eq!(c.relay.mode, RelayMode::Auto);
        assert_eq!(c.relay.max_in_flight_bytes, 4 * 1024 * 1024);
        assert_eq!(c.relay.drain_timeout, Duration::from_secs(10));
        assert_eq!(c.relay.send_timeout, Duration::from_secs(60));
        assert_eq!(c.relay.client_sndbuf, None);
        assert_eq!(c.upstreams.main[0].weight, 1);
    }

    #[test]
    fn count_5xx_is_off_by_default_and_can_be_set() {
        assert!(!Config::parse(MINIMAL, "t").unwrap().upstreams.health.count_5xx);
        let on = format!("{MINIMAL}[upstreams.health]\ncount_5xx = true\n");
        assert!(Config::parse(&on, "t").unwrap().upstreams.health.count_5xx);
        let bad = format!("{MINIMAL}[upstreams.health]\ncount_5xx = \"yes\"\n");
        assert!(Config::parse(&bad, "t").is_err());
    }

    #[test]
    fn unknown_field_is_refused_by_name() {
        let e = Config::parse(&format!("{MINIMAL}[limits]\nrequests_per_secnd = 3\n"), "t").unwrap_err();
        assert!(e.to_string().contains("requests_per_secnd"), "{e}");
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let text = r#"
[listen]
address = "nowhere"
[limits]
burst = 0
ipv6_prefix = 129
[handshake]
max_headers = 2
header_timeout = "0s"
[headers]
add = [{ name = "Bad Name", value = "x" }]
[upstreams]
main = [{ address = "127.0.0.1:9001", weight = 0 }]
backup = [{ address = "127.0.0.1:9001" }]
"#;
        let e = Config::parse(text, "t").unwrap_err();
        let fields = [
            "listen.address",
            "limits.burst",
            "limits.ipv6_prefix",
            "handshake.max_headers",
            "handshake.header_timeout",
            "headers.add[0].name",
            "upstreams.main:",
            "upstreams.backup[0].address",
        ];
        for f in fields {
            assert!(e.problems.iter().any(|p| p.starts_with(f)), "no problem for {f}: {e}");
        }
        assert_eq!(e.problems.len(), fields.len(), "{e}");
    }

    #[test]
    fn relay_limits_are_checked_by_field() {
        let text = format!(
            "{MINIMAL}[relay]\nsend_timeout = \"500ms\"\nclient_sndbuf = 100\nupstream_rcvbuf = 4294967295\nclient_rcvbuf = 65536\n"
        );
        let e = Config::parse(&text, "t").unwrap_err();
        let fields = ["relay.send_timeout", "relay.client_sndbuf", "relay.upstream_rcvbuf"];
        for f in fields {
            assert!(e.problems.iter().any(|p| p.starts_with(f)), "no problem for {f}: {e}");
        }
        assert_eq!(e.problems.len(), fields.len(), "{e}");
        let c = Config::parse(&format!("{MINIMAL}[relay]\nsend_timeout = \"0s\"\n"), "t").unwrap();
        assert!(c.relay.send_timeout.is_zero());
    }

    /// A file in a fresh directory of the temp dir, with `text`.
    fn temp_file(name: &str, text: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wsproxy-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn admin_defaults() {
        let c = Config::parse(&format!("{MINIMAL}[admin]\naddress = \"127.0.0.1:9090\"\n"), "t").unwrap();
        let a = c.admin.unwrap();
        assert_eq!(a.address, AdminAddress::Tcp("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(a.idle_timeout, Duration::from_secs(10));
        assert_eq!(a.max_connections, 64);
        assert_eq!((&a.token_file, &a.token), (&None, &None));
        assert_eq!(a, Admin::new(a.address.clone()));
        // No address: no admin listener, whatever else is set.
        assert!(
            Config::parse(&format!("{MINIMAL}[admin]\nmax_connections = 8\n"), "t")
                .unwrap()
                .admin
                .is_none()
        );
    }

    #[test]
    fn admin_settings_and_a_unix_socket_address() {
        let token = temp_file("token-ok", b"  s3cr3t-t0ken\n");
        let text = format!(
            "{MINIMAL}[admin]\naddress = \"unix:/run/wsproxy/admin.sock\"\nidle_timeout = \"250ms\"\n\
             max_connections = 8\ntoken_file = {:?}\n",
            token.display().to_string()
        );
        let a = Config::parse(&text, "t").unwrap().admin.unwrap();
        assert_eq!(a.address, AdminAddress::Unix("/run/wsproxy/admin.sock".into()));
        assert_eq!(a.address.to_string(), "unix:/run/wsproxy/admin.sock");
        assert_eq!(a.idle_timeout, Duration::from_millis(250));
        assert_eq!(a.max_connections, 8);
        assert_eq!(a.token.as_ref().map(Token::as_str), Some("s3cr3t-t0ken"));
        assert_eq!(a.token_file, Some(token));
        // The token never shows in the configuration's Debug form.
        assert!(!format!("{a:?}").contains("s3cr3t"), "{a:?}");
    }

    #[test]
    fn bad_admin_values_are_each_reported_by_field() {
        let text = format!(
            "{MINIMAL}[admin]\naddress = \"unix:relative.sock\"\nidle_timeout = \"0s\"\nmax_connections = 0\n\
             token_file = \"/nonexistent/wsproxy-token\"\n"
        );
        let e = Config::parse(&text, "t").unwrap_err();
        let fields = [
            "admin.address",
            "admin.idle_timeout",
            "admin.max_connections",
            "admin.token_file",
        ];
        for f in fields {
            assert!(e.problems.iter().any(|p| p.starts_with(f)), "no problem for {f}: {e}");
        }
        assert_eq!(e.problems.len(), fields.len(), "{e}");
        let long = format!("unix:/{}", "x".repeat(MAX_UNIX_PATH));
        for (address, why) in [
            ("localhost:9090", "not an IP address"),
            ("9090", "not an IP address"),
            (long.as_str(), "longer than"),
        ] {
            let e = Config::parse(&format!("{MINIMAL}[admin]\naddress = {address:?}\n"), "t").unwrap_err();
            assert!(
                e.problems.len() == 1 && e.problems[0].starts_with("admin.address") && e.problems[0].contains(why),
                "{address}: {e}"
            );
        }
        for bad in ["idle_timeout = \"2h\"", "max_connections = 5000", "idle_timeout = 3"] {
            assert!(
                Config::parse(&format!("{MINIMAL}[admin]\n{bad}\n"), "t").is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_unusable_token_file_is_a_problem_of_admin_token_file() {
        let empty = temp_file("token-empty", b" \n\n");
        let spaces = temp_file("token-spaces", b"two words\n");
        let large = temp_file("token-large", &[b'a'; 5000]);
        let unreadable = temp_file("token-unreadable", b"t\n");
        std::fs::set_permissions(&unreadable, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
        let dir = empty.parent().unwrap().to_path_buf();
        let fifo = dir.join("token-fifo");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut cases = vec![
            (empty.display().to_string(), "is empty"),
            (spaces.display().to_string(), "without spaces"),
            (large.display().to_string(), "longer than"),
            (dir.display().to_string(), "not a regular file"),
            // Nobody writes to it: refused at once, not waited on.
            (fifo.display().to_string(), "not a regular file"),
            ("/dev/zero".to_string(), "not a regular file"),
            ("relative/token".to_string(), "absolute path"),
            ("/nonexistent/token".to_string(), "cannot read"),
        ];
        // Root reads any file whatever its mode.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            cases.push((unreadable.display().to_string(), "cannot read"));
        }
        for (path, why) in cases {
            let text = format!("{MINIMAL}[admin]\naddress = \"127.0.0.1:9090\"\ntoken_file = {path:?}\n");
            let e = Config::parse(&text, "t").unwrap_err();
            assert_eq!(e.problems.len(), 1, "{path}: {e}");
            assert!(
                e.problems[0].starts_with("admin.token_file") && e.problems[0].contains(why),
                "{path}: {e}"
            );
        }
    }

    #[test]
    fn shipped_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/wsproxy.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
    }

    /// The shipped file says it shows every option with its default value: every value it sets
    /// is the default a file without it gets, apart from the upstreams (required) and the admin
    /// address (off by default, on in the shipped file).
    #[test]
    fn shipped_config_sets_every_option_to_its_true_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/wsproxy.toml");
        let shipped = Config::load(&path).unwrap();
        let defaults = Config::parse(MINIMAL, "t").unwrap();
        let show = |c: &Config| {
            let admin = c
                .admin
                .as_ref()
                .map(|a| (a.idle_timeout, a.max_connections, a.token.is_some()));
            let u = &c.upstreams;
            [
                format!("listen {} {} {:?}", c.listen, c.max_connections, c.drain_timeout),
                format!("admin {admin:?}"),
                format!("{:?}", c.keepalive),
                format!("{:?}", c.access),
                format!("{:?}", c.limits),
                format!("{:?}", c.handshake),
                format!("{:?}", c.headers),
                format!(
                    "upstreams {:?} {:?} {} {} {:?} {:?}",
                    u.health, u.timeout, u.max_head_bytes, u.send_proxy_protocol, u.on_refusal, u.balance
                ),
                format!("{:?}", c.relay),
            ]
        };
        let default_admin = Config::parse(&format!("{MINIMAL}[admin]\naddress = \"127.0.0.1:9090\"\n"), "t").unwrap();
        let mut want = show(&defaults);
        want[1] = show(&default_admin)[1].clone();
        for (shipped, default) in show(&shipped).iter().zip(&want) {
            assert_eq!(
                shipped, default,
                "config/wsproxy.toml shows a value that is not the default"
            );
        }
    }

    #[test]
    fn proxy_protocol_networks_and_timeout_are_checked_all_at_once() {
        let ok =
            format!("[listen.proxy_protocol]\ntrusted = [\"10.0.0.0/8\", \"192.0.2.1\", \"2001:db8::/32\"]\n{MINIMAL}");
        let pp = Config::parse(&ok, "t").unwrap().proxy_protocol.unwrap();
        assert_eq!(pp.trusted.len(), 3);
        assert_eq!(pp.header_timeout, Duration::from_secs(5));
        assert!(Config::parse(MINIMAL, "t").unwrap().proxy_protocol.is_none());
        let bad = format!(
            "[listen.proxy_protocol]\ntrusted = [\"10.0.0.0/33\", \"nowhere\"]\nheader_timeout = \"0s\"\n{MINIMAL}"
        );
        let e = Config::parse(&bad, "t").unwrap_err();
        assert_eq!(e.problems.len(), 3, "{e}");
        assert!(
            e.problems.iter().all(|p| p.starts_with("listen.proxy_protocol.")),
            "{e}"
        );
        let headers = format!("[headers]\ntrusted_proxies = [\"10.1.2.3\", \"proxies\"]\n{MINIMAL}");
        let e = Config::parse(&headers, "t").unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert!(e.problems[0].starts_with("headers.trusted_proxies: \"proxies\""), "{e}");
        let access = format!(
            "[access]\nallow = [\"10.0.0.0/8\"]\ndeny = [\"x\"]\norigins = [\"https://a.example\", \"a.example\"]\n{MINIMAL}"
        );
        let e = Config::parse(&access, "t").unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        assert!(e.problems.iter().any(|p| p.starts_with("access.deny: \"x\"")), "{e}");
        assert!(
            e.problems
                .iter()
                .any(|p| p.starts_with("access.origins: \"a.example\"")),
            "{e}"
        );
        let empty = format!("[listen.proxy_protocol]\ntrusted = []\n{MINIMAL}");
        let e = Config::parse(&empty, "t").unwrap_err();
        assert!(
            e.problems[0].starts_with("listen.proxy_protocol.trusted: name the networks"),
            "{e}"
        );
    }

    #[test]
    fn missing_file_is_one_clear_problem() {
        let e = Config::load(Path::new("/nonexistent/wsproxy.toml")).unwrap_err();
        assert_eq!(e.problems.len(), 1);
        assert!(e.problems[0].starts_with("cannot read the file"), "{e}");
    }
}
