//! Figures derived from the raw runs: per topology, workload, metric and contender, the median and
//! range over the runs, the ratio to `direct` and to the best other proxy, and whether the
//! difference from that best other is a win, a loss or even (ranges overlap).
//!
//! "Added" figures are the proxy's cost over `direct` for the same work: run `i` of a contender
//! minus run `i` of direct (both measured in the same interleaved stretch), then summarised.

use std::collections::BTreeMap;

use crate::load::Measure;
use crate::plan::Shape;
use crate::results::{Figure, IdleMemory, Results, RunMeasure, ScaleHandshakes, Verdict};
use crate::stats::Summary;

pub const DIRECT: &str = "direct";

/// Metric names, as the JSON and the report use them.
pub mod metric {
    /// Machine CPU (every process of the benchmark plus the kernel) per unit at the fixed load, µs.
    pub const CPU_PER_UNIT: &str = "cpu_us_per_unit";
    /// The same less direct's, run by run: what the proxy adds.
    pub const ADDED_CPU_PER_UNIT: &str = "added_cpu_us_per_unit";
    /// Machine CPU seconds per GB (10^9 bytes) of payload at the fixed load.
    pub const CPU_PER_GB: &str = "cpu_s_per_gb";
    pub const ADDED_CPU_PER_GB: &str = "added_cpu_s_per_gb";
    /// Latency at the fixed load, µs.
    pub const P50: &str = "p50_us";
    pub const P99: &str = "p99_us";
    pub const P999: &str = "p999_us";
    /// Units per second achieved at the fixed load, and units lost (not completed by the drain's end).
    pub const FIXED_RATE: &str = "fixed_rate";
    pub const FIXED_LOST: &str = "fixed_lost";
    /// CPU per unit at the fixed load by where it ran, µs.
    pub const GENERATOR_CPU: &str = "generator_cpu_us_per_unit";
    pub const UPSTREAM_CPU: &str = "upstream_cpu_us_per_unit";
    pub const PROXY_CPU: &str = "proxy_cpu_us_per_unit";
    pub const KERNEL_CPU: &str = "kernel_cpu_us_per_unit";
    /// Maximum sustained rate, units per second (the secondary figure).
    pub const MAX_RATE: &str = "max_rate";
    /// TLS handshakes at the fixed load that resumed a session, as a share of those done.
    pub const TLS_RESUMED: &str = "tls_resumed_share";
    /// Idle connections: bytes per connection of the proxy's RSS, of kernel memory (slab, stacks,
    /// page tables) and of TCP buffer memory, all over the whole host; and the sum less direct's.
    pub const RSS_PER_CONN: &str = "rss_bytes_per_conn";
    pub const KERNEL_PER_CONN: &str = "kernel_bytes_per_conn";
    pub const TCP_PER_CONN: &str = "tcp_bytes_per_conn";
    pub const ADDED_MEM_PER_CONN: &str = "added_bytes_per_conn";
    /// Memory of the proxy's eBPF maps (bytes, whatever the connection count).
    pub const BPF_MAPS: &str = "bpf_map_bytes";
    /// `services-scale` (the contender is the wsproxy mode it ran in): the wall time of `wsproxy
    /// check-config` on the file of one service and on the file of many, seconds; handshakes per
    /// second at the maximum through a proxy of each, the proxy's CPU per handshake there (µs),
    /// and many over one run by run; the time of a reload under load (seconds) and the
    /// connections it dropped.
    pub const CHECK_CONFIG_ONE: &str = "check_config_secs_one_service";
    pub const CHECK_CONFIG_MANY: &str = "check_config_secs_many_services";
    pub const HANDSHAKES_ONE: &str = "handshake_rate_one_service";
    pub const HANDSHAKES_MANY: &str = "handshake_rate_many_services";
    pub const HANDSHAKE_CPU_ONE: &str = "proxy_cpu_us_per_handshake_one_service";
    pub const HANDSHAKE_CPU_MANY: &str = "proxy_cpu_us_per_handshake_many_services";
    pub const HANDSHAKES_RATIO: &str = "handshake_rate_many_over_one";
    pub const RELOAD_SECS: &str = "reload_secs_under_load";
    pub const RELOAD_DROPPED: &str = "reload_dropped_connections";
}

/// Compares two ranges: overlap is even, otherwise the side the metric prefers.
pub fn compare(a: &Summary, b: &Summary, higher_is_better: bool) -> Verdict {
    if a.min <= b.max && b.min <= a.max {
        Verdict::Even
    } else if (a.median > b.median) == higher_is_better {
        Verdict::Better
    } else {
        Verdict::Worse
    }
}

/// Values of one metric per contender, each tagged with its run.
type Series = BTreeMap<String, Vec<(usize, f64)>>;

fn series(runs: &BTreeMap<String, Vec<RunMeasure>>, f: impl Fn(&Measure) -> Option<f64>) -> Series {
    runs.iter()
        .map(|(c, rs)| {
            (
                c.clone(),
                rs.iter().filter_map(|r| f(&r.m).map(|v| (r.run, v))).collect(),
            )
        })
        .collect()
}

