//! `latest.json`, `latest.md` and the PNG plots, all drawn from the same derived figures.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::Result;

use crate::figures::{self, DIRECT, metric};
use crate::plan::{Plan, SCALE_ID, ScalePlan, Shape, Workload};
use crate::plot::{self, Bar, Panel};
use crate::results::{Figure, Results, ScaleResult, TopologyResult, Verdict};
use crate::stats::{Summary, fmt_int, fmt_num, fmt_summary};

pub const KERNEL: &str = "wsproxy-kernel";
pub const AUTO: &str = "wsproxy-auto";
pub const USERSPACE: &str = "wsproxy-userspace";
/// The hand-written closing analysis, embedded in the report.
const ANALYSIS: &str = "analysis.md";

/// Recomputes the figures, writes `latest.json`, `latest.md` and the plots into `out`.
pub fn write(r: &mut Results, out: &Path) -> Result<()> {
    r.figures = figures::derive(r);
    fs::create_dir_all(out)?;
    fs::write(out.join("latest.json"), serde_json::to_string_pretty(r)?)?;
    let analysis = fs::read_to_string(out.parent().unwrap_or(out).join(ANALYSIS)).unwrap_or_default();
    fs::write(out.join("latest.md"), markdown(r, &analysis))?;
    plots(r, out)
}

fn plan(r: &Results) -> Plan {
    r.plan.clone().unwrap_or_else(|| Plan::new(false))
}

/// The per-unit figure a workload is judged by: per GB for byte streams and large messages,
/// per message (or handshake) otherwise; what the proxy adds over direct, except over TLS, where
/// there is no direct and the machine's whole CPU per unit is compared (the generator's and
/// upstream's share is the same for every contender).
fn headline(w: &Workload) -> (&'static str, &'static str, &'static str) {
    if w.tls {
        let (_, own, unit) = headline(&Workload {
            tls: false,
            ..w.clone()
        });
        return (own, own, unit);
    }
    match w.shape {
        Shape::Sink { .. } => (metric::ADDED_CPU_PER_GB, metric::CPU_PER_GB, "CPU ms/GB"),
        Shape::Echo { size, .. } if size >= 1 << 20 => (metric::ADDED_CPU_PER_GB, metric::CPU_PER_GB, "CPU ms/GB"),
        Shape::Handshakes { .. } => (metric::ADDED_CPU_PER_UNIT, metric::CPU_PER_UNIT, "CPU µs/handshake"),
        _ => (metric::ADDED_CPU_PER_UNIT, metric::CPU_PER_UNIT, "CPU µs/msg"),
    }
}

/// Per-GB figures are printed in milliseconds per GB (the JSON keeps seconds).
fn scale(m: &str) -> f64 {
    if m == metric::ADDED_CPU_PER_GB || m == metric::CPU_PER_GB {
        1e3
    } else {
        1.0
    }
}

fn cell(f: Option<&Figure>, k: f64) -> String {
    f.map_or_else(
        || "–".into(),
        |f| {
            fmt_summary(&Summary {
                median: f.summary.median * k,
                min: f.summary.min * k,
                max: f.summary.max * k,
                runs: f.summary.runs,
            })
        },
    )
}

