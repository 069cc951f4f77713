//! What the benchmark measures: the workloads, grouped by the connections they share, and how long
//! and how often each is measured. One place for the list, so the run, the report and the JSON
//! agree on names and units.

use serde::{Deserialize, Serialize};

use crate::topology::Topology;

/// How one workload drives its connections (see `load::Session`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Shape {
    /// `size`-byte messages to the upstream, which counts and drops them. Unit: bytes.
    Sink { size: usize },
    /// Echo on the first `active` connections of the group. Unit: an echoed message.
    Echo { active: usize, size: usize },
    /// The upstream pushes one `size`-byte message to every connection of the group per round.
    /// Unit: a delivered message.
    Broadcast { size: usize },
    /// Connect, upgrade, one 16-byte echo, close; `clients` loops at the maximum. Unit: a handshake.
    /// Over TLS, `resume` has the client resume sessions (each measurement from an empty store);
    /// otherwise every TLS handshake is a full one.
    Handshakes {
        clients: usize,
        #[serde(default)]
        resume: bool,
    },
}

impl Shape {
    /// What one unit of this workload is, for the report ("msg", "byte", "handshake").
    pub fn unit(self) -> &'static str {
        match self {
            Shape::Sink { .. } => "byte",
            Shape::Echo { .. } | Shape::Broadcast { .. } => "msg",
            Shape::Handshakes { .. } => "handshake",
        }
    }

    pub fn has_latency(self) -> bool {
        !matches!(self, Shape::Sink { .. })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Workload {
    /// Short id, used in the JSON, `--only` and the plots' file names.
    pub id: String,
    /// One line for the report.
    pub title: String,
    pub shape: Shape,
    /// wss: the connections are TLS connections to each proxy's TLS listener (`tls`), with the
    /// same certificate and cipher suite for all; there is no `direct` contender (the upstream
    /// is plain ws).
    #[serde(default)]
    pub tls: bool,
}

/// Workloads that run on one set of open connections, one after another. A group of 0
/// connections is the handshake workload, which opens its own. A group's workloads are all plain
/// or all TLS.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Group {
    pub conns: usize,
    /// Measure the memory of the open, idle connections before the workloads run (`idle`).
    pub idle_memory: bool,
    pub workloads: Vec<Workload>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub quick: bool,
    pub topologies: Vec<Topology>,
    /// Measured runs per workload and contender (after one calibration run).
    pub runs: usize,
    /// Window of one maximum-rate measurement, seconds.
    pub max_secs: f64,
    /// Window of one fixed-load measurement, seconds.
    pub fixed_secs: f64,
    /// The fixed load is this fraction of the lowest maximum any contender reached in calibration.
    pub load_fraction: f64,
    /// Time the idle connections sit before their memory is read, seconds.
    pub idle_settle_secs: f64,
    pub groups: Vec<Group>,
    /// Set when RLIMIT_NOFILE (this value) capped the largest group below the plan.
    #[serde(default)]
    pub limited_by_nofile: Option<u64>,
    /// The configuration-scale measurement (`services-scale`), measured against wsproxy alone.
    #[serde(default)]
    pub scale: Option<ScalePlan>,
}

/// The id `--only` knows the configuration-scale measurement by.
pub const SCALE_ID: &str = "services-scale";

/// Configuration scale (see `scale`): a file of `services` services of `upstreams_per_service`
/// upstream entries each against a file of one such service, all on one listener, told apart by
/// host name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScalePlan {
    pub services: usize,
    pub upstreams_per_service: usize,
    /// `wsproxy check-config` runs per file.
    pub load_runs: usize,
    /// Window of one handshake measurement at the maximum, seconds (one per file and run).
    pub window_secs: f64,
    /// Handshake loops at the maximum, as in `handshakes`.
    pub clients: usize,
    /// Connections open through the proxy while it reloads.
    pub conns: usize,
    /// Each of them exchanges one message per this many milliseconds, before, during and after
    /// the reload.
    pub gap_ms: u64,
    /// Exchanges every connection must complete, each started after the reload was done.
    pub after_reload: u64,
}

fn w(id: &str, title: &str, shape: Shape) -> Workload {
    Workload {
        id: id.into(),
        title: title.into(),
        shape,
        tls: false,
    }
}

/// A TLS workload.
fn tls_w(id: &str, title: &str, shape: Shape) -> Workload {
    Workload {
        tls: true,
        ..w(id, title, shape)
    }
}

/// The prefix of the TLS workloads' ids.
pub const TLS_PREFIX: &str = "tls-";