/// Each contender's values less direct's value of the same run (runs direct lacks are dropped).
fn added(s: &Series) -> Series {
    let Some(direct) = s.get(DIRECT) else {
        return Series::new();
    };
    let base: BTreeMap<usize, f64> = direct.iter().copied().collect();
    s.iter()
        .filter(|(c, _)| c.as_str() != DIRECT)
        .map(|(c, vs)| {
            (
                c.clone(),
                vs.iter()
                    .filter_map(|&(run, v)| base.get(&run).map(|b| (run, v - b)))
                    .collect(),
            )
        })
        .collect()
}

fn per_unit(secs: f64, m: &Measure) -> Option<f64> {
    (m.done > 0).then(|| secs * 1e6 / m.done as f64)
}

fn per_gb(m: &Measure) -> Option<f64> {
    (m.bytes > 0).then(|| m.cpu.ours() / (m.bytes as f64 / 1e9))
}

struct Builder<'a> {
    topology: &'a str,
    workload: &'a str,
    out: Vec<Figure>,
}

impl Builder<'_> {
    fn add(&mut self, metric: &str, higher_is_better: bool, s: &Series) {
        let summaries: BTreeMap<&String, Summary> = s
            .iter()
            .filter_map(|(c, vs)| Summary::of(&vs.iter().map(|v| v.1).collect::<Vec<_>>()).map(|x| (c, x)))
            .collect();
        let direct = summaries.get(&DIRECT.to_owned()).map(|d| d.median);
        let better = |a: f64, b: f64| if higher_is_better { a > b } else { a < b };
        for (c, sum) in &summaries {
            let best_other = summaries
                .iter()
                .filter(|(o, _)| *o != c && o.as_str() != DIRECT)
                .reduce(|a, b| if better(b.1.median, a.1.median) { b } else { a });
            self.out.push(Figure {
                topology: self.topology.into(),
                workload: self.workload.into(),
                metric: metric.into(),
                higher_is_better,
                contender: (*c).clone(),
                summary: *sum,
                vs_direct: crate::stats::ratio(sum.median, direct),
                best_other: best_other.map(|(o, _)| (*o).clone()),
                vs_best_other: best_other.and_then(|(_, b)| crate::stats::ratio(sum.median, Some(b.median))),
                verdict_vs_best_other: (c.as_str() != DIRECT)
                    .then_some(())
                    .and(best_other.map(|(_, b)| compare(sum, b, higher_is_better))),
            });
        }
    }
}