fn table(md: &mut String, head: &[String], rows: Vec<Vec<String>>) {
    let _ = writeln!(md, "| {} |", head.join(" | "));
    let _ = writeln!(md, "|{}|", head.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
    for r in rows {
        let _ = writeln!(md, "| {} |", r.join(" | "));
    }
    md.push('\n');
}

/// The fixed load cell of a workload's row: `offered` in its unit, or "–" where none was set.
fn fixed_load(w: &Workload, offered: f64) -> String {
    if offered > 0.0 {
        unit_rate(w, offered)
    } else {
        "–".into()
    }
}

fn unit_rate(w: &Workload, rate: f64) -> String {
    match w.shape {
        Shape::Sink { .. } => format!("{} MB/s", fmt_num(rate / 1e6)),
        s => format!("{}/s", fmt_num(rate)).replace("/s", &format!(" {}/s", s.unit())),
    }
}

/// Direct must be clearly ahead of every proxy: its range of maxima lies above every proxy's.
/// Returns (passed, text) per workload.
pub fn generator_check(fs: &[Figure], t: &str, w: &str, contenders: &[String]) -> Option<(bool, String)> {
    let d = figures::find(fs, t, w, metric::MAX_RATE, DIRECT)?;
    let mut worst: Option<(&str, &Figure)> = None;
    for c in contenders.iter().filter(|c| c.as_str() != DIRECT) {
        if let Some(f) = figures::find(fs, t, w, metric::MAX_RATE, c)
            && worst.is_none_or(|(_, b)| f.summary.max > b.summary.max)
        {
            worst = Some((c, f));
        }
    }
    let (name, p) = worst?;
    let pass = d.summary.min > p.summary.max;
    Some((
        pass,
        format!(
            "{} direct {:.2}× the fastest proxy ({name})",
            if pass { "ok:" } else { "**FAIL**:" },
            d.summary.median / p.summary.median
        ),
    ))
}

/// Over TLS there is no direct to bound the proxies; instead: which CPU the fastest contender's
/// median maximum saturated. CPU 0 (the generator's and the upstream's) means the maximum is the
/// generator's, and every contender that reached it may be faster.
fn tls_generator_check(fs: &[Figure], t: &TopologyResult, w: &str, contenders: &[String]) -> Option<String> {
    let tn = t.topology.name();
    let (c, f) = contenders
        .iter()
        .filter_map(|c| Some((c, figures::find(fs, tn, w, metric::MAX_RATE, c)?)))
        .max_by(|a, b| a.1.summary.median.total_cmp(&b.1.summary.median))?;
    let busy = median_busy(t, w, c, f)?;
    Some(if busy.starts_with(&format!("cpu{} ", crate::sys::GENERATOR_CPU)) {
        format!("no TLS direct; the fastest ({c}) is **bound by the generator's CPU** ({busy})")
    } else {
        format!("no TLS direct; the fastest ({c}) saturates another CPU ({busy})")
    })
}

/// The busiest CPU of contender `c`'s maximum closest to its median `f`.
fn median_busy(t: &TopologyResult, w: &str, c: &str, f: &Figure) -> Option<String> {
    let med = f.summary.median;
    t.workload(w)?
        .max
        .get(c)?
        .iter()
        .min_by(|a, b| (a.m.rate - med).abs().total_cmp(&(b.m.rate - med).abs()))
        .map(|x| x.m.busiest())
}

fn verdict_text(k: &Figure, o: &Figure) -> String {
    let ratio = if o.summary.median.abs() > 0.0 {
        format!(" {:.2}×", k.summary.median / o.summary.median)
    } else {
        String::new()
    };
    match figures::compare(&k.summary, &o.summary, k.higher_is_better) {
        Verdict::Even => "even".into(),
        Verdict::Better => format!("**better**{ratio}"),
        Verdict::Worse => format!("worse{ratio}"),
    }
}

fn markdown(r: &Results, analysis: &str) -> String {
    let p = plan(r);
    let fs = &r.figures;
    let cs = &r.contenders;
    let proxies: Vec<String> = cs.iter().filter(|c| c.as_str() != DIRECT).cloned().collect();
    let mut md = String::new();
    let m = &r.machine;
    let v = &r.versions;
    let _ = writeln!(md, "# wsproxy benchmark: latest results\n");
    let _ = writeln!(
        md,
        "{}: one calibration run, then {} measured runs per workload and contender, interleaved; every figure is the \
         **median [min–max]** of the runs. Started {}, took {:.1} min. Reproduce with `cargo xtask bench` (full run, about \
         45 minutes) or `cargo xtask bench --quick` (a smoke run, under 5 minutes: not numbers to quote). \
         `cargo xtask bench -- --topologies veth --only closed` narrows a run.\n",
        if p.quick { "**Quick smoke run**" } else { "Full run" },
        p.runs,
        r.started,
        r.total_secs / 60.0
    );
    table(
        &mut md,
        &["".into(), "".into()],
        vec![
            vec![
                "machine".into(),
                format!("{}, {} CPUs, {:.1} GiB", m.cpu_model, m.cpus, m.memory_gib),
            ],
            vec!["kernel / OS".into(), format!("{} / {}", m.kernel, m.os)],
            vec!["wsproxy".into(), v.wsproxy.clone()],
            vec![
                "nginx / HAProxy / Caddy".into(),
                format!("{} / {} / {}", v.nginx, v.haproxy, v.caddy),
            ],
            vec![
                "TLS libraries".into(),
                if v.tls.is_empty() { "–".into() } else { v.tls.clone() },
            ],
            vec![
                "load generator and upstream".into(),
                format!("wsproxy-bench, {}", v.rustc),
            ],
            vec![
                "load average at start / end".into(),
                format!("{} / {}", m.loadavg_start, m.loadavg_end),
            ],
        ],
    );
    md.push_str(
        "## How it measures\n\n\
         - **Where things run.** The load generator and the upstream (both `wsproxy-bench`, one thread each) are pinned to \
         CPU 0, every proxy to CPU 1. Kernel work (softirq, the psock backlog worker) runs where the kernel puts it; the \
         topology decides where that is, which is why every table is given per topology.\n\
         - **Headline: added machine CPU at a fixed load.** For every workload each contender's maximum is measured once \
         (calibration); the fixed load is half of the lowest of those maxima, the same for every contender, so that none is \
         saturated. At that load the machine's CPU time (both CPUs' wall time less their idle time from `/proc/stat`, \
         which a tickless kernel measures exactly, less processes outside the benchmark) is divided by the work done, and \
         direct's figure of the same run is subtracted: \
         what remains is what the proxy costs the machine, wherever the kernel ran it.\n\
         - **Latency** (p50 / p99 / p99.9) is measured at the same fixed load: open loop, each message stamped when sent.\n\
         - **Maximum rate** is secondary: closed loop (one message in flight per connection, one round of a broadcast at a \
         time, 50 handshake loops), with the busiest CPU named.\n\
         - **Even.** A figure whose min–max range overlaps the rival's is reported as even, not as a win or a loss.\n\
         - **Generator check.** `direct` (no proxy) must be clearly ahead of every proxy at the maximum (its whole range \
         above every proxy's), or the generator, not the proxy, would be what is measured.\n\n",
    );
    if p.workloads().any(|w| w.tls) {
        let _ = writeln!(
            md,
            "**wss (`{prefix}*`).** After the plain workloads each proxy starts again with a TLS listener: one ECDSA \
             P-256 certificate made at the run's start (`openssl req`) for `{sni}`, the same for all, and TLS 1.3 with \
             {suite} pinned where the proxy's configuration allows it (nginx `ssl_protocols TLSv1.3` and \
             `ssl_conf_command Ciphersuites`, HAProxy `ssl-min-ver TLSv1.3 ciphersuites`, Caddy `protocols tls1.3` (Go \
             has no setting for TLS 1.3 suites), wsproxy `min_version = \"1.3\"` and `cipher_suites`); the \
             upstream stays plain ws. The generator (rustls with *ring*, as wsproxy) offers only {suite} and X25519, \
             so every contender does the same cryptography; it pins the certificate (those bytes, no chain) and \
             verifies the handshake's signature; SNI and Host `{sni}`, ALPN http/1.1. `tls-handshakes` are full \
             handshakes (no resumption); `tls-resumed` resume TLS 1.3 tickets (each used once, from a store that is \
             empty when each measurement starts). What every connection negotiated is checked and shown below. \
             There is no direct over TLS (the upstream is plain ws), so the TLS tables show the machine's whole CPU \
             per unit, not what a proxy adds, and the generator check names the CPU the fastest contender \
             saturated instead.\n",
            prefix = crate::plan::TLS_PREFIX,
            sni = crate::tls::SNI,
            suite = crate::tls::SUITE,
        );
    }
    for t in &r.topologies {
        let _ = writeln!(md, "- **{}**: {}", t.topology.name(), t.description);
    }
    md.push('\n');
    let _ = writeln!(md, "Workloads:\n");
    for w in p.workloads() {
        let _ = writeln!(md, "- `{}`: {}", w.id, w.title);
    }
    if p.groups.iter().any(|g| g.idle_memory) {
        let big = p
            .groups
            .iter()
            .filter(|g| g.idle_memory)
            .map(|g| g.conns)
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            md,
            "- `idle`: memory of {} open idle connections, over the whole host: the proxy's RSS, kernel memory (slab, \
             kernel stacks, page tables: sockets, psocks, epoll items) and TCP buffer memory (`/proc/net/sockstat`), \
             less the same before they opened",
            fmt_int(big)
        );
    }
    md.push('\n');
    if let Some(sp) = &p.scale {
        let _ = writeln!(
            md,
            "- `{SCALE_ID}`: configuration scale, wsproxy alone: {} services of {} upstreams each ({} upstreams) \
             in one file against one such service: `wsproxy check-config` time, handshakes at the maximum through \
             each, and a reload of the many with {} connections open",
            fmt_int(sp.services),
            sp.upstreams_per_service,
            fmt_int(sp.services * sp.upstreams_per_service),
            fmt_int(sp.conns)
        );
    }
    if let Some(n) = p.limited_by_nofile {
        let _ = writeln!(md, "RLIMIT_NOFILE ({n}) capped the largest group of connections.\n");
    }

    if p.workloads().next().is_some() {
        md.push_str("## Generator check\n\n");
        let mut head = vec!["workload".to_owned()];
        head.extend(r.topologies.iter().map(|t| t.topology.name().to_owned()));
        let rows = p
            .workloads()
            .map(|w| {
                let mut row = vec![format!("`{}`", w.id)];
                for t in &r.topologies {
                    let check = if w.tls {
                        tls_generator_check(fs, t, &w.id, cs)
                    } else {
                        generator_check(fs, t.topology.name(), &w.id, cs).map(|(_, s)| s)
                    };
                    row.push(check.unwrap_or_else(|| "–".into()));
                }
                row
            })
            .collect();
        table(&mut md, &head, rows);
    }

    for t in &r.topologies {
        topology_section(&mut md, r, &p, t, &proxies);
    }

    md.push_str("## Analysis\n\n");
    if analysis.trim().is_empty() {
        md.push_str("(No analysis written for this run: `bench/analysis.md` is empty.)\n\n");
    } else {
        md.push_str(analysis.trim());
        md.push_str("\n\n");
    }
    if !r.failures.is_empty() {
        md.push_str("## Failed measurements (left out of the figures)\n\n");
        for f in &r.failures {
            let _ = writeln!(md, "- {f}");
        }
        md.push('\n');
    }
    md
}