impl Group {
    /// Whether the group's connections are TLS connections.
    pub fn tls(&self) -> bool {
        self.workloads.iter().any(|w| w.tls)
    }
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        let big = if quick { 1_000 } else { 10_000 };
        let groups = vec![
            Group {
                conns: 1,
                idle_memory: false,
                workloads: vec![
                    w(
                        "bulk",
                        "bulk: one connection, 64 KiB messages to the upstream",
                        Shape::Sink { size: 64 * 1024 },
                    ),
                    w(
                        "echo-1x128",
                        "echo: one connection, 128 B messages",
                        Shape::Echo { active: 1, size: 128 },
                    ),
                ],
            },
            Group {
                conns: 100,
                idle_memory: false,
                workloads: vec![
                    w(
                        "echo-100x16k",
                        "echo: 100 connections, 16 KiB messages",
                        Shape::Echo {
                            active: 100,
                            size: 16 * 1024,
                        },
                    ),
                    // Four in flight, not one: one 1 MiB message at a time leaves the generator's
                    // CPU idle between round trips, and a proxy on the other CPU then pipelines
                    // better than direct, which would no longer bound the measurement.
                    w(
                        "large",
                        "large messages: 4 connections, 1 MiB echoed",
                        Shape::Echo {
                            active: 4,
                            size: 1 << 20,
                        },
                    ),
                ],
            },
            Group {
                conns: 1_000,
                idle_memory: false,
                workloads: vec![
                    w(
                        "closed",
                        "many connections: 1,000 connections, 128 B messages",
                        Shape::Echo {
                            active: 1_000,
                            size: 128,
                        },
                    ),
                    w(
                        "broadcast-1k",
                        "broadcast: 64 B from the upstream to 1,000 connections",
                        Shape::Broadcast { size: 64 },
                    ),
                ],
            },
            Group {
                conns: big,
                idle_memory: true,
                workloads: vec![
                    w(
                        "mostly-idle",
                        &format!(
                            "mostly idle: {} connections open, 1 % of them echo 128 B",
                            crate::stats::fmt_int(big)
                        ),
                        Shape::Echo {
                            active: big / 100,
                            size: 128,
                        },
                    ),
                    w(
                        "broadcast-10k",
                        &format!(
                            "broadcast: 64 B from the upstream to {} connections",
                            crate::stats::fmt_int(big)
                        ),
                        Shape::Broadcast { size: 64 },
                    ),
                ],
            },
            Group {
                conns: 0,
                idle_memory: false,
                workloads: vec![w(
                    "handshakes",
                    "handshakes: connect, upgrade, one echo, close",
                    Shape::Handshakes {
                        clients: 50,
                        resume: false,
                    },
                )],
            },
            // wss, after the plain groups (the proxies' TLS listeners start once those are done):
            // the same shapes as `bulk`, `closed` and `handshakes`.
            Group {
                conns: 1,
                idle_memory: false,
                workloads: vec![tls_w(
                    "tls-bulk",
                    "wss bulk: one TLS connection, 64 KiB messages to the upstream",
                    Shape::Sink { size: 64 * 1024 },
                )],
            },
            Group {
                conns: 1_000,
                idle_memory: false,
                workloads: vec![tls_w(
                    "tls-closed",
                    "wss many connections: 1,000 TLS connections, 128 B messages",
                    Shape::Echo {
                        active: 1_000,
                        size: 128,
                    },
                )],
            },
            Group {
                conns: 0,
                idle_memory: false,
                workloads: vec![
                    tls_w(
                        "tls-handshakes",
                        "wss handshakes: connect, a full TLS handshake (no resumption), upgrade, one echo, close",
                        Shape::Handshakes {
                            clients: 50,
                            resume: false,
                        },
                    ),
                    tls_w(
                        "tls-resumed",
                        "wss handshakes resuming a session (TLS 1.3 ticket, PSK with ECDHE): connect, TLS, upgrade, one echo, close",
                        Shape::Handshakes {
                            clients: 50,
                            resume: true,
                        },
                    ),
                ],
            },
        ];
        Plan {
            quick,
            topologies: Topology::ALL.to_vec(),
            runs: if quick { 1 } else { 5 },
            max_secs: if quick { 0.3 } else { 0.5 },
            fixed_secs: if quick { 0.3 } else { 0.8 },
            load_fraction: 0.5,
            idle_settle_secs: if quick { 0.2 } else { 1.0 },
            groups,
            limited_by_nofile: None,
            scale: Some(ScalePlan {
                services: 1_000,
                upstreams_per_service: 10,
                load_runs: 5,
                window_secs: if quick { 0.5 } else { 2.0 },
                clients: 50,
                conns: 1_000,
                gap_ms: 100,
                after_reload: 3,
            }),
        }
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.groups.iter().flat_map(|g| g.workloads.iter())
    }

    /// Keeps only the named workloads (and groups that still have one, or measure idle memory and
    /// `idle` is named), and the configuration-scale measurement if it is named.
    pub fn keep(&mut self, only: &[String]) {
        if only.is_empty() {
            return;
        }
        if !only.iter().any(|o| o == SCALE_ID) {
            self.scale = None;
        }
        for g in &mut self.groups {
            g.workloads.retain(|w| only.contains(&w.id));
            g.idle_memory &= only.iter().any(|o| o == "idle");
        }
        self.groups.retain(|g| !g.workloads.is_empty() || g.idle_memory);
    }

    /// Every id `--only` accepts.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.workloads().map(|w| w.id.clone()).collect();
        ids.push("idle".into());
        ids.push(SCALE_ID.into());
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_keep_filters_groups() {
        let mut p = Plan::new(false);
        let ids = p.ids();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
        for kept in [
            "bulk",
            "echo-1x128",
            "closed",
            "handshakes",
            "idle",
            "broadcast-10k",
            "large",
            SCALE_ID,
            "tls-bulk",
            "tls-closed",
            "tls-handshakes",
            "tls-resumed",
        ] {
            assert!(ids.contains(&kept.to_owned()), "{kept}");
        }
        let mut scale_only = p.clone();
        p.keep(&["idle".into()]);
        assert_eq!(p.groups.len(), 1);
        assert!(p.groups[0].idle_memory && p.groups[0].workloads.is_empty());
        assert!(p.scale.is_none());
        for g in &Plan::new(false).groups {
            assert!(
                g.workloads.iter().all(|w| w.tls == g.tls()),
                "a group is all plain or all TLS"
            );
        }
        for w in Plan::new(false).workloads() {
            assert_eq!(w.tls, w.id.starts_with(TLS_PREFIX), "{}", w.id);
        }
        scale_only.keep(&[SCALE_ID.into()]);
        assert!(scale_only.groups.is_empty());
        assert_eq!(
            scale_only.scale.as_ref().map(|s| s.services * s.upstreams_per_service),
            Some(10_000)
        );
    }
}