/// Every figure of a run.
pub fn derive(r: &Results) -> Vec<Figure> {
    let mut out = Vec::new();
    let Some(plan) = &r.plan else { return out };
    for t in &r.topologies {
        for w in &t.workloads {
            let Some(shape) = plan.workloads().find(|p| p.id == w.id).map(|p| p.shape) else {
                continue;
            };
            let mut b = Builder {
                topology: t.topology.name(),
                workload: &w.id,
                out: Vec::new(),
            };
            let cpu = series(&w.fixed, |m| per_unit(m.cpu.ours(), m));
            b.add(metric::CPU_PER_UNIT, false, &cpu);
            b.add(metric::ADDED_CPU_PER_UNIT, false, &added(&cpu));
            if !matches!(shape, Shape::Handshakes { .. }) {
                let gb = series(&w.fixed, per_gb);
                b.add(metric::CPU_PER_GB, false, &gb);
                b.add(metric::ADDED_CPU_PER_GB, false, &added(&gb));
            }
            if shape.has_latency() {
                b.add(
                    metric::P50,
                    false,
                    &series(&w.fixed, |m| m.latency.as_ref().map(|l| l.p50_us)),
                );
                b.add(
                    metric::P99,
                    false,
                    &series(&w.fixed, |m| m.latency.as_ref().map(|l| l.p99_us)),
                );
                b.add(
                    metric::P999,
                    false,
                    &series(&w.fixed, |m| m.latency.as_ref().map(|l| l.p999_us)),
                );
            }
            b.add(metric::FIXED_RATE, true, &series(&w.fixed, |m| Some(m.rate)));
            b.add(metric::FIXED_LOST, false, &series(&w.fixed, |m| Some(m.lost as f64)));
            b.add(
                metric::GENERATOR_CPU,
                false,
                &series(&w.fixed, |m| per_unit(m.cpu.generator_secs, m)),
            );
            b.add(
                metric::UPSTREAM_CPU,
                false,
                &series(&w.fixed, |m| per_unit(m.cpu.upstream_secs, m)),
            );
            b.add(
                metric::PROXY_CPU,
                false,
                &series(&w.fixed, |m| per_unit(m.cpu.proxy_secs, m)),
            );
            b.add(
                metric::KERNEL_CPU,
                false,
                &series(&w.fixed, |m| per_unit(m.cpu.kernel_secs, m)),
            );
            b.add(metric::MAX_RATE, true, &series(&w.max, |m| Some(m.rate)));
            if matches!(shape, Shape::Handshakes { resume: true, .. }) {
                b.add(
                    metric::TLS_RESUMED,
                    true,
                    &series(&w.fixed, |m| {
                        let t = m.tls.as_ref()?;
                        let n: u64 = t.negotiated.values().sum();
                        (n > 0).then(|| t.resumed as f64 / n as f64)
                    }),
                );
            }
            out.extend(b.out);
        }
        if !t.idle.is_empty() {
            let mut b = Builder {
                topology: t.topology.name(),
                workload: "idle",
                out: Vec::new(),
            };
            let idle = |f: &dyn Fn(&IdleMemory) -> f64| -> Series {
                t.idle
                    .iter()
                    .map(|(c, rs)| (c.clone(), rs.iter().map(|i| (i.run, f(i))).collect()))
                    .collect()
            };
            let per = |i: &IdleMemory, d: i64| d as f64 / i.conns.max(1) as f64;
            let rss = idle(&|i| per(i, i.after.proxy_rss as i64 - i.before.proxy_rss as i64));
            let kernel = idle(&|i| per(i, i.after.kernel as i64 - i.before.kernel as i64));
            let tcp = idle(&|i| per(i, i.after.tcp_mem as i64 - i.before.tcp_mem as i64));
            let total = idle(&|i| {
                per(
                    i,
                    (i.after.proxy_rss + i.after.kernel + i.after.tcp_mem) as i64
                        - (i.before.proxy_rss + i.before.kernel + i.before.tcp_mem) as i64,
                )
            });
            b.add(metric::RSS_PER_CONN, false, &rss);
            b.add(metric::KERNEL_PER_CONN, false, &kernel);
            b.add(metric::TCP_PER_CONN, false, &tcp);
            b.add(metric::ADDED_MEM_PER_CONN, false, &added(&total));
            b.add(metric::BPF_MAPS, false, &idle(&|i| i.after.bpf_maps as f64));
            out.extend(b.out);
        }
        if let Some(s) = &t.scale {
            let mut b = Builder {
                topology: t.topology.name(),
                workload: crate::plan::SCALE_ID,
                out: Vec::new(),
            };
            let of = |vs: Vec<(usize, f64)>| -> Series { BTreeMap::from([(s.contender.clone(), vs)]) };
            let load = |k: usize| {
                of(s.load
                    .get(k)
                    .map_or_else(Vec::new, |l| l.secs.iter().copied().enumerate().collect()))
            };
            let hs = |f: &dyn Fn(&ScaleHandshakes) -> Option<f64>| {
                of(s.handshakes.iter().filter_map(|h| f(h).map(|v| (h.run, v))).collect())
            };
            let cpu = |m: &Measure| per_unit(m.cpu.proxy_secs, m);
            b.add(metric::CHECK_CONFIG_ONE, false, &load(0));
            b.add(metric::CHECK_CONFIG_MANY, false, &load(1));
            b.add(metric::HANDSHAKES_ONE, true, &hs(&|h| Some(h.one.rate)));
            b.add(metric::HANDSHAKES_MANY, true, &hs(&|h| Some(h.many.rate)));
            b.add(metric::HANDSHAKE_CPU_ONE, false, &hs(&|h| cpu(&h.one)));
            b.add(metric::HANDSHAKE_CPU_MANY, false, &hs(&|h| cpu(&h.many)));
            b.add(
                metric::HANDSHAKES_RATIO,
                true,
                &hs(&|h| (h.one.rate > 0.0).then(|| h.many.rate / h.one.rate)),
            );
            b.add(
                metric::RELOAD_SECS,
                false,
                &of(s.reloads.iter().map(|r| (r.run, r.reload_secs)).collect()),
            );
            b.add(
                metric::RELOAD_DROPPED,
                false,
                &of(s.reloads.iter().map(|r| (r.run, r.dropped as f64)).collect()),
            );
            out.extend(b.out);
        }
    }
    out
}

/// Looks one figure up.
pub fn find<'a>(fs: &'a [Figure], topology: &str, workload: &str, metric: &str, contender: &str) -> Option<&'a Figure> {
    fs.iter()
        .find(|f| f.topology == topology && f.workload == workload && f.metric == metric && f.contender == contender)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(min: f64, median: f64, max: f64) -> Summary {
        Summary {
            median,
            min,
            max,
            runs: 5,
        }
    }

    #[test]
    fn overlapping_ranges_are_even_and_direction_decides_otherwise() {
        assert_eq!(compare(&s(1.0, 2.0, 3.0), &s(2.5, 4.0, 5.0), false), Verdict::Even);
        assert_eq!(compare(&s(1.0, 2.0, 2.4), &s(2.5, 4.0, 5.0), false), Verdict::Better);
        assert_eq!(compare(&s(1.0, 2.0, 2.4), &s(2.5, 4.0, 5.0), true), Verdict::Worse);
    }

    #[test]
    fn added_pairs_runs_and_drops_the_unpaired() {
        let mut s = Series::new();
        s.insert(DIRECT.into(), vec![(0, 10.0), (1, 12.0)]);
        s.insert("p".into(), vec![(0, 15.0), (1, 20.0), (2, 99.0)]);
        let a = added(&s);
        assert!(!a.contains_key(DIRECT));
        assert_eq!(a["p"], vec![(0, 5.0), (1, 8.0)]);
    }
}