fn topology_section(md: &mut String, r: &Results, p: &Plan, t: &TopologyResult, proxies: &[String]) {
    let fs = &r.figures;
    let cs = &r.contenders;
    let tn = t.topology.name();
    let _ = writeln!(md, "## Topology `{tn}`\n\n{}\n", t.description);
    let present: Vec<&Workload> = p.workloads().filter(|w| t.workload(&w.id).is_some()).collect();
    if let (Some(s), Some(sp)) = (&t.scale, &p.scale) {
        scale_section(md, fs, tn, s, sp);
    }
    if present.is_empty() && t.idle.is_empty() {
        return;
    }

    let plain: Vec<&Workload> = present.iter().copied().filter(|w| !w.tls).collect();
    if !plain.is_empty() {
        added_section(md, r, t, &plain, proxies);
    }
    let tls: Vec<&Workload> = present.iter().copied().filter(|w| w.tls).collect();
    if !tls.is_empty() {
        tls_section(md, r, t, &tls, proxies);
    }

    let _ = writeln!(
        md,
        "### Latency at the fixed load ({tn}), µs: p50 / p99 / p99.9\n\nMedians of the runs (ranges in `latest.json`). \
         ![p99]({tn}-p99.png)\n"
    );
    let mut head = vec!["workload".to_owned()];
    head.extend(cs.iter().cloned());
    let rows = present
        .iter()
        .filter(|w| w.shape.has_latency())
        .map(|w| {
            let mut row = vec![format!("`{}`", w.id)];
            for c in cs {
                let q = |m: &str| figures::find(fs, tn, &w.id, m, c).map(|f| fmt_num(f.summary.median));
                row.push(match (q(metric::P50), q(metric::P99), q(metric::P999)) {
                    (Some(a), Some(b), Some(c)) => format!("{a} / {b} / {c}"),
                    _ => "–".into(),
                });
            }
            row
        })
        .collect();
    table(md, &head, rows);

    let _ = writeln!(
        md,
        "### Maximum rate ({tn}), secondary\n\nHigher is better; under each figure the busiest CPU of the median run.\n"
    );
    let rows = present
        .iter()
        .map(|w| {
            let mut row = vec![format!("`{}`", w.id)];
            for c in cs {
                let f = figures::find(fs, tn, &w.id, metric::MAX_RATE, c);
                let busy = f.and_then(|f| median_busy(t, &w.id, c, f));
                row.push(match f {
                    Some(f) => format!(
                        "{} [{}–{}]<br>{}",
                        unit_rate(w, f.summary.median),
                        fmt_num(scaled_rate(w, f.summary.min)),
                        fmt_num(scaled_rate(w, f.summary.max)),
                        busy.unwrap_or_default()
                    ),
                    None => "–".into(),
                });
            }
            row
        })
        .collect();
    table(md, &head, rows);

    let _ = writeln!(
        md,
        "### Where the CPU went at the fixed load ({tn}), µs per unit: generator / upstream / proxy / kernel\n\n\
         The proxy's process (all threads and children), and the kernel's work charged to no process (softirq, kernel \
         workers): what `/proc/stat` counted minus the processes.\n"
    );
    let rows = present
        .iter()
        .map(|w| {
            let mut row = vec![format!("`{}`", w.id)];
            for c in cs {
                let q = |m: &str| figures::find(fs, tn, &w.id, m, c).map(|f| fmt_num(f.summary.median));
                row.push(
                    match (
                        q(metric::GENERATOR_CPU),
                        q(metric::UPSTREAM_CPU),
                        q(metric::PROXY_CPU),
                        q(metric::KERNEL_CPU),
                    ) {
                        (Some(a), Some(b), Some(c), Some(d)) => format!("{a} / {b} / {c} / {d}"),
                        _ => "–".into(),
                    },
                );
            }
            row
        })
        .collect();
    table(md, &head, rows);

    if !t.idle.is_empty() {
        let conns = t.idle.values().flatten().map(|i| i.conns).max().unwrap_or(0);
        let _ = writeln!(
            md,
            "### Idle connections ({tn}): memory per connection, {} connections\n\nWhole host, bytes per connection, \
             lower is better; \"added\" is the sum less direct's (the generator's and upstream's sockets are in every \
             figure).\n",
            fmt_int(conns)
        );
        let head: Vec<String> = [
            "contender",
            "proxy RSS",
            "kernel (slab, stacks)",
            "TCP buffers",
            "added over direct",
            "eBPF maps (total)",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let rows = cs
            .iter()
            .map(|c| {
                let q = |m: &str| cell(figures::find(fs, tn, "idle", m, c), 1.0);
                vec![
                    c.clone(),
                    q(metric::RSS_PER_CONN),
                    q(metric::KERNEL_PER_CONN),
                    q(metric::TCP_PER_CONN),
                    q(metric::ADDED_MEM_PER_CONN),
                    figures::find(fs, tn, "idle", metric::BPF_MAPS, c)
                        .map_or_else(|| "–".into(), |f| format!("{:.1} MiB", f.summary.median / 1048576.0)),
                ]
            })
            .collect();
        table(md, &head, rows);
    }

    let rivals: Vec<&String> = proxies.iter().filter(|c| c.as_str() != KERNEL).collect();
    versus(md, fs, tn, &present, KERNEL, &rivals);
    // `auto` is judged against the relay it starts in: it must never be behind it.
    let userspace: Vec<&String> = proxies.iter().filter(|c| c.as_str() == USERSPACE).collect();
    versus(md, fs, tn, &present, AUTO, &userspace);
}

/// What each proxy adds to the machine's CPU over direct at the fixed load (the plain workloads).
fn added_section(md: &mut String, r: &Results, t: &TopologyResult, plain: &[&Workload], proxies: &[String]) {
    let fs = &r.figures;
    let tn = t.topology.name();
    let _ = writeln!(
        md,
        "### Added machine CPU over direct at the fixed load ({tn})\n\nLower is better. Direct's own cost is in the \
         second column. ![added CPU]({tn}-cpu.png)\n"
    );
    let mut head = vec!["workload".to_owned(), "fixed load".into(), "direct".into()];
    head.extend(proxies.iter().cloned());
    let rows = plain
        .iter()
        .map(|w| {
            let (added, own, unit) = headline(w);
            let wr = t.workload(&w.id).expect("present");
            let mut row = vec![
                format!("`{}` ({unit})", w.id),
                fixed_load(w, wr.offered),
                cell(figures::find(fs, tn, &w.id, own, DIRECT), scale(own)),
            ];
            row.extend(
                proxies
                    .iter()
                    .map(|c| cell(figures::find(fs, tn, &w.id, added, c), scale(added))),
            );
            row
        })
        .collect();
    table(md, &head, rows);
}

/// The plain workloads whose TLS forms are measured too, for the side-by-side table.
const TLS_PAIRS: [(&str, &str); 3] = [
    ("handshakes", "tls-handshakes"),
    ("bulk", "tls-bulk"),
    ("closed", "tls-closed"),
];

/// The wsproxy contender the TLS goals judge: the default mode if it ran, else any other.
fn tls_subject(fs: &[Figure], tn: &str) -> Option<&'static str> {
    [AUTO, USERSPACE, KERNEL]
        .into_iter()
        .find(|c| fs.iter().any(|f| f.topology == tn && f.contender == *c))
}

