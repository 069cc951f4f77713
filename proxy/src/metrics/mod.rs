//! Metrics: every name is a constant here, every metric is registered here, and the rest of the
//! proxy records through the methods of [`Metrics`]. Exported in the Prometheus text format by
//! the admin listener (see `admin`).

use std::net::SocketAddr;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::lock::lock;
use crate::outcome::{End, Fallback, Mode, Outcome};

mod series;
pub use series::Series;

// Counter names get the `_total` suffix from the encoder.
pub const CONNECTIONS_OPEN: &str = "wsproxy_connections_open";
pub const CONNECTIONS_ENDED: &str = "wsproxy_connections_ended";
pub const HANDSHAKES: &str = "wsproxy_handshakes";
pub const HANDSHAKE_DURATION: &str = "wsproxy_handshake_duration_seconds";
pub const UPSTREAM_ATTEMPTS: &str = "wsproxy_upstream_attempts";
pub const UPSTREAM_FAILURES: &str = "wsproxy_upstream_failures";
pub const UPSTREAM_UP: &str = "wsproxy_upstream_up";
pub const RELAYED_BYTES: &str = "wsproxy_relayed_bytes";
pub const RELAY_FALLBACKS: &str = "wsproxy_relay_fallbacks";
pub const RELAY_PROMOTIONS: &str = "wsproxy_relay_promotions";
pub const KERNEL_RELAY_AVAILABLE: &str = "wsproxy_kernel_relay_available";
pub const CONFIG_RELOADS: &str = "wsproxy_config_reloads";
pub const ADMIN_REFUSED: &str = "wsproxy_admin_refused";
pub const KERNEL_RELAY_REPEATED_BYTES: &str = "wsproxy_kernel_relay_repeated_bytes";
pub const KERNEL_RELAY_PASSED_BYTES: &str = "wsproxy_kernel_relay_passed_bytes";
pub const PROXY_PROTOCOL_REFUSED: &str = "wsproxy_proxy_protocol_refused";
pub const UPSTREAM_RESOLVE_FAILURES: &str = "wsproxy_upstream_resolve_failures";
pub const UPGRADES: &str = "wsproxy_upgrades";
pub const KERNEL_RELAY_MAP_ENTRIES: &str = "wsproxy_kernel_relay_map_entries";
pub const KERNEL_RELAY_PARKED: &str = "wsproxy_kernel_relay_parked";
pub const TLS_HANDSHAKE_FAILURES: &str = "wsproxy_tls_handshake_failures";
pub const TLS_CERTIFICATE_EXPIRY: &str = "wsproxy_tls_certificate_expiry_seconds";
pub const CLUSTER_STORE_SECONDS: &str = "wsproxy_cluster_store_seconds";
pub const CLUSTER_STORE_ERRORS: &str = "wsproxy_cluster_store_errors";
pub const CLUSTER_STORE_UP: &str = "wsproxy_cluster_store_up";
pub const CLUSTER_REFUSED: &str = "wsproxy_cluster_refused";
pub const CLUSTER_UNCHECKED: &str = "wsproxy_cluster_unchecked";
pub const CLUSTER_LEASES: &str = "wsproxy_cluster_leases";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RelayLabels {
    service: String,
    relay: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabels {
    service: String,
    relay: &'static str,
    end: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    service: String,
    outcome: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    service: String,
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabels {
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    service: String,
    upstream: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    service: String,
    relay: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceReasonLabels {
    service: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpReasonLabels {
    op: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    store: String,
}

/// A histogram family whose histograms all have the same buckets.
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn store_latency() -> Histogram {
    // 50 µs to about 1.6 s: a call on loopback takes some 100 µs; the deadline is a few ms.
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

/// Why the admin listener refused a request or closed a connection, as counted in
/// [`ADMIN_REFUSED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRefusal {
    /// 503: `admin.max_connections` connections were already open.
    OverCapacity,
    /// 403: the request had an `Origin` field (a browser's cross-site request).
    Origin,
    /// 421: the `Host` was not the admin listener's address (DNS rebinding).
    Host,
    /// 401: `POST /reload` without the right bearer token.
    Unauthorized,
    /// Closed: no complete request within `admin.idle_timeout`.
    IdleTimeout,
}

impl AdminRefusal {
    pub const ALL: [AdminRefusal; 5] = [
        AdminRefusal::OverCapacity,
        AdminRefusal::Origin,
        AdminRefusal::Host,
        AdminRefusal::Unauthorized,
        AdminRefusal::IdleTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AdminRefusal::OverCapacity => "over_capacity",
            AdminRefusal::Origin => "origin",
            AdminRefusal::Host => "host",
            AdminRefusal::Unauthorized => "unauthorized",
            AdminRefusal::IdleTimeout => "idle_timeout",
        }
    }
}

/// How a handshake ended, as counted in [`HANDSHAKES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeOutcome {
    /// 101 forwarded to the client.
    Upgraded,
    /// Refused by the proxy with this status (400, 403, 408, 426, 431).
    Refused(u16),
    /// 429: over the request rate.
    RateLimited,
    /// 429: over the per-client connection cap, or the client table is full.
    ConnectionLimited,
    /// 503: the service holds `limits.max_connections` connections.
    ServiceFull,
    /// 503: the cluster store cannot be asked and `on_store_error = "deny"`.
    StoreUnavailable,
    /// An upstream answered, but not with a valid 101: closed without an answer.
    UpstreamError,
    /// Every upstream timed out: 400.
    UpstreamTimeout,
    /// No upstream could be reached: 400.
    NoUpstream,
    /// The client left before the handshake completed.
    ClientGone,
}

impl HandshakeOutcome {
    fn labels(self, service: &str) -> HandshakeLabels {
        let (outcome, status) = match self {
            HandshakeOutcome::Upgraded => ("upgraded", 101),
            HandshakeOutcome::Refused(s) => ("refused", s),
            HandshakeOutcome::RateLimited => ("rate_limited", 429),
            HandshakeOutcome::ConnectionLimited => ("connection_limited", 429),
            HandshakeOutcome::ServiceFull => ("service_full", 503),
            HandshakeOutcome::StoreUnavailable => ("store_unavailable", 503),
            HandshakeOutcome::UpstreamError => ("upstream_error", 0),
            HandshakeOutcome::UpstreamTimeout => ("upstream_timeout", 400),
            HandshakeOutcome::NoUpstream => ("all_upstreams_down", 400),
            HandshakeOutcome::ClientGone => ("client_gone", 0),
        };
        HandshakeLabels {
            service: service.to_owned(),
            outcome,
            status,
        }
    }
}

/// Totals of the relays, read back from the metrics (tests and logs use it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TotalsSnapshot {
    /// Indexed by [`Mode`]: kernel, userspace.
    pub open: [u64; 2],
    pub ended: [u64; 2],
    pub client_to_upstream: [u64; 2],
    pub upstream_to_client: [u64; 2],
    /// Connections the kernel relay could not take, carried by the userspace relay instead.
    pub fallbacks: u64,
    /// Of those, the ones where a side had closed first (ordinary, not a fault).
    pub fallbacks_peer_closed: u64,
    /// Connections moved from the userspace relay to the kernel relay.
    pub promotions: u64,
    pub drain_timeouts: u64,
    /// Bytes the kernel handed the kernel relay a second time, cut before relaying.
    pub repeated_cut: u64,
    /// Bytes the kernel relay left to userspace, forwarded by it.
    pub passed: u64,
    /// Connections ended with [`End::StreamFault`].
    pub stream_faults: u64,
}

const MODES: [Mode; 2] = [Mode::Kernel, Mode::Userspace];
const ENDS: [End; 10] = [
    End::Closed,
    End::ClientError(std::io::ErrorKind::Other),
    End::UpstreamError(std::io::ErrorKind::Other),
    End::DrainTimeout,
    End::IdleTimeout,
    End::SendTimeout,
    End::Shutdown,
    End::MaxLifetime,
    End::Internal,
    End::StreamFault,
];

/// The proxy's metrics.
pub struct Metrics {
    registry: Registry,
    open: Family<RelayLabels, Gauge>,
    ended: Family<EndLabels, Counter>,
    handshakes: Family<HandshakeLabels, Counter>,
    handshake_duration: Histogram,
    upstream_attempts: Family<UpstreamLabels, Counter>,
    upstream_failures: Family<FailureLabels, Counter>,
    upstream_up: Family<UpstreamLabels, Gauge>,
    bytes: Family<BytesLabels, Counter>,
    fallbacks: Family<ReasonLabels, Counter>,
    promotions: Counter,
    kernel_relay: Gauge,
    repeated: Counter,
    passed: Counter,
    reloads: Family<ResultLabels, Counter>,
    admin_refused: Family<ReasonLabels, Counter>,
    proxy_protocol_refused: Family<ReasonLabels, Counter>,
    resolve_failures: Family<NameLabels, Counter>,
    tls_failures: Family<ServiceReasonLabels, Counter>,
    upgrades: Family<ResultLabels, Counter>,
    map_entries: Family<MapLabels, Gauge>,
    parked: Gauge,
    tls_expiry: Family<ServiceLabels, Gauge>,
    cluster: ClusterMetrics,
    /// Names whose last resolution failed (for logging state changes only).
    resolve_failing: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Every service that has had series, for [`Metrics::totals`].
    services: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            open: Family::default(),
            ended: Family::default(),
            handshakes: Family::default(),
            // 100 µs to about 6.5 s: handshakes are bounded by the upstream timeout.
            handshake_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            upstream_attempts: Family::default(),
            upstream_failures: Family::default(),
            upstream_up: Family::default(),
            bytes: Family::default(),
            fallbacks: Family::default(),
            promotions: Counter::default(),
            kernel_relay: Gauge::default(),
            repeated: Counter::default(),
            passed: Counter::default(),
            reloads: Family::default(),
            admin_refused: Family::default(),
            proxy_protocol_refused: Family::default(),
            resolve_failures: Family::default(),
            tls_failures: Family::default(),
            upgrades: Family::default(),
            map_entries: Family::default(),
            parked: Gauge::default(),
            tls_expiry: Family::default(),
            cluster: ClusterMetrics {
                seconds: Family::new_with_constructor(store_latency),
                errors: Family::default(),
                up: Family::default(),
                refused: Family::default(),
                unchecked: Family::default(),
                leases: Gauge::default(),
            },
            resolve_failing: Default::default(),
            services: Default::default(),
        };
        let r = &mut m.registry;
        r.register(
            CONNECTIONS_OPEN,
            "Relayed connections open, by service and relay",
            m.open.clone(),
        );
        r.register(
            CONNECTIONS_ENDED,
            "Relayed connections ended, by service, relay and how they ended",
            m.ended.clone(),
        );
        r.register(
            HANDSHAKES,
            "Handshakes by service (empty before one is known), outcome and status answered (0: closed without answer)",
            m.handshakes.clone(),
        );
        r.register(
            HANDSHAKE_DURATION,
            "Time from accept to the end of the handshake",
            m.handshake_duration.clone(),
        );
        r.register(
            UPSTREAM_ATTEMPTS,
            "Handshakes tried on each upstream, by service",
            m.upstream_attempts.clone(),
        );
        r.register(
            UPSTREAM_FAILURES,
            "Failed upstream handshakes, by service, upstream and reason",
            m.upstream_failures.clone(),
        );
        r.register(
            UPSTREAM_UP,
            "1 while an upstream of a service is considered healthy, 0 while marked down",
            m.upstream_up.clone(),
        );
        r.register(
            RELAYED_BYTES,
            "Payload bytes relayed, by service, relay and direction (counted when a connection ends)",
            m.bytes.clone(),
        );
        r.register(
            RELAY_FALLBACKS,
            "Connections the kernel relay could not take, relayed in userspace, by reason",
            m.fallbacks.clone(),
        );
        r.register(
            RELAY_PROMOTIONS,
            "Connections relay.mode = \"auto\" moved from the userspace relay to the kernel relay",
            m.promotions.clone(),
        );
        r.register(
            KERNEL_RELAY_AVAILABLE,
            "1 when the kernel relay is loaded",
            m.kernel_relay.clone(),
        );
        r.register(
            KERNEL_RELAY_REPEATED_BYTES,
            "Bytes the kernel handed the kernel relay a second time (a retransmitted head), cut before relaying",
            m.repeated.clone(),
        );
        r.register(
            KERNEL_RELAY_PASSED_BYTES,
            "Bytes the kernel relay left to userspace because a destination fell behind (forwarded by userspace)",
            m.passed.clone(),
        );
        r.register(CONFIG_RELOADS, "Configuration reloads, by result", m.reloads.clone());
        r.register(
            ADMIN_REFUSED,
            "Admin requests refused and admin connections closed, by reason",
            m.admin_refused.clone(),
        );
        r.register(
            UPSTREAM_RESOLVE_FAILURES,
            "Failed resolutions of upstream names (the last good addresses stay in use), by name",
            m.resolve_failures.clone(),
        );
        r.register(
            KERNEL_RELAY_MAP_ENTRIES,
            "Entries in the kernel relay's socket map and index, and its slots held, read at each scrape; all 0 when no pair is relayed in the kernel",
            m.map_entries.clone(),
        );
        r.register(
            KERNEL_RELAY_PARKED,
            "Kernel-relayed connections parked now (relay.park_after: no task runs them until a wake-up), read at each scrape",
            m.parked.clone(),
        );
        r.register(
            UPGRADES,
            "Binary upgrades this process started, by result (ok: a successor took over)",
            m.upgrades.clone(),
        );
        r.register(
            TLS_HANDSHAKE_FAILURES,
            "Failed TLS handshakes, by service (empty before one is known) and reason",
            m.tls_failures.clone(),
        );
        r.register(
            TLS_CERTIFICATE_EXPIRY,
            "Seconds until the notAfter of each service's certificate (negative: expired)",
            m.tls_expiry.clone(),
        );
        r.register(
            PROXY_PROTOCOL_REFUSED,
            "Connections closed before their first HTTP byte for their PROXY protocol header, by reason",
            m.proxy_protocol_refused.clone(),
        );
        let c = &m.cluster;
        r.register(
            CLUSTER_STORE_SECONDS,
            "Calls to the cluster limits' store (Redis), by operation (admit, renew, release, probe), answered or not",
            c.seconds.clone(),
        );
        r.register(
            CLUSTER_STORE_ERRORS,
            "Calls to the cluster store that failed, by operation and reason (timeout, connection, response; down: not tried while the store is marked down)",
            c.errors.clone(),
        );
        r.register(
            CLUSTER_STORE_UP,
            "1 while the cluster store answers, 0 while it is marked down (on_store_error decides meanwhile)",
            c.up.clone(),
        );
        r.register(
            CLUSTER_REFUSED,
            "Handshakes refused by the cluster limits, by service and reason (rate, connections, store_error)",
            c.refused.clone(),
        );
        r.register(
            CLUSTER_UNCHECKED,
            "Handshakes admitted without the store's answer (on_store_error = \"allow\"), by service",
            c.unchecked.clone(),
        );
        r.register(
            CLUSTER_LEASES,
            "Connection leases this node holds in the cluster store (its open connections under a cluster cap)",
            c.leases.clone(),
        );
        // Zero series exist from the start, so that rates and alerts work before the first event
        // (a service's from when it is configured: `service_added`).
        for result in ["ok", "error"] {
            let _ = m.reloads.get_or_create(&ResultLabels { result });
            let _ = m.upgrades.get_or_create(&ResultLabels { result });
        }
        for f in Fallback::ALL {
            let _ = m.fallbacks.get_or_create(&ReasonLabels { reason: f.as_str() });
        }
        for r in AdminRefusal::ALL {
            let _ = m.admin_refused.get_or_create(&ReasonLabels { reason: r.as_str() });
        }
        for r in crate::proxy_protocol::Refusal::ALL {
            let _ = m
                .proxy_protocol_refused
                .get_or_create(&ReasonLabels { reason: r.as_str() });
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// A service of the configuration, with these upstream addresses: its series exist from now
    /// on, and its connections count into them through the returned handles
    /// ([`Metrics::of_service`]).
    pub fn service_added(&self, service: &str, upstreams: &[SocketAddr]) -> Series {
        lock(&self.services).insert(service.to_owned());
        Series::new(self, service, upstreams)
    }

    /// Seconds until the notAfter of `service`'s certificate (a TLS service: its failure
    /// series exist from now on).
    pub fn certificate_expiry(&self, service: &str, seconds: i64) {
        for f in crate::tls::Failure::ALL {
            let _ = self.tls_failures.get_or_create(&ServiceReasonLabels {
                service: service.to_owned(),
                reason: f.as_str(),
            });
        }
        self.tls_expiry
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .set(seconds);
    }

    /// `service` has no certificate (any more).
    pub fn certificate_removed(&self, service: &str) {
        self.tls_expiry.remove(&ServiceLabels {
            service: service.to_owned(),
        });
    }

    /// The metrics of `service`'s connections; "" for a connection whose service is not known
    /// (yet): refused before its request named one.
    pub fn of<'a>(&'a self, service: &'a str) -> Scoped<'a> {
        Scoped {
            metrics: self,
            service,
            series: None,
        }
    }

    /// The metrics of a configured service's connections, counted through its kept series.
    pub fn of_service<'a>(&'a self, series: &'a Series) -> Scoped<'a> {
        Scoped {
            metrics: self,
            service: series.name(),
            series: Some(series),
        }
    }

    pub fn upstream_up(&self, service: &str, upstream: SocketAddr, up: bool) {
        self.upstream_up
            .get_or_create(&UpstreamLabels {
                service: service.to_owned(),
                upstream: upstream.to_string(),
            })
            .set(i64::from(up));
    }

    /// Forgets an upstream's health series (it left the service's configuration).
    pub fn upstream_removed(&self, service: &str, upstream: SocketAddr) {
        self.upstream_up.remove(&UpstreamLabels {
            service: service.to_owned(),
            upstream: upstream.to_string(),
        });
    }

    pub fn kernel_relay(&self, available: bool) {
        self.kernel_relay.set(i64::from(available));
    }

    pub fn kernel_map_entries(&self, [sockets, index, slots]: [usize; 3]) {
        for (map, n) in [("sockets", sockets), ("index", index), ("slots", slots)] {
            self.map_entries.get_or_create(&MapLabels { map }).set(n as i64);
        }
    }

    pub fn kernel_parked(&self, parked: usize) {
        self.parked.set(parked as i64);
    }

    pub fn upgrade(&self, ok: bool) {
        self.upgrades
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    pub fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    pub fn admin_refused(&self, r: AdminRefusal) {
        self.admin_refused
            .get_or_create(&ReasonLabels { reason: r.as_str() })
            .inc();
    }

    /// A resolution of upstream name `name` failed.
    pub fn resolve_failed(&self, name: &str) {
        self.resolve_failures
            .get_or_create(&NameLabels { name: name.to_owned() })
            .inc();
        lock(&self.resolve_failing).insert(name.to_owned());
    }

    /// A resolution of `name` succeeded (its failure series, once created, stays).
    pub fn resolve_ok(&self, name: &str) {
        lock(&self.resolve_failing).remove(name);
    }

    /// Whether the last resolution of `name` failed.
    pub fn resolve_failing(&self, name: &str) -> bool {
        lock(&self.resolve_failing).contains(name)
    }

    pub fn proxy_protocol_refused(&self, r: crate::proxy_protocol::Refusal) {
        self.proxy_protocol_refused
            .get_or_create(&ReasonLabels { reason: r.as_str() })
            .inc();
    }

    /// The cluster limits' metrics, for a store client to keep.
    pub(crate) fn cluster(&self) -> ClusterMetrics {
        self.cluster.clone()
    }

    /// The relay totals, read back from the metrics.
    pub fn totals(&self) -> TotalsSnapshot {
        let mut t = TotalsSnapshot {
            fallbacks: Fallback::ALL
                .iter()
                .map(|f| self.fallbacks.get_or_create(&ReasonLabels { reason: f.as_str() }).get())
                .sum(),
            fallbacks_peer_closed: self
                .fallbacks
                .get_or_create(&ReasonLabels {
                    reason: Fallback::PeerClosed.as_str(),
                })
                .get(),
            promotions: self.promotions.get(),
            repeated_cut: self.repeated.get(),
            passed: self.passed.get(),
            ..Default::default()
        };
        let services = lock(&self.services).clone();
        for service in services {
            for (i, mode) in MODES.into_iter().enumerate() {
                let relay = mode.as_str();
                let open = RelayLabels {
                    service: service.clone(),
                    relay,
                };
                t.open[i] += self.open.get_or_create(&open).get().max(0) as u64;
                let ended_as = |end: End| {
                    self.ended
                        .get_or_create(&EndLabels {
                            service: service.clone(),
                            relay,
                            end: end.as_str(),
                        })
                        .get()
                };
                t.ended[i] += ENDS.into_iter().map(ended_as).sum::<u64>();
                let bytes = |direction| {
                    self.bytes
                        .get_or_create(&BytesLabels {
                            service: service.clone(),
                            relay,
                            direction,
                        })
                        .get()
                };
                t.client_to_upstream[i] += bytes("client_to_upstream");
                t.upstream_to_client[i] += bytes("upstream_to_client");
                t.drain_timeouts += ended_as(End::DrainTimeout);
                t.stream_faults += ended_as(End::StreamFault);
            }
        }
        t
    }
}

/// The operations on the cluster store, as labelled in [`CLUSTER_STORE_SECONDS`].
pub const CLUSTER_OPS: [&str; 4] = ["admit", "renew", "release", "probe"];
/// Why a call to the cluster store failed, as labelled in [`CLUSTER_STORE_ERRORS`].
pub const CLUSTER_ERRORS: [&str; 4] = ["timeout", "connection", "response", "down"];
/// Why the cluster limits refused a handshake, as labelled in [`CLUSTER_REFUSED`].
pub const CLUSTER_REFUSALS: [&str; 3] = ["rate", "connections", "store_error"];

/// The cluster limits' metrics: handles on the series of one [`Metrics`], kept by the store
/// client (its background task records renewals and releases).
#[derive(Clone)]
pub(crate) struct ClusterMetrics {
    seconds: Histograms<OpLabels>,
    errors: Family<OpReasonLabels, Counter>,
    up: Family<StoreLabels, Gauge>,
    refused: Family<ServiceReasonLabels, Counter>,
    unchecked: Family<ServiceLabels, Counter>,
    leases: Gauge,
}

impl ClusterMetrics {
    /// A store client starts: its series, and its service's, exist from now on.
    pub fn store_added(&self, store: &str, service: &str) {
        for op in CLUSTER_OPS {
            let _ = self.seconds.get_or_create(&OpLabels { op });
            // Only admissions are counted as "down" (not tried); the task's calls wait for it.
            for reason in CLUSTER_ERRORS.into_iter().filter(|r| *r != "down" || op == "admit") {
                let _ = self.errors.get_or_create(&OpReasonLabels { op, reason });
            }
        }
        self.store_up(store, true);
        for reason in CLUSTER_REFUSALS {
            let _ = self.refused.get_or_create(&ServiceReasonLabels {
                service: service.to_owned(),
                reason,
            });
        }
        let _ = self.unchecked.get_or_create(&ServiceLabels {
            service: service.to_owned(),
        });
    }

    /// One call to the store, answered or not, and how long it took.
    pub fn call(&self, op: &'static str, seconds: f64) {
        self.seconds.get_or_create(&OpLabels { op }).observe(seconds);
    }

    pub fn error(&self, op: &'static str, reason: &'static str) {
        self.errors.get_or_create(&OpReasonLabels { op, reason }).inc();
    }

    pub fn store_up(&self, store: &str, up: bool) {
        self.up
            .get_or_create(&StoreLabels {
                store: store.to_owned(),
            })
            .set(i64::from(up));
    }

    pub fn refused(&self, service: &str, reason: &'static str) {
        self.refused
            .get_or_create(&ServiceReasonLabels {
                service: service.to_owned(),
                reason,
            })
            .inc();
    }

    pub fn unchecked(&self, service: &str) {
        self.unchecked
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    /// Leases taken (+1) or given back (-1) by this node.
    pub fn leases(&self, delta: i64) {
        self.leases.inc_by(delta);
    }
}

/// The metrics of one service's connections (see [`Metrics::of`]).
#[derive(Clone, Copy)]
pub struct Scoped<'a> {
    metrics: &'a Metrics,
    service: &'a str,
    /// The service's kept series; `None` for a connection whose service is not known.
    series: Option<&'a Series>,
}

impl Scoped<'_> {
    /// The service's name ("" when not known).
    pub fn service(&self) -> &str {
        self.service
    }

    pub fn handshake(&self, outcome: HandshakeOutcome, seconds: f64) {
        match self.series {
            Some(s) if outcome == HandshakeOutcome::Upgraded => {
                s.upgraded().inc();
            }
            _ => {
                self.metrics
                    .handshakes
                    .get_or_create(&outcome.labels(self.service))
                    .inc();
            }
        }
        self.metrics.handshake_duration.observe(seconds);
    }

    pub fn tls_failed(&self, failure: crate::tls::Failure) {
        self.metrics
            .tls_failures
            .get_or_create(&ServiceReasonLabels {
                service: self.service.to_owned(),
                reason: failure.as_str(),
            })
            .inc();
    }

    pub fn upstream_attempt(&self, upstream: SocketAddr) {
        self.with_series(|s| s.count_attempt(self.metrics, upstream));
    }

    pub fn upstream_failure(&self, upstream: SocketAddr, reason: &'static str) {
        self.metrics
            .upstream_failures
            .get_or_create(&FailureLabels {
                service: self.service.to_owned(),
                upstream: upstream.to_string(),
                reason,
            })
            .inc();
    }

    /// Runs `f` on the service's series: the kept ones, or for a scope made by name (tests; the
    /// proxy's only such scope, a connection whose service is not known, never relays) the same
    /// series looked up now.
    fn with_series(&self, f: impl FnOnce(&Series)) {
        match self.series {
            Some(s) => f(s),
            None => f(&Series::new(self.metrics, self.service, &[])),
        }
    }

    pub fn relay_started(&self, mode: Mode) {
        self.with_series(|s| {
            s.open(mode).inc();
        });
    }

    /// A connection the kernel relay was going to carry went to userspace instead.
    pub fn relay_fallback(&self, why: Fallback) {
        self.with_series(|s| {
            s.open(Mode::Kernel).dec();
        });
        self.metrics
            .fallbacks
            .get_or_create(&ReasonLabels { reason: why.as_str() })
            .inc();
    }

    /// A connection a relay let go of for a handover to a successor process (which counts it
    /// as started again).
    pub fn relay_moved(&self, mode: Mode) {
        self.with_series(|s| {
            s.open(mode).dec();
        });
    }

    /// A connection the userspace relay hands to the kernel relay (`relay.mode = "auto"`); the
    /// kernel relay then counts it as started.
    pub fn relay_promoted(&self) {
        self.with_series(|s| {
            s.open(Mode::Userspace).dec();
        });
        self.metrics.promotions.inc();
    }

    pub fn relay_ended(&self, o: &Outcome) {
        // The open count last: whoever reads zero open connections then finds every ended
        // connection's bytes counted (measured: a reader that saw the count fall first found one
        // direction's bytes missing).
        self.metrics.repeated.inc_by(o.repeated_cut);
        self.metrics.passed.inc_by(o.passed);
        self.with_series(|s| {
            for (c, n) in s.bytes(o.mode).iter().zip([o.client_to_upstream, o.upstream_to_client]) {
                c.inc_by(n);
            }
            s.ended(o.mode, o.end).inc();
            s.open(o.mode).dec();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn exposition_has_every_metric_from_the_start() {
        let m = Metrics::new();
        assert!(!m.encode().contains("wsproxy_connections_open{"), "no service yet");
        let _ = m.service_added("chat", &[]);
        let text = m.encode();
        for name in [
            CONNECTIONS_OPEN,
            CONNECTIONS_ENDED,
            RELAYED_BYTES,
            KERNEL_RELAY_AVAILABLE,
            CONFIG_RELOADS,
            ADMIN_REFUSED,
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing:\n{text}");
        }
        assert!(
            text.contains("wsproxy_connections_open{service=\"chat\",relay=\"kernel\"} 0"),
            "{text}"
        );
        for r in AdminRefusal::ALL {
            let series = format!("wsproxy_admin_refused_total{{reason=\"{}\"}} 0", r.as_str());
            assert!(text.contains(&series), "{series} missing:\n{text}");
        }
    }

    #[test]
    fn admin_refusals_by_reason() {
        let m = Metrics::new();
        m.admin_refused(AdminRefusal::Host);
        m.admin_refused(AdminRefusal::Host);
        m.admin_refused(AdminRefusal::OverCapacity);
        let text = m.encode();
        assert!(
            text.contains("wsproxy_admin_refused_total{reason=\"host\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("wsproxy_admin_refused_total{reason=\"over_capacity\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn relay_outcomes_add_up() {
        let metrics = Metrics::new();
        let _ = metrics.service_added("s", &[]);
        let m = metrics.of("s");
        m.relay_started(Mode::Kernel);
        m.relay_started(Mode::Kernel);
        m.relay_fallback(Fallback::Refused);
        m.relay_started(Mode::Userspace);
        assert_eq!(metrics.totals().open, [1, 1]);
        m.relay_started(Mode::Userspace);
        m.relay_promoted();
        assert_eq!(metrics.totals().open, [1, 1]);
        assert_eq!(metrics.totals().promotions, 1);
        let o = |mode, end| Outcome {
            mode,
            end,
            client_to_upstream: 10,
            upstream_to_client: 20,
            repeated_cut: 7,
            passed: 3,
            duration: Duration::ZERO,
        };
        m.relay_ended(&o(Mode::Kernel, End::DrainTimeout));
        m.relay_ended(&o(Mode::Userspace, End::Closed));
        let t = metrics.totals();
        assert_eq!(t.open, [0, 0]);
        assert_eq!(t.ended, [1, 1]);
        assert_eq!(t.client_to_upstream, [10, 10]);
        assert_eq!(t.upstream_to_client, [20, 20]);
        assert_eq!((t.fallbacks, t.drain_timeouts), (1, 1));
        let text = metrics.encode();
        assert!(
            text.contains(
                "wsproxy_relayed_bytes_total{service=\"s\",relay=\"kernel\",direction=\"upstream_to_client\"} 20"
            ),
            "{text}"
        );
        assert!(
            text.contains("wsproxy_relay_fallbacks_total{reason=\"refused\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("wsproxy_relay_fallbacks_total{reason=\"peer_closed\"} 0"),
            "{text}"
        );
        assert_eq!(t.repeated_cut, 14);
        assert!(text.contains("wsproxy_kernel_relay_repeated_bytes_total 14"), "{text}");
        assert_eq!(t.passed, 6);
        assert!(text.contains("wsproxy_kernel_relay_passed_bytes_total 6"), "{text}");
    }

    #[test]
    fn cluster_series_exist_once_a_store_starts() {
        let metrics = Metrics::new();
        assert!(metrics.encode().contains("wsproxy_cluster_leases 0"));
        let c = metrics.cluster();
        c.store_added("redis://127.0.0.1:6390/", "chat");
        c.call("admit", 0.0002);
        c.error("admit", "timeout");
        c.refused("chat", "rate");
        c.leases(2);
        c.leases(-1);
        let text = metrics.encode();
        for series in [
            "wsproxy_cluster_store_up{store=\"redis://127.0.0.1:6390/\"} 1",
            "wsproxy_cluster_store_errors_total{op=\"admit\",reason=\"timeout\"} 1",
            "wsproxy_cluster_store_errors_total{op=\"renew\",reason=\"timeout\"} 0",
            "wsproxy_cluster_store_errors_total{op=\"admit\",reason=\"down\"} 0",
            "wsproxy_cluster_refused_total{service=\"chat\",reason=\"rate\"} 1",
            "wsproxy_cluster_refused_total{service=\"chat\",reason=\"store_error\"} 0",
            "wsproxy_cluster_unchecked_total{service=\"chat\"} 0",
            "wsproxy_cluster_store_seconds_count{op=\"admit\"} 1",
            "wsproxy_cluster_leases 1",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
        assert!(!text.contains("9003"), "an upstream never tried has no series:\n{text}");
    }

    #[test]
    fn handshakes_by_outcome() {
        let metrics = Metrics::new();
        metrics.of("s").handshake(HandshakeOutcome::Upgraded, 0.001);
        metrics.of("s").handshake(HandshakeOutcome::Refused(431), 0.001);
        metrics.of("").handshake(HandshakeOutcome::Refused(421), 0.001);
        metrics.of("s").handshake(HandshakeOutcome::RateLimited, 0.0);
        let text = metrics.encode();
        assert!(
            text.contains("wsproxy_handshakes_total{service=\"s\",outcome=\"upgraded\",status=\"101\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("wsproxy_handshakes_total{service=\"s\",outcome=\"refused\",status=\"431\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("wsproxy_handshakes_total{service=\"s\",outcome=\"rate_limited\",status=\"429\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("wsproxy_handshakes_total{service=\"\",outcome=\"refused\",status=\"421\"} 1"),
            "{text}"
        );
        assert!(text.contains("wsproxy_handshake_duration_seconds_count 4"), "{text}");
    }

    #[test]
    fn kept_series_count_into_the_exported_ones() {
        let metrics = Metrics::new();
        let a: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let b: SocketAddr = "[::1]:9002".parse().unwrap();
        // Two installs of the same service (a reload): both count into the same series, and
        // into the ones counted without kept series.
        let never: SocketAddr = "127.0.0.1:9003".parse().unwrap();
        let first = metrics.service_added("s", &[a]);
        let second = metrics.service_added("s", &[a, b, never]);
        let (m1, m2, plain) = (metrics.of_service(&first), metrics.of_service(&second), metrics.of("s"));
        assert_eq!(m1.service(), "s");
        m1.relay_started(Mode::Kernel);
        m2.relay_started(Mode::Userspace);
        plain.relay_started(Mode::Userspace);
        assert_eq!(metrics.totals().open, [1, 2]);
        m2.relay_promoted();
        m1.relay_fallback(Fallback::Refused);
        assert_eq!(metrics.totals().open, [0, 1]);
        let o = Outcome {
            mode: Mode::Userspace,
            end: End::UpstreamError(std::io::ErrorKind::ConnectionReset),
            client_to_upstream: 5,
            upstream_to_client: 6,
            repeated_cut: 0,
            passed: 0,
            duration: Duration::ZERO,
        };
        m1.relay_ended(&o);
        plain.relay_ended(&o);
        let t = metrics.totals();
        assert_eq!(
            (t.open, t.ended, t.client_to_upstream, t.upstream_to_client),
            ([0, 0], [0, 2], [0, 10], [0, 12])
        );
        for m in [m1, m2, plain] {
            m.handshake(HandshakeOutcome::Upgraded, 0.001);
            m.upstream_attempt(a);
        }
        m1.upstream_attempt(b); // not in the first install's list: counted all the same
        m2.upstream_attempt(b);
        // Made again around other addresses (a reload): the attempts of `b` are kept.
        let third = second.for_upstreams(&[b]);
        metrics.of_service(&third).upstream_attempt(b);
        metrics.of_service(&third).handshake(HandshakeOutcome::Upgraded, 0.001);
        m2.handshake(HandshakeOutcome::NoUpstream, 0.001);
        let text = metrics.encode();
        for series in [
            "wsproxy_handshakes_total{service=\"s\",outcome=\"upgraded\",status=\"101\"} 4",
            "wsproxy_handshakes_total{service=\"s\",outcome=\"all_upstreams_down\",status=\"400\"} 1",
            "wsproxy_upstream_attempts_total{service=\"s\",upstream=\"127.0.0.1:9001\"} 3",
            "wsproxy_upstream_attempts_total{service=\"s\",upstream=\"[::1]:9002\"} 3",
            "wsproxy_connections_ended_total{service=\"s\",relay=\"userspace\",end=\"upstream error\"} 2",
            "wsproxy_relayed_bytes_total{service=\"s\",relay=\"userspace\",direction=\"upstream_to_client\"} 12",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
    }
}
