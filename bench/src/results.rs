//! The raw results of a run, as `latest.json` holds them, and the figures derived from them.
//!
//! Raw measurements are kept whole (every run of every contender) so that the report can be
//! redrawn and the figures recomputed (`wsproxy-bench report`) without running again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::load::Measure;
use crate::plan::Plan;
use crate::stats::Summary;
use crate::sys::{Machine, MemSample};
use crate::topology::Topology;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Versions {
    pub wsproxy: String,
    pub nginx: String,
    pub haproxy: String,
    pub caddy: String,
    pub rustc: String,
    /// The TLS library of each proxy, when TLS workloads ran.
    #[serde(default)]
    pub tls: String,
}

/// One measurement with the run it belongs to: runs are interleaved, so run `i` of every
/// contender was measured in the same stretch of time, and differences are taken run by run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunMeasure {
    pub run: usize,
    #[serde(flatten)]
    pub m: Measure,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkloadResult {
    pub id: String,
    /// Each contender's maximum in the calibration run, which sets the fixed load.
    pub calibration: BTreeMap<String, Measure>,
    /// The fixed load every contender was offered (units per second), and whose maximum set it.
    pub offered: f64,
    pub offered_set_by: String,
    pub max: BTreeMap<String, Vec<RunMeasure>>,
    pub fixed: BTreeMap<String, Vec<RunMeasure>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleMemory {
    pub run: usize,
    pub conns: usize,
    pub before: MemSample,
    pub after: MemSample,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopologyResult {
    pub topology: Topology,
    pub description: String,
    pub workloads: Vec<WorkloadResult>,
    pub idle: BTreeMap<String, Vec<IdleMemory>>,
    /// The configuration-scale measurement (`services-scale`), when it ran.
    #[serde(default)]
    pub scale: Option<ScaleResult>,
    /// What each contender's TLS listener negotiated at its start (the TLS workloads ran).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tls: BTreeMap<String, crate::tls::Negotiated>,
    pub secs: f64,
}

/// Configuration scale (see `scale`): one proxy of many services against one of a single
/// service, and a reload of the many under load.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScaleResult {
    /// The wsproxy contender whose relay mode the proxies ran in.
    pub contender: String,
    pub services: usize,
    pub upstreams_per_service: usize,
    /// `wsproxy check-config`: the file of one service, then the file of many.
    pub load: Vec<ConfigLoad>,
    /// Handshakes at the maximum through each, measured side by side, run by run.
    pub handshakes: Vec<ScaleHandshakes>,
    pub reloads: Vec<ReloadRun>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigLoad {
    pub services: usize,
    pub upstreams: usize,
    pub bytes: u64,
    /// Wall time of each run, from the start of the process to its exit, seconds.
    pub secs: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleHandshakes {
    pub run: usize,
    /// Through the proxy of one service (its host name on every request).
    pub one: Measure,
    /// Through the proxy of many (the host names in turn).
    pub many: Measure,
    /// Pairs measured for this run: a pair during which other processes used a share of the
    /// machine is measured again (`scale`); `disturbed` when the last one still was.
    #[serde(default)]
    pub attempts: usize,
    #[serde(default)]
    pub disturbed: bool,
}

/// One reload of the many-service file under load.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReloadRun {
    pub run: usize,
    /// Connections open through the proxy across the reload.
    pub conns: usize,
    /// From SIGHUP to the proxy's log line that the configuration was reloaded, seconds.
    pub reload_secs: f64,
    /// The log was read every this many seconds (the reload time's resolution).
    pub poll_secs: f64,
    /// Messages echoed and verified byte for byte, over all connections, and the fewest that any
    /// one connection completed after the reload (each started after it).
    pub exchanges: u64,
    pub min_after_reload: u64,
    /// Connections that failed (closed, reset, a wrong echo, no echo within 5 s) or did not
    /// complete their exchanges after the reload: must be 0.
    pub dropped: usize,
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    pub plan: Option<Plan>,
    pub started: String,
    pub machine: Machine,
    pub versions: Versions,
    pub contenders: Vec<String>,
    pub topologies: Vec<TopologyResult>,
    /// Measurements that failed, each naming topology, workload, contender and error.
    pub failures: Vec<String>,
    pub total_secs: f64,
    /// Derived from the raw results when the report is written; kept here for other tools.
    #[serde(default)]
    pub figures: Vec<Figure>,
}

impl TopologyResult {
    pub fn workload(&self, id: &str) -> Option<&WorkloadResult> {
        self.workloads.iter().find(|w| w.id == id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Better,
    Worse,
    /// The ranges overlap: no difference that the runs can tell.
    Even,
}

/// One derived figure (see `figures`): a metric of one contender on one workload in one topology,
/// summarised over the runs, with its ratios.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figure {
    pub topology: String,
    pub workload: String,
    pub metric: String,
    pub higher_is_better: bool,
    pub contender: String,
    #[serde(flatten)]
    pub summary: Summary,
    pub vs_direct: Option<f64>,
    /// The best proxy other than this one on this metric, and how this one compares with it.
    pub best_other: Option<String>,
    pub vs_best_other: Option<f64>,
    pub verdict_vs_best_other: Option<Verdict>,
}