/// The best of the other proxies (nginx, HAProxy, Caddy) on one metric.
fn best_rival<'a>(
    fs: &'a [Figure],
    tn: &str,
    w: &str,
    m: &str,
    proxies: &'a [String],
) -> Option<(&'a str, &'a Figure)> {
    proxies
        .iter()
        .filter(|c| !c.starts_with("wsproxy"))
        .filter_map(|c| Some((c.as_str(), figures::find(fs, tn, w, m, c)?)))
        .reduce(|a, b| {
            let better = if a.1.higher_is_better {
                b.1.summary.median > a.1.summary.median
            } else {
                b.1.summary.median < a.1.summary.median
            };
            if better { b } else { a }
        })
}

/// The TLS workloads: the machine's CPU per unit at the fixed load, what was negotiated, the goals
/// of issue 14 (wss against nginx, HAProxy and Caddy), and plain and TLS side by side.
fn tls_section(md: &mut String, r: &Results, t: &TopologyResult, tls: &[&Workload], proxies: &[String]) {
    let fs = &r.figures;
    let tn = t.topology.name();
    let _ = writeln!(
        md,
        "### wss (TLS) at the fixed load ({tn}): the machine's CPU per unit\n\nLower is better; the whole machine \
         (generator and upstream included: the same work for every contender), since there is no direct over TLS. \
         ![TLS CPU]({tn}-tls-cpu.png)\n"
    );
    let mut head = vec!["workload".to_owned(), "fixed load".into()];
    head.extend(proxies.iter().cloned());
    let rows = tls
        .iter()
        .map(|w| {
            let (m, _, unit) = headline(w);
            let wr = t.workload(&w.id).expect("present");
            let mut row = vec![format!("`{}` ({unit})", w.id), fixed_load(w, wr.offered)];
            row.extend(
                proxies
                    .iter()
                    .map(|c| cell(figures::find(fs, tn, &w.id, m, c), scale(m))),
            );
            row
        })
        .collect();
    table(md, &head, rows);

    // What was negotiated: by every connection measured, and at each proxy's start.
    let _ = writeln!(
        md,
        "### TLS negotiated ({tn})\n\nEvery connection and handshake of the TLS measurements (count over all runs, \
         maxima and fixed loads); at start, a client offering every suite and group of rustls's *ring* provider in its \
         order (suites AES-256-GCM, AES-128-GCM, ChaCha20-Poly1305; groups P-384, X25519, P-256, with a key share for \
         P-384; TLS 1.2 and 1.3): the proxy's own choice. Resumed: the share of \
         `tls-resumed`'s handshakes at the fixed load that resumed.\n"
    );
    let head: Vec<String> = ["contender", "measured connections", "own choice", "resumed"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let rows = proxies
        .iter()
        .filter(|c| {
            t.tls.contains_key(*c)
                || tls
                    .iter()
                    .any(|w| t.workload(&w.id).is_some_and(|r| r.max.contains_key(*c)))
        })
        .map(|c| {
            let mut seen: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
            for w in tls {
                let Some(wr) = t.workload(&w.id) else { continue };
                for runs in [wr.max.get(c), wr.fixed.get(c)].into_iter().flatten() {
                    for x in runs.iter().filter_map(|x| x.m.tls.as_ref()) {
                        for (k, n) in &x.negotiated {
                            *seen.entry(k.clone()).or_default() += n;
                        }
                    }
                }
            }
            let measured = seen
                .iter()
                .map(|(k, n)| format!("{k} ({})", fmt_int(*n as usize)))
                .collect::<Vec<_>>()
                .join(", ");
            let resumed = tls
                .iter()
                .find_map(|w| figures::find(fs, tn, &w.id, metric::TLS_RESUMED, c))
                .map_or_else(
                    || "–".into(),
                    |f| {
                        format!(
                            "{:.1} % [{:.1}–{:.1}]",
                            f.summary.median * 100.0,
                            f.summary.min * 100.0,
                            f.summary.max * 100.0
                        )
                    },
                );
            vec![
                c.clone(),
                if measured.is_empty() { "–".into() } else { measured },
                t.tls.get(c).map_or_else(|| "–".into(), |n| n.preferred.clone()),
                resumed,
            ]
        })
        .collect();
    table(md, &head, rows);

    if let Some(subject) = tls_subject(fs, tn) {
        let _ = writeln!(
            md,
            "### Issue 14's TLS goals ({tn}): {subject} against the best of nginx, HAProxy and Caddy\n\n\
             \"Even\" means the ranges overlap: the runs cannot tell the two apart.\n"
        );
        // (workload, metric, what, a goal of the issue, the factor to the printed unit).
        let goals: [(&str, &str, &str, bool, f64); 9] = [
            (
                "tls-handshakes",
                metric::MAX_RATE,
                "handshakes/s (maximum) at least the best",
                true,
                1.0,
            ),
            (
                "tls-bulk",
                metric::MAX_RATE,
                "bulk MB/s (maximum) at least the best",
                true,
                1e-6,
            ),
            (
                "tls-bulk",
                metric::CPU_PER_GB,
                "bulk CPU ms/GB (the machine's) at most the best",
                true,
                1e3,
            ),
            (
                "tls-bulk",
                metric::PROXY_CPU,
                "(no goal) bulk, the proxy's process alone, CPU ms/GB",
                false,
                1e6,
            ),
            (
                "tls-handshakes",
                metric::PROXY_CPU,
                "(no goal) the proxy's process alone, CPU µs/handshake",
                false,
                1.0,
            ),
            (
                "tls-closed",
                metric::CPU_PER_UNIT,
                "(no goal) closed-loop echo, CPU µs/msg",
                false,
                1.0,
            ),
            (
                "tls-closed",
                metric::P99,
                "(no goal) closed-loop echo, p99 µs",
                false,
                1.0,
            ),
            (
                "tls-resumed",
                metric::MAX_RATE,
                "(no goal) resumed handshakes/s (maximum)",
                false,
                1.0,
            ),
            (
                "tls-resumed",
                metric::CPU_PER_UNIT,
                "(no goal) resumed handshakes, CPU µs/handshake",
                false,
                1.0,
            ),
        ];
        let head: Vec<String> = ["goal", subject, "best rival", "ratio", "verdict"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let mut rows = Vec::new();
        for (w, m, what, goal, k) in goals {
            if !tls.iter().any(|x| x.id == w) {
                continue;
            }
            let (Some(sf), Some((rival, rf))) =
                (figures::find(fs, tn, w, m, subject), best_rival(fs, tn, w, m, proxies))
            else {
                continue;
            };
            let verdict = match figures::compare(&sf.summary, &rf.summary, sf.higher_is_better) {
                Verdict::Better if goal => "**met**",
                Verdict::Worse if goal => "**missed**",
                Verdict::Even if goal => "even: not shown met or missed",
                Verdict::Better => "better",
                Verdict::Worse => "worse",
                Verdict::Even => "even",
            };
            rows.push(vec![
                format!("`{w}`: {what}"),
                cell(Some(sf), k),
                format!("{rival} {}", cell(Some(rf), k)),
                format!("{:.2}×", sf.summary.median / rf.summary.median),
                verdict.to_owned(),
            ]);
        }
        if !rows.is_empty() {
            table(md, &head, rows);
        }
    }

    // Plain and TLS side by side, for the workloads measured both ways.
    let pairs: Vec<(&str, &str)> = TLS_PAIRS
        .into_iter()
        .filter(|(a, b)| t.workload(a).is_some() && t.workload(b).is_some())
        .collect();
    if pairs.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "### Plain and TLS side by side ({tn})\n\nMaximum rate, then the machine's CPU per unit at each one's fixed \
         load: plain → TLS (medians).\n"
    );
    let mut head = vec!["contender".to_owned()];
    for (a, b) in &pairs {
        head.push(format!("`{a}` → `{b}` maximum"));
        head.push(format!("`{a}` → `{b}` CPU"));
    }
    let plan = plan(r);
    let rows = proxies
        .iter()
        .map(|c| {
            let mut row = vec![c.clone()];
            for (a, b) in &pairs {
                let wa = plan.workloads().find(|w| w.id == *a);
                let (m, _, unit) = wa.map_or((metric::CPU_PER_UNIT, "", ""), |w| {
                    let (_, own, unit) = headline(w);
                    (own, own, unit)
                });
                let med = |w: &str, m: &str| figures::find(&r.figures, tn, w, m, c).map(|f| f.summary.median);
                let rate = |v: f64| wa.map_or_else(|| fmt_num(v), |w| unit_rate(w, v));
                row.push(match (med(a, metric::MAX_RATE), med(b, metric::MAX_RATE)) {
                    (Some(x), Some(y)) => format!("{} → {} ({:.2}×)", rate(x), rate(y), y / x),
                    _ => "–".into(),
                });
                row.push(match (med(a, m), med(b, m)) {
                    (Some(x), Some(y)) => format!(
                        "{} → {} {} ({:.2}×)",
                        fmt_num(x * scale(m)),
                        fmt_num(y * scale(m)),
                        unit.trim_start_matches("CPU "),
                        y / x
                    ),
                    _ => "–".into(),
                });
            }
            row
        })
        .collect();
    table(md, &head, rows);
}

/// `services-scale`: the two files' load times, the handshake rates through each and their ratio,
/// and the reloads under load.
fn scale_section(md: &mut String, fs: &[Figure], tn: &str, s: &ScaleResult, sp: &ScalePlan) {
    let c = s.contender.as_str();
    let n = fmt_int(s.services);
    let f = |m: &str| figures::find(fs, tn, SCALE_ID, m, c);
    let k = |m: &str, k: f64| cell(f(m), k);
    let _ = writeln!(
        md,
        "### Configuration scale ({tn}): 1 service against {n} ({c})\n\n\
         One listener, every service told apart by its host name, {per} upstream entries per service (one reachable \
         main, backups never tried). `wsproxy check-config`: wall time of the command, {load} runs per file, \
         interleaved. Handshakes (connect, upgrade, one echo, close; {clients} loops at the maximum for {window} s) \
         through a proxy of each file, side by side in every run, the Host field of each request the next of the \
         services' names; the ratio is taken run by run, and \"even\" means the two rates' ranges overlap.\n",
        clients = sp.clients,
        window = sp.window_secs,
        per = s.upstreams_per_service,
        load = s.load.first().map_or(0, |l| l.secs.len()),
    );
    let versus = |a: &str, b: &str| match (f(a), f(b)) {
        (Some(a), Some(b)) => verdict_text(a, b),
        _ => "–".into(),
    };
    let load = |i: usize| s.load.get(i);
    let head: Vec<String> = [
        "".to_owned(),
        format!("1 service, {} upstreams", s.upstreams_per_service),
        format!(
            "{n} services, {} upstreams",
            fmt_int(s.services * s.upstreams_per_service)
        ),
        format!("{n} against 1"),
    ]
    .into();
    let rows = vec![
        vec![
            "file size".into(),
            load(0).map_or_else(|| "–".into(), |l| format!("{} KB", fmt_num(l.bytes as f64 / 1e3))),
            load(1).map_or_else(|| "–".into(), |l| format!("{} KB", fmt_num(l.bytes as f64 / 1e3))),
            String::new(),
        ],
        vec![
            "`wsproxy check-config`, ms".into(),
            k(metric::CHECK_CONFIG_ONE, 1e3),
            k(metric::CHECK_CONFIG_MANY, 1e3),
            versus(metric::CHECK_CONFIG_MANY, metric::CHECK_CONFIG_ONE),
        ],
        vec![
            "handshakes/s at the maximum".into(),
            k(metric::HANDSHAKES_ONE, 1.0),
            k(metric::HANDSHAKES_MANY, 1.0),
            format!(
                "{}× {}; {}",
                f(metric::HANDSHAKES_RATIO).map_or_else(|| "–".into(), |r| fmt_num(r.summary.median)),
                f(metric::HANDSHAKES_RATIO).map_or_else(String::new, |r| format!(
                    "[{}–{}]",
                    fmt_num(r.summary.min),
                    fmt_num(r.summary.max)
                )),
                versus(metric::HANDSHAKES_MANY, metric::HANDSHAKES_ONE)
            ),
        ],
        vec![
            "proxy CPU µs/handshake at the maximum".into(),
            k(metric::HANDSHAKE_CPU_ONE, 1.0),
            k(metric::HANDSHAKE_CPU_MANY, 1.0),
            versus(metric::HANDSHAKE_CPU_MANY, metric::HANDSHAKE_CPU_ONE),
        ],
    ];
    table(md, &head, rows);
    let again: usize = s.handshakes.iter().map(|h| h.attempts.saturating_sub(1)).sum();
    if again > 0 {
        let still = s.handshakes.iter().filter(|h| h.disturbed).count();
        let _ = writeln!(
            md,
            "Pairs of handshake measurements during which other processes used over {:.0} % of the machine were \
             measured again: {again} times; {still} of the {} runs kept were still disturbed.\n",
            crate::scale::DISTURBED * 100.0,
            s.handshakes.len()
        );
    }
    if s.reloads.is_empty() {
        return;
    }
    let conns = s.reloads.iter().map(|r| r.conns).max().unwrap_or(0);
    let _ = writeln!(
        md,
        "Reload under load: {} connections through the proxy of {n} services (spread over their host names), each \
         exchanging a {size}-byte message every {gap} ms whose echo must match byte for byte; the file is replaced by \
         one in which every service's backups and the upstream timeout differ, then SIGHUP. Reload time: from the \
         signal to the proxy's log line. Dropped: connections that failed, or did not complete {after} exchanges after \
         the reload and close cleanly (must be 0).\n",
        fmt_int(conns),
        size = crate::scale::PAYLOAD,
        gap = sp.gap_ms,
        after = sp.after_reload,
    );
    let dropped: usize = s.reloads.iter().map(|r| r.dropped).sum();
    table(
        md,
        &[
            "reloads".into(),
            "reload time, ms".into(),
            "messages verified".into(),
            "fewest per connection after the reload".into(),
            "dropped".into(),
        ],
        vec![vec![
            s.reloads.len().to_string(),
            k(metric::RELOAD_SECS, 1e3),
            fmt_int(s.reloads.iter().map(|r| r.exchanges as usize).sum()),
            s.reloads
                .iter()
                .map(|r| r.min_after_reload)
                .min()
                .unwrap_or(0)
                .to_string(),
            if dropped == 0 {
                "0".into()
            } else {
                format!("**{dropped} (FAIL)**")
            },
        ]],
    );
}

/// A table of `subject`'s added CPU and p99 against each of `rivals`, per workload; nothing if
/// the subject or every rival is missing.
fn versus(md: &mut String, fs: &[Figure], tn: &str, present: &[&Workload], subject: &str, rivals: &[&String]) {
    if rivals.is_empty() || !fs.iter().any(|f| f.topology == tn && f.contender == subject) {
        return;
    }
    let _ = writeln!(
        md,
        "### {subject} against {} ({tn}): added CPU; p99 latency\n\n\"better 0.40×\" means {subject}'s \
         median is 0.40 of the rival's and the ranges do not overlap; \"even\" means they overlap. Over TLS \
         (`tls-*`), the machine's CPU instead of the added CPU.\n",
        if rivals.len() == 1 {
            rivals[0].as_str()
        } else {
            "each rival"
        }
    );
    let mut head = vec!["workload".to_owned()];
    head.extend(rivals.iter().map(|c| (*c).clone()));
    let rows = present
        .iter()
        .map(|w| {
            let (added, _, _) = headline(w);
            let mut row = vec![format!("`{}`", w.id)];
            for o in rivals {
                let pair = |m: &str| {
                    Some(verdict_text(
                        figures::find(fs, tn, &w.id, m, subject)?,
                        figures::find(fs, tn, &w.id, m, o)?,
                    ))
                };
                let cpu = pair(added).unwrap_or_else(|| "–".into());
                let lat = if w.shape.has_latency() {
                    pair(metric::P99).unwrap_or_else(|| "–".into())
                } else {
                    "n/a".into()
                };
                row.push(format!("{cpu}; {lat}"));
            }
            row
        })
        .collect();
    table(md, &head, rows);
}

fn scaled_rate(w: &Workload, rate: f64) -> f64 {
    match w.shape {
        Shape::Sink { .. } => rate / 1e6,
        _ => rate,
    }
}

fn panel(fs: &[Figure], t: &str, w: &Workload, metric: &str, k: f64, unit: &str, cs: &[String]) -> Option<Panel> {
    let bars: Vec<Bar> = cs
        .iter()
        .filter_map(|c| {
            let f = figures::find(fs, t, &w.id, metric, c)?;
            Some(Bar {
                label: c.clone(),
                median: f.summary.median * k,
                min: f.summary.min * k,
                max: f.summary.max * k,
                highlight: c == KERNEL,
            })
        })
        .collect();
    (!bars.is_empty()).then(|| Panel {
        title: w.id.clone(),
        unit: unit.into(),
        higher_is_better: false,
        bars,
    })
}

fn plots(r: &Results, out: &Path) -> Result<()> {
    let p = plan(r);
    let proxies: Vec<String> = r.contenders.iter().filter(|c| c.as_str() != DIRECT).cloned().collect();
    for t in &r.topologies {
        let tn = t.topology.name();
        let cpu: Vec<Panel> = p
            .workloads()
            .filter(|w| !w.tls)
            .filter_map(|w| {
                let (added, _, unit) = headline(w);
                panel(
                    &r.figures,
                    tn,
                    w,
                    added,
                    scale(added),
                    &format!("added {unit}"),
                    &proxies,
                )
            })
            .collect();
        if !cpu.is_empty() {
            plot::render(
                &out.join(format!("{tn}-cpu.png")),
                &format!("Added machine CPU at the fixed load ({tn})"),
                &cpu,
            )?;
        }
        let tls: Vec<Panel> = p
            .workloads()
            .filter(|w| w.tls)
            .filter_map(|w| {
                let (m, _, unit) = headline(w);
                panel(&r.figures, tn, w, m, scale(m), unit, &proxies)
            })
            .collect();
        if !tls.is_empty() {
            plot::render(
                &out.join(format!("{tn}-tls-cpu.png")),
                &format!("wss: machine CPU at the fixed load ({tn})"),
                &tls,
            )?;
        }
        let lat: Vec<Panel> = p
            .workloads()
            .filter(|w| w.shape.has_latency())
            .filter_map(|w| panel(&r.figures, tn, w, metric::P99, 1.0, "p99 µs", &r.contenders))
            .collect();
        if !lat.is_empty() {
            plot::render(
                &out.join(format!("{tn}-p99.png")),
                &format!("p99 latency at the fixed load ({tn})"),
                &lat,
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::load::{Latency, Measure};
    use crate::results::{RunMeasure, WorkloadResult};
    use crate::sys::CpuDelta;
    use crate::topology::Topology;

    fn m(rate: f64, busy: f64, p99: f64) -> Measure {
        Measure {
            done: (rate * 1.0) as u64,
            secs: 1.0,
            rate,
            bytes: (rate * 256.0) as u64,
            latency: Some(Latency {
                p50_us: p99 / 2.0,
                p99_us: p99,
                p999_us: p99 * 2.0,
                ..Latency::default()
            }),
            cpu: CpuDelta {
                busy_secs: busy,
                total_secs: 2.0,
                ..CpuDelta::default()
            },
            ..Measure::default()
        }
    }

    /// Five runs of each contender: (maximum rate, CPU seconds at the fixed load, p99).
    fn runs(spec: &[(&str, f64, f64, f64)]) -> (BTreeMap<String, Vec<RunMeasure>>, BTreeMap<String, Vec<RunMeasure>>) {
        let mut max = BTreeMap::new();
        let mut fixed = BTreeMap::new();
        for &(c, rate, busy, p99) in spec {
            for run in 0..5 {
                let jitter = 1.0 + run as f64 * 0.01;
                max.entry(c.to_owned()).or_insert_with(Vec::new).push(RunMeasure {
                    run,
                    m: m(rate * jitter, 1.0, p99),
                });
                fixed.entry(c.to_owned()).or_insert_with(Vec::new).push(RunMeasure {
                    run,
                    m: m(1000.0, busy * jitter, p99 * jitter),
                });
            }
        }
        (max, fixed)
    }

    #[test]
    fn the_report_shows_added_cpu_the_generator_check_and_even_verdicts() {
        let plan = Plan::new(true);
        let (max, fixed) = runs(&[
            ("direct", 100_000.0, 0.010, 50.0),
            ("wsproxy-kernel", 60_000.0, 0.020, 100.0),
            // nginx: clearly worse CPU, the same latency (overlapping ranges: even).
            ("nginx", 50_000.0, 0.050, 101.0),
        ]);
        let (max_bad, fixed_bad) = runs(&[
            ("direct", 50_000.0, 0.010, 50.0),
            ("wsproxy-kernel", 50_500.0, 0.020, 100.0),
            ("nginx", 40_000.0, 0.050, 101.0),
        ]);
        let wr = |id: &str, max, fixed| WorkloadResult {
            id: id.into(),
            offered: 1000.0,
            offered_set_by: "nginx".into(),
            max,
            fixed,
            ..WorkloadResult::default()
        };
        let mut r = Results {
            plan: Some(plan),
            contenders: vec!["direct".into(), "wsproxy-kernel".into(), "nginx".into()],
            topologies: vec![TopologyResult {
                topology: Topology::Veth,
                description: "two namespaces".into(),
                workloads: vec![wr("closed", max, fixed), wr("echo-1x128", max_bad, fixed_bad)],
                idle: BTreeMap::new(),
                scale: None,
                tls: BTreeMap::new(),
                secs: 1.0,
            }],
            ..Results::default()
        };
        let dir = std::env::temp_dir().join(format!("wsproxy-bench-report-{}", std::process::id()));
        write(&mut r, &dir).unwrap();
        let md = fs::read_to_string(dir.join("latest.md")).unwrap();
        let json: Results = serde_json::from_str(&fs::read_to_string(dir.join("latest.json")).unwrap()).unwrap();
        fs::remove_dir_all(&dir).unwrap();

        // Added CPU: kernel 0.020 - 0.010 s over 1,000 messages = 10 µs/msg, nginx 40.
        let k = figures::find(&json.figures, "veth", "closed", metric::ADDED_CPU_PER_UNIT, KERNEL).unwrap();
        assert!((k.summary.median - 10.0).abs() < 0.5, "{k:?}");
        assert_eq!(k.best_other.as_deref(), Some("nginx"));
        assert_eq!(k.verdict_vs_best_other, Some(Verdict::Better));
        let p99 = figures::find(&json.figures, "veth", "closed", metric::P99, KERNEL).unwrap();
        assert_eq!(p99.verdict_vs_best_other, Some(Verdict::Even));
        assert!(
            md.contains("ok: direct 1.67× the fastest proxy (wsproxy-kernel)"),
            "{md}"
        );
        assert!(md.contains("**FAIL**: direct 0.99×"), "{md}");
        assert!(md.contains("**better** 0.25×; even"), "{md}");
    }

    #[test]
    fn tls_workloads_compare_the_machines_cpu_without_direct_and_judge_the_goals() {
        let plan = Plan::new(true);
        let suite = "TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519";
        // (maximum, CPU seconds at the fixed load, p99); no direct over TLS.
        let (mut max, mut fixed) = runs(&[
            ("wsproxy-auto", 800e6, 0.004, 100.0),
            ("nginx", 300e6, 0.008, 100.0),
            ("caddy", 550e6, 0.005, 100.0),
        ]);
        for m in max.values_mut().chain(fixed.values_mut()).flatten() {
            m.m.tls = Some(crate::tls::Seen {
                negotiated: BTreeMap::from([(suite.to_owned(), 1)]),
                resumed: 0,
            });
            // The generator's CPU saturated at the maximum.
            m.m.cpu.per_cpu = vec![
                crate::sys::CpuShare {
                    busy: 0.99,
                    softirq: 0.1,
                },
                crate::sys::CpuShare {
                    busy: 0.5,
                    softirq: 0.1,
                },
            ];
        }
        let mut r = Results {
            plan: Some(plan),
            contenders: vec!["direct".into(), AUTO.into(), "nginx".into(), "caddy".into()],
            topologies: vec![TopologyResult {
                topology: Topology::Veth,
                description: "two namespaces".into(),
                workloads: vec![WorkloadResult {
                    id: "tls-bulk".into(),
                    offered: 1000.0,
                    offered_set_by: "nginx".into(),
                    max,
                    fixed,
                    ..WorkloadResult::default()
                }],
                idle: BTreeMap::new(),
                scale: None,
                tls: BTreeMap::from([(
                    AUTO.to_owned(),
                    crate::tls::Negotiated {
                        measured: suite.into(),
                        preferred: "TLSv1_3 TLS13_AES_256_GCM_SHA384 secp384r1".into(),
                    },
                )]),
                secs: 1.0,
            }],
            ..Results::default()
        };
        let dir = std::env::temp_dir().join(format!("wsproxy-bench-report-tls-{}", std::process::id()));
        write(&mut r, &dir).unwrap();
        let md = fs::read_to_string(dir.join("latest.md")).unwrap();
        let tls_plot = dir.join("veth-tls-cpu.png").exists();
        fs::remove_dir_all(&dir).unwrap();
        assert!(tls_plot);

        // The machine's CPU per GB: 0.004 s for 256,000 bytes, no added figure.
        let f = figures::find(&r.figures, "veth", "tls-bulk", metric::CPU_PER_GB, AUTO).unwrap();
        assert!((f.summary.median - 0.004 * 1.02 / 256_000.0 * 1e9).abs() < 1.0, "{f:?}");
        assert!(figures::find(&r.figures, "veth", "tls-bulk", metric::ADDED_CPU_PER_GB, AUTO).is_none());
        assert!(
            md.contains("no TLS direct; the fastest (wsproxy-auto) is **bound by the generator's CPU** (cpu0 99 %"),
            "{md}"
        );
        assert!(md.contains("### wss (TLS) at the fixed load (veth)"), "{md}");
        assert!(
            md.contains("| `tls-bulk`: bulk MB/s (maximum) at least the best | 816 [800–832] | caddy 561 [550–572] | 1.45× | **met** |"),
            "{md}"
        );
        assert!(
            md.contains("| `tls-bulk`: bulk CPU ms/GB (the machine's) at most the best | 15,938 [15,625–16,250] | caddy 19,922 [19,531–20,313] | 0.80× | **met** |"),
            "{md}"
        );
        assert!(
            md.contains(&format!(
                "| wsproxy-auto | {suite} (10) | TLSv1_3 TLS13_AES_256_GCM_SHA384 secp384r1 | – |"
            )),
            "{md}"
        );
        // No table of what proxies add over direct: no plain workload ran.
        assert!(!md.contains("### Added machine CPU"), "{md}");
    }
}
