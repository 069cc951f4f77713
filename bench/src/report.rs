//! `latest.md` and the PNG plots, from the raw results.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::Result;

use crate::plot::{self, Bar, Panel};
use crate::run::{EchoCell, Results};
use crate::stats::{Summary, fmt_int, fmt_num, fmt_ratio, fmt_summary, ratio};

pub const KERNEL: &str = "wsproxy-kernel";
pub const DIRECT: &str = "direct";
pub const NGINX: &str = "nginx";
pub const RIVALS: [&str; 3] = ["nginx", "haproxy", "haproxy-splice"];

/// One metric of one table: a summary per contender.
#[derive(Debug, Clone)]
pub struct Metric {
    pub unit: String,
    pub higher_is_better: bool,
    pub by: BTreeMap<String, Summary>,
}

impl Metric {
    fn new<T>(unit: &str, higher: bool, runs: &BTreeMap<String, Vec<T>>, f: impl Fn(&T) -> f64) -> Metric {
        let by = runs
            .iter()
            .filter_map(|(c, rs)| Summary::of(&rs.iter().map(&f).collect::<Vec<_>>()).map(|s| (c.clone(), s)))
            .collect();
        Metric {
            unit: unit.into(),
            higher_is_better: higher,
            by,
        }
    }

    fn median(&self, c: &str) -> Option<f64> {
        self.by.get(c).map(|s| s.median)
    }

    fn cell(&self, c: &str) -> String {
        self.by.get(c).map_or_else(|| "–".into(), fmt_summary)
    }

    fn vs(&self, c: &str, base: &str) -> String {
        match self.median(c) {
            Some(v) => fmt_ratio(ratio(v, self.median(base))),
            None => "–".into(),
        }
    }

    fn panel(&self, title: &str, contenders: &[String]) -> Panel {
        Panel {
            title: title.into(),
            unit: self.unit.clone(),
            higher_is_better: self.higher_is_better,
            bars: contenders
                .iter()
                .map(|c| {
                    let s = self.by.get(c);
                    Bar {
                        label: c.clone(),
                        median: s.map_or(f64::NAN, |s| s.median),
                        min: s.map_or(f64::NAN, |s| s.min),
                        max: s.map_or(f64::NAN, |s| s.max),
                        highlight: c == KERNEL,
                    }
                })
                .collect(),
        }
    }

    /// How wsproxy-kernel compares with the best rival on this metric, in one sentence; `None`
    /// when either side has no result.
    pub fn verdict(&self, what: &str) -> Option<(bool, String)> {
        let k = self.by.get(KERNEL)?;
        let better = |a: f64, b: f64| if self.higher_is_better { a > b } else { a < b };
        let rivals: Vec<(&str, &Summary)> = RIVALS.iter().filter_map(|r| self.by.get(*r).map(|s| (*r, s))).collect();
        if rivals.is_empty() {
            return None;
        }
        let (best_name, best) = rivals
            .iter()
            .copied()
            .reduce(|a, b| if better(b.1.median, a.1.median) { b } else { a })?;
        let ahead = better(k.median, best.median);
        let overlap = k.min <= best.max && best.min <= k.max;
        let pct = (k.median / best.median - 1.0) * 100.0;
        let noise = if overlap { " (the min–max ranges overlap)" } else { "" };
        let text = if ahead {
            format!(
                "{what}: **ahead** of every rival ({} {} vs best rival {best_name} {}; {pct:+.0} %){noise}",
                fmt_num(k.median),
                self.unit,
                fmt_num(best.median)
            )
        } else {
            format!(
                "{what}: **behind** {best_name} ({} {} vs {}; {pct:+.0} %){noise}",
                fmt_num(k.median),
                self.unit,
                fmt_num(best.median)
            )
        };
        Some((ahead, text))
    }
}

fn echo_metrics(cell: &EchoCell) -> [Metric; 5] {
    [
        Metric::new("µs", false, &cell.runs, |r| r.p50_us),
        Metric::new("µs", false, &cell.runs, |r| r.p99_us),
        Metric::new("µs", false, &cell.runs, |r| r.p999_us),
        Metric::new("µs", false, &cell.runs, |r| r.cpu_us_per_msg),
        Metric::new("msg/s", true, &cell.runs, |r| r.rate),
    ]
}

/// "CPU 0 / CPU 1" busy percentages (medians of the runs) of echo-like results.
fn cpu_split(runs: Option<&Vec<crate::load::EchoResult>>) -> String {
    let busy = |i: usize| {
        Summary::of(&runs.map_or(vec![], |rs| {
            rs.iter()
                .map(|e| e.cpu.per_cpu_busy.get(i).copied().unwrap_or(f64::NAN) * 100.0)
                .collect::<Vec<_>>()
        }))
        .map(|s| s.median)
    };
    match (busy(0), busy(1)) {
        (Some(a), Some(b)) => format!("{a:.0} % / {b:.0} %"),
        _ => "–".into(),
    }
}

/// Every measurement window's CPU accounting.
fn all_cpu(r: &Results) -> Vec<&crate::sys::CpuDelta> {
    let mut v: Vec<&crate::sys::CpuDelta> = r.bulk.values().flatten().map(|b| &b.cpu).collect();
    v.extend(r.echo.iter().flat_map(|c| c.runs.values().flatten()).map(|e| &e.cpu));
    v.extend(r.closed.values().flatten().map(|e| &e.cpu));
    v.extend(r.handshakes.values().flatten().map(|h| &h.cpu));
    v
}

fn size_name(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn added(m: &Metric, c: &str) -> String {
    match (m.median(c), m.median(DIRECT)) {
        (Some(v), Some(d)) if c != DIRECT => {
            let diff = v - d;
            if diff >= 0.0 {
                format!("+{}", fmt_num(diff))
            } else {
                fmt_num(diff)
            }
        }
        _ => "–".into(),
    }
}

fn table(out: &mut String, header: &[&str], rows: Vec<Vec<String>>) {
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(header.len()));
    for r in rows {
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
    out.push('\n');
}

pub struct Tables {
    pub bulk_mbs: Metric,
    pub bulk_cpu: Metric,
    pub closed_rate: Metric,
    pub closed_cpu: Metric,
    pub hs_rate: Metric,
    pub hs_cpu: Metric,
    pub idle_bytes: Metric,
}

pub fn tables(r: &Results) -> Tables {
    let idle_conns = r.plan.as_ref().map_or(1, |p| p.idle_conns).max(1) as f64;
    Tables {
        bulk_mbs: Metric::new("MB/s", true, &r.bulk, |b| b.mb_per_s),
        bulk_cpu: Metric::new("CPU s/GB", false, &r.bulk, |b| b.cpu.ours() / (b.bytes as f64 / 1e9)),
        closed_rate: Metric::new("msg/s", true, &r.closed, |e| e.rate),
        closed_cpu: Metric::new("µs", false, &r.closed, |e| e.cpu_us_per_msg),
        hs_rate: Metric::new("1/s", true, &r.handshakes, |h| h.per_sec),
        hs_cpu: Metric::new("µs", false, &r.handshakes, |h| h.cpu_us_per_handshake),
        idle_bytes: Metric::new("bytes", false, &r.idle, |i| {
            let rss = i.result.proxy_rss.saturating_sub(i.rss_at_start) as f64;
            (rss + i.result.kernel_delta as f64) / idle_conns
        }),
    }
}

/// The main table: one row per contender, the headline number of each workload.
pub fn main_table(r: &Results) -> String {
    let t = tables(r);
    let cell = |cs: &[EchoCell], conns: usize, size: usize| {
        cs.iter().find(|c| c.conns == conns && c.size == size).map(echo_metrics)
    };
    let e1 = cell(&r.echo, 1, 128);
    let e1000 = cell(&r.echo, 1000, 128);
    let with_nginx = |m: &Metric, c: &str| match m.median(c) {
        Some(v) if c != NGINX => format!("{} ({})", fmt_num(v), m.vs(c, NGINX)),
        Some(v) => fmt_num(v),
        None => "–".into(),
    };
    let p99 = |e: &Option<[Metric; 5]>, c: &str| e.as_ref().map_or("–".into(), |m| with_nginx(&m[1], c));
    let idle_added = |c: &str| match (t.idle_bytes.median(c), t.idle_bytes.median(DIRECT)) {
        (Some(v), Some(d)) if c != DIRECT => fmt_num(v - d),
        (Some(_), _) => "0".into(),
        _ => "–".into(),
    };
    let mut out = String::new();
    let rows = r
        .contenders
        .iter()
        .map(|c| {
            vec![
                format!("**{c}**"),
                with_nginx(&t.bulk_mbs, c),
                with_nginx(&t.bulk_cpu, c),
                p99(&e1, c),
                p99(&e1000, c),
                with_nginx(&t.closed_rate, c),
                with_nginx(&t.hs_rate, c),
                idle_added(c),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "contender",
            "bulk MB/s",
            "bulk CPU s/GB",
            "echo p99 µs, 1 conn × 128 B",
            "echo p99 µs, 1,000 conns × 128 B",
            "closed loop msg/s",
            "handshakes/s",
            "idle bytes/conn over direct",
        ],
        rows,
    );
    out.push_str("Medians of the runs; in parentheses the ratio to nginx. Bulk MB/s, closed-loop msg/s and handshakes/s: higher is better; the rest: lower is better.\n");
    out
}

/// Whether direct beats every proxy on each workload's headline number.
pub fn generator_check(r: &Results) -> Vec<String> {
    let t = tables(r);
    let mut out = Vec::new();
    let mut check = |what: &str, m: &Metric| {
        let Some(d) = m.median(DIRECT) else { return };
        let better = |a: f64, b: f64| if m.higher_is_better { a > b } else { a < b };
        let best =
            m.by.iter()
                .filter(|(c, _)| c.as_str() != DIRECT)
                .map(|(c, s)| (c.clone(), s.median))
                .reduce(|a, b| if better(b.1, a.1) { b } else { a });
        let Some((name, v)) = best else { return };
        if better(d, v) {
            out.push(format!(
                "{what}: yes, direct {} vs best proxy {name} {} {}",
                fmt_num(d),
                fmt_num(v),
                m.unit
            ));
        } else {
            out.push(format!(
                "{what}: **no**, best proxy {name} {} vs direct {} {}: this workload is bound by CPU 0 (generator and upstream); \
                 a proxy moves part of the TCP work to CPU 1, so direct is no upper bound here and the proxies' numbers say more \
                 about how much they offload from CPU 0 than about their own cost",
                fmt_num(v),
                fmt_num(d),
                m.unit
            ));
        }
    };
    check("bulk MB/s", &t.bulk_mbs);
    for cell in &r.echo {
        let em = echo_metrics(cell);
        check(
            &format!("echo {} × {}, p99", fmt_int(cell.conns), size_name(cell.size)),
            &em[1],
        );
    }
    check("closed loop msg/s", &t.closed_rate);
    check("handshakes/s", &t.hs_rate);
    out
}

/// The goals of the issue, checked against the numbers.
pub fn goals(r: &Results) -> (Vec<String>, Vec<String>) {
    let t = tables(r);
    let mut ahead = Vec::new();
    let mut behind = Vec::new();
    let mut push = |v: Option<(bool, String)>| {
        if let Some((ok, text)) = v {
            if ok { ahead.push(text) } else { behind.push(text) }
        }
    };
    push(t.bulk_mbs.verdict("bulk throughput"));
    push(t.bulk_cpu.verdict("bulk CPU per GB"));
    for cell in &r.echo {
        let m = echo_metrics(cell);
        let what = format!("echo {} conn(s) × {}", fmt_int(cell.conns), size_name(cell.size));
        push(m[1].verdict(&format!("{what}, p99")));
        push(m[3].verdict(&format!("{what}, CPU per message")));
    }
    push(t.closed_rate.verdict("closed loop msg/s"));
    push(t.hs_rate.verdict("handshakes/s"));
    push(t.idle_bytes.verdict("idle memory per connection"));
    if let (Some(k), Some(d)) = (t.bulk_mbs.median(KERNEL), t.bulk_mbs.median(DIRECT)) {
        let pct = (k / d - 1.0) * 100.0;
        let text = format!(
            "bulk throughput vs direct: {} vs {} MB/s ({pct:+.0} %)",
            fmt_num(k),
            fmt_num(d)
        );
        if pct >= -10.0 {
            ahead.push(format!("{text}: **within 10 %** of direct"));
        } else {
            behind.push(format!("{text}: **not within 10 %** of direct"));
        }
    }
    (ahead, behind)
}

pub fn write(r: &Results, out_dir: &Path) -> Result<()> {
    let mut md = String::new();
    let plan = r.plan.clone().unwrap_or_else(|| crate::run::Plan::new(false));
    let t = tables(r);
    let cs = &r.contenders;
    let m = &r.machine;
    let v = &r.versions;
    let kind = if plan.quick { "Quick smoke run" } else { "Full run" };
    let _ = writeln!(md, "# wsproxy benchmark: latest results\n");
    let _ = writeln!(
        md,
        "{kind}: {} run(s) per measurement, each number the **median [min–max]** of the runs. Started {}, took {:.1} min. \
         Reproduce with `cargo xtask bench` (full) or `cargo xtask bench --quick` (fewer runs, 1 s windows, {} idle connections: a smoke test, not numbers to quote).\n",
        plan.runs,
        r.started,
        r.total_secs / 60.0,
        fmt_int(Plan::new(true).idle_conns),
    );
    for rerun in &r.reruns {
        let _ = writeln!(
            md,
            "Workload {rerun} (`cargo xtask bench -- --only WORKLOAD --merge`); the rest is from the run above.\n"
        );
    }
    if plan.quick {
        md.push_str("**This is a quick run**: 2 runs and 1-second windows; the numbers are noisy.\n\n");
    }
    table(
        &mut md,
        &["", ""],
        vec![
            vec![
                "machine".into(),
                format!("{}, {} CPUs, {:.1} GiB", m.cpu_model, m.cpus, m.memory_gib),
            ],
            vec!["kernel".into(), m.kernel.clone()],
            vec!["OS".into(), m.os.clone()],
            vec!["wsproxy".into(), v.wsproxy.clone()],
            vec!["nginx".into(), v.nginx.clone()],
            vec!["HAProxy".into(), v.haproxy.clone()],
            vec![
                "load generator".into(),
                format!("wsproxy-bench (tokio, tokio-tungstenite, hdrhistogram), {}", v.rustc),
            ],
            vec![
                "load average at start / end".into(),
                format!("{} / {}", m.loadavg_start, m.loadavg_end),
            ],
        ],
    );
    md.push_str(
        "**Set-up.** Every proxy runs pinned to CPU 1 (`taskset -c 1`); the load generator and the upstream (both \
         `wsproxy-bench`, one thread each) run pinned to CPU 0. Loopback only, TCP_NODELAY on every socket, the same upstream \
         for all. `direct` connects the generator to the upstream without a proxy. wsproxy: both relay modes, limits set \
         out of the way, logs at `warn`, other settings as shipped (kernel relay credit 4 MiB / 4,096 skbs). nginx: 1 worker, \
         `proxy_http_version 1.1`, Upgrade/Connection headers, `proxy_read_timeout 3600s`, `tcp_nodelay on`, access log off. \
         HAProxy: `mode http`, `nbthread 1`, `timeout tunnel 1h`, once without and once with `option splice-request` + \
         `option splice-response`. Contenders are interleaved within each run.\n\n\
         **CPU** is the whole machine's busy time from `/proc/stat` (user, system, irq, softirq: kernel workers, softirq, the \
         generator and the upstream count too) over the measurement window, less the user and system time of processes that \
         are not part of the benchmark (other users of the machine; their kernel threads cannot be told apart and stay in).\n\n",
    );
    let shares: Vec<f64> = all_cpu(r)
        .iter()
        .filter(|c| c.total_secs > 0.0)
        .map(|c| c.foreign_secs / c.total_secs * 100.0)
        .collect();
    if let Some(s) = Summary::of(&shares) {
        let _ = writeln!(
            md,
            "**Shared machine.** The machine (2 CPUs) is shared with other work (other engineers' builds and tests). During the \
             measurement windows of this run, processes outside the benchmark used a median {:.1} % (max {:.0} %) of the machine's \
             CPU time. Wide min–max ranges mark the measurements that were disturbed.\n",
            s.median, s.max
        );
    }
    if !r.failures.is_empty() {
        md.push_str("**Failed runs** (left out of the medians):\n\n");
        for f in &r.failures {
            let _ = writeln!(md, "- {f}");
        }
        md.push('\n');
    }

    md.push_str("## Is the generator the bottleneck?\n\nDirect must beat every proxy for a workload to measure the proxies rather than the load generator:\n\n");
    for line in generator_check(r) {
        let _ = writeln!(md, "- {line}");
    }
    md.push('\n');

    md.push_str("## Main table\n\n");
    md.push_str(&main_table(r));
    md.push('\n');

    let (ahead, behind) = goals(r);
    md.push_str("## Goals\n\nwsproxy-kernel should be ahead of nginx and HAProxy on every workload, and within 10 % of direct on bulk throughput. Measured:\n\n");
    for b in &behind {
        let _ = writeln!(md, "- {b}");
    }
    for a in &ahead {
        let _ = writeln!(md, "- {a}");
    }
    md.push('\n');

    // 1. Bulk
    let _ = writeln!(
        md,
        "## 1. Bulk: one connection, client → upstream, {} messages\n\n{:.0} s per run. MB/s = 10^6 payload bytes per second, counted by the upstream. CPU s/GB: busy seconds of the whole machine per 10^9 payload bytes.\n",
        size_name(plan.bulk_size),
        plan.bulk_secs
    );
    let cpu_busy = |c: &str, i: usize| {
        Summary::of(&r.bulk.get(c).map_or(vec![], |rs| {
            rs.iter()
                .map(|b| b.cpu.per_cpu_busy.get(i).copied().unwrap_or(f64::NAN) * 100.0)
                .collect::<Vec<_>>()
        }))
        .map_or("–".into(), |s| format!("{:.0} %", s.median))
    };
    table(
        &mut md,
        &[
            "contender",
            "MB/s",
            "× direct",
            "× nginx",
            "CPU s/GB",
            "× direct",
            "× nginx",
            "CPU 0 busy",
            "CPU 1 (proxy) busy",
        ],
        cs.iter()
            .map(|c| {
                vec![
                    c.clone(),
                    t.bulk_mbs.cell(c),
                    t.bulk_mbs.vs(c, DIRECT),
                    t.bulk_mbs.vs(c, NGINX),
                    t.bulk_cpu.cell(c),
                    t.bulk_cpu.vs(c, DIRECT),
                    t.bulk_cpu.vs(c, NGINX),
                    cpu_busy(c, 0),
                    cpu_busy(c, 1),
                ]
            })
            .collect(),
    );
    md.push_str("![bulk](bulk.png)\n\n");

    // 2. Echo
    let _ = writeln!(
        md,
        "## 2. Echo at a fixed rate (open loop)\n\nOne schedule for all connections: message k is due at k / rate and goes to connection k mod n, \
         whatever the answers do (a timerfd paces it with microsecond precision). The rate is {:.0} % of direct's closed-loop \
         rate for the same connections and size, measured at the start of the workload; a contender that cannot keep up \
         sends less (\"sent msg/s\") and its latency grows with the queue. Latency: from the send (the time is written into \
         the payload just before the write) to the echo's arrival, per message. \"added\" = the contender's median minus \
         direct's. CPU per message: whole machine. {:.0} s per run.\n",
        plan.echo_load * 100.0,
        plan.echo_secs
    );
    for cell in &r.echo {
        let em = echo_metrics(cell);
        let _ = writeln!(
            md,
            "### {} connection(s) × {} at {} msg/s (direct's closed loop: {} msg/s)\n",
            fmt_int(cell.conns),
            size_name(cell.size),
            fmt_num(cell.rate),
            fmt_num(cell.direct_max)
        );
        table(
            &mut md,
            &[
                "contender",
                "sent msg/s",
                "p50 µs",
                "p99 µs",
                "p99.9 µs",
                "added p50",
                "added p99",
                "added p99.9",
                "p99 × direct",
                "p99 × nginx",
                "CPU µs/msg",
                "CPU × nginx",
                "CPU 0 / CPU 1 busy",
            ],
            cs.iter()
                .map(|c| {
                    vec![
                        c.clone(),
                        em[4].median(c).map_or("–".into(), fmt_num),
                        em[0].cell(c),
                        em[1].cell(c),
                        em[2].cell(c),
                        added(&em[0], c),
                        added(&em[1], c),
                        added(&em[2], c),
                        em[1].vs(c, DIRECT),
                        em[1].vs(c, NGINX),
                        em[3].cell(c),
                        em[3].vs(c, NGINX),
                        cpu_split(cell.runs.get(c)),
                    ]
                })
                .collect(),
        );
    }
    md.push_str("![echo latency](echo_latency.png)\n\n![echo CPU](echo_cpu.png)\n\n");

    // 3. Closed loop
    let _ = writeln!(
        md,
        "## 3. Closed-loop echo: {} connections × {}, one message in flight each\n\n{:.0} s per run.\n",
        fmt_int(plan.closed_conns),
        size_name(plan.closed_size),
        plan.closed_secs
    );
    let cl = |f: fn(&crate::load::EchoResult) -> f64| Metric::new("µs", false, &r.closed, f);
    let (cp50, cp99) = (cl(|e| e.p50_us), cl(|e| e.p99_us));
    table(
        &mut md,
        &[
            "contender",
            "msg/s",
            "× direct",
            "× nginx",
            "round trip p50 µs",
            "p99 µs",
            "CPU µs/msg",
            "× nginx",
            "CPU 0 / CPU 1 busy",
        ],
        cs.iter()
            .map(|c| {
                vec![
                    c.clone(),
                    t.closed_rate.cell(c),
                    t.closed_rate.vs(c, DIRECT),
                    t.closed_rate.vs(c, NGINX),
                    cp50.cell(c),
                    cp99.cell(c),
                    t.closed_cpu.cell(c),
                    t.closed_cpu.vs(c, NGINX),
                    cpu_split(r.closed.get(c)),
                ]
            })
            .collect(),
    );
    md.push_str("![closed loop](closed.png)\n\n");

    // 4. Handshakes
    let _ = writeln!(
        md,
        "## 4. Handshakes: {} concurrent clients, each: connect, upgrade, one 16-byte echo, close\n\n{:.0} s per run.\n",
        plan.handshake_clients, plan.handshake_secs
    );
    table(
        &mut md,
        &[
            "contender",
            "handshakes/s",
            "× direct",
            "× nginx",
            "failed (all runs)",
            "CPU µs/handshake",
            "× nginx",
        ],
        cs.iter()
            .map(|c| {
                let errs: u64 = r.handshakes.get(c).map_or(0, |v| v.iter().map(|h| h.errors).sum());
                vec![
                    c.clone(),
                    t.hs_rate.cell(c),
                    t.hs_rate.vs(c, DIRECT),
                    t.hs_rate.vs(c, NGINX),
                    errs.to_string(),
                    t.hs_cpu.cell(c),
                    t.hs_cpu.vs(c, NGINX),
                ]
            })
            .collect(),
    );
    md.push_str("![handshakes](handshakes.png)\n\n");

    // 5. Idle
    let _ = writeln!(
        md,
        "## 5. Idle memory: {} open idle connections\n\nProxy RSS (`VmRSS`) with every connection open minus its RSS right after start, plus the change of the kernel's \
         own memory (`Slab + KernelStack + PageTables` in `/proc/meminfo`) from before opening to {:.1} s after; per connection. \
         The kernel part includes the generator's and upstream's sockets, which direct has too: \"over direct\" is the proxy's own cost.\n",
        fmt_int(plan.idle_conns),
        plan.idle_settle_secs
    );
    if let Some(limit) = plan.idle_limited_by {
        let _ = writeln!(
            md,
            "**Fewer than 10,000 connections**: the file-descriptor limit here is {limit} and cannot be raised (the sandbox \
             withholds CAP_SYS_RESOURCE); a proxy holds two descriptors per connection and nginx keeps 1/16 of its connection \
             slots free, so {} connections is the round number that fits every contender. \
             The per-connection figures are what to compare.\n",
            fmt_int(plan.idle_conns)
        );
    }
    let idle_m = |f: fn(&crate::run::IdleRun) -> f64| Metric::new("MiB", false, &r.idle, f);
    let rss = idle_m(|i| i.result.proxy_rss.saturating_sub(i.rss_at_start) as f64 / 1048576.0);
    let kern = idle_m(|i| i.result.kernel_delta as f64 / 1048576.0);
    table(
        &mut md,
        &[
            "contender",
            "proxy RSS growth MiB",
            "kernel Δ MiB",
            "bytes/conn",
            "over direct",
            "× direct",
            "× nginx",
        ],
        cs.iter()
            .map(|c| {
                vec![
                    c.clone(),
                    rss.cell(c),
                    kern.cell(c),
                    t.idle_bytes.cell(c),
                    added(&t.idle_bytes, c),
                    t.idle_bytes.vs(c, DIRECT),
                    t.idle_bytes.vs(c, NGINX),
                ]
            })
            .collect(),
    );
    md.push_str("![idle](idle.png)\n\n");

    md.push_str("## Closing note\n\n");
    md.push_str("The main table of this run:\n\n");
    md.push_str(&main_table(r));
    md.push('\n');
    if behind.is_empty() {
        md.push_str("wsproxy-kernel met every goal in this run.\n\n");
    } else {
        md.push_str("Where wsproxy-kernel is behind in this run:\n\n");
        for b in &behind {
            let _ = writeln!(md, "- {b}");
        }
        md.push('\n');
    }
    let analysis = Path::new(env!("CARGO_MANIFEST_DIR")).join("analysis.md");
    if let Ok(text) = fs::read_to_string(&analysis) {
        md.push_str("### Why, and what would fix it (profile analysis, `bench/analysis.md`)\n\n");
        md.push_str(&text);
        md.push('\n');
    }
    let timings: Vec<String> = r.timings.iter().map(|(k, v)| format!("{k} {v:.0} s")).collect();
    let _ = writeln!(
        md,
        "\n---\nWall time per workload: {}. Raw numbers: [`latest.json`](latest.json).",
        timings.join(", ")
    );
    fs::write(out_dir.join("latest.md"), md)?;
    plots(r, &t, out_dir)
}

use crate::run::Plan;

fn plots(r: &Results, t: &Tables, dir: &Path) -> Result<()> {
    let cs = &r.contenders;
    let kind = if r.plan.as_ref().is_some_and(|p| p.quick) {
        " (quick run)"
    } else {
        ""
    };
    plot::render(
        &dir.join("bulk.png"),
        &format!("Bulk, one connection, 64 KiB messages{kind}"),
        &[
            t.bulk_mbs.panel("Throughput", cs),
            t.bulk_cpu.panel("Machine CPU per GB", cs),
        ],
    )?;
    let mut lat = Vec::new();
    let mut cpu = Vec::new();
    for cell in &r.echo {
        let em = echo_metrics(cell);
        let what = format!(
            "{} conn × {} at {} msg/s",
            fmt_int(cell.conns),
            size_name(cell.size),
            fmt_num(cell.rate)
        );
        lat.push(em[1].panel(&format!("p99 latency, {what}"), cs));
        cpu.push(em[3].panel(&format!("Machine CPU per message, {what}"), cs));
    }
    if !lat.is_empty() {
        plot::render(
            &dir.join("echo_latency.png"),
            &format!("Echo at a fixed rate: p99 latency{kind}"),
            &lat,
        )?;
        plot::render(
            &dir.join("echo_cpu.png"),
            &format!("Echo at a fixed rate: CPU per message{kind}"),
            &cpu,
        )?;
    }
    plot::render(
        &dir.join("closed.png"),
        &format!("Closed-loop echo, 1,000 connections × 128 B{kind}"),
        &[
            t.closed_rate.panel("Messages per second", cs),
            t.closed_cpu.panel("Machine CPU per message", cs),
        ],
    )?;
    plot::render(
        &dir.join("handshakes.png"),
        &format!("Handshakes (connect, upgrade, one echo, close){kind}"),
        &[
            t.hs_rate.panel("Handshakes per second", cs),
            t.hs_cpu.panel("Machine CPU per handshake", cs),
        ],
    )?;
    plot::render(
        &dir.join("idle.png"),
        &format!("Idle connections: memory per connection{kind}"),
        &[t.idle_bytes.panel("Proxy RSS + kernel memory per connection", cs)],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric(higher: bool, pairs: &[(&str, f64, f64, f64)]) -> Metric {
        Metric {
            unit: "u".into(),
            higher_is_better: higher,
            by: pairs
                .iter()
                .map(|(c, med, min, max)| {
                    (
                        c.to_string(),
                        Summary {
                            median: *med,
                            min: *min,
                            max: *max,
                            runs: 5,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn verdict_compares_with_the_best_rival() {
        let m = metric(
            true,
            &[
                (KERNEL, 100.0, 90.0, 110.0),
                ("nginx", 80.0, 70.0, 85.0),
                ("haproxy", 120.0, 115.0, 125.0),
            ],
        );
        let (ahead, text) = m.verdict("x").unwrap();
        assert!(!ahead);
        assert!(text.contains("**behind** haproxy"), "{text}");
        let m = metric(false, &[(KERNEL, 10.0, 9.0, 11.0), ("nginx", 12.0, 10.5, 13.0)]);
        let (ahead, text) = m.verdict("x").unwrap();
        assert!(ahead);
        assert!(text.contains("overlap"), "{text}");
    }

    #[test]
    fn added_is_the_difference_to_direct() {
        let m = metric(false, &[(DIRECT, 60.0, 50.0, 70.0), (KERNEL, 75.5, 70.0, 80.0)]);
        assert_eq!(added(&m, KERNEL), "+15.5");
        assert_eq!(added(&m, DIRECT), "–");
        assert_eq!(m.vs(KERNEL, DIRECT), "1.26×");
    }
}
