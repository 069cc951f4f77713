//! What the benchmark reads from and sets on the machine: `/proc/stat` CPU time, `/proc/meminfo`,
//! a process's RSS, CPU affinity, the file-descriptor limit, and the facts for the report header.

use std::collections::HashMap;
use std::fs;
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

/// The CPU the load generator and the upstream are pinned to.
pub const GENERATOR_CPU: usize = 0;
/// The CPU every proxy is pinned to.
pub const PROXY_CPU: usize = 1;

/// Clock ticks of one CPU line of `/proc/stat`.
///
/// The busy figures (user, system, softirq, ...) are sampled at each tick, which misses short
/// bursts of work between idle periods (seen here: a generator at 24 % of a CPU by its own
/// accounting showed as 9 % busy), and every figure comes in 10 ms steps, coarse for a window of
/// under a second. So busy time is wall time less idle time, idle taken from cpuidle's per-state
/// times (µs) where the machine has them (`CpuSample::idle_ns`), and only the share of softirq
/// comes from these samples.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct Ticks {
    pub busy: u64,
    pub softirq: u64,
    pub total: u64,
    /// idle + iowait + steal: time that was not this machine's work.
    pub idle: u64,
}

/// The processes whose CPU time the report names: the upstream and the proxy under measurement
/// (the generator is this process). Set before each contender's measurements.
#[derive(Debug, Clone, Copy, Default)]
struct Roles {
    upstream: Option<u32>,
    proxy: Option<u32>,
}

static ROLES: std::sync::Mutex<Roles> = std::sync::Mutex::new(Roles {
    upstream: None,
    proxy: None,
});

pub fn set_roles(upstream: Option<u32>, proxy: Option<u32>) {
    *ROLES.lock().expect("not poisoned") = Roles { upstream, proxy };
}

/// The whole machine and each CPU, from `/proc/stat`; the CPU time of the generator, the upstream
/// and the proxy; and that of every process that is not part of the benchmark (by pid, clock
/// ticks), to tell how much of the machine others used.
#[derive(Debug, Clone, Default)]
pub struct CpuSample {
    /// CLOCK_MONOTONIC when taken, ns.
    pub wall_ns: u64,
    pub all: Ticks,
    pub per_cpu: Vec<Ticks>,
    pub foreign: HashMap<u32, u64>,
    /// Each CPU's idle time, ns: from cpuidle's per-state times (µs) where the machine has them,
    /// otherwise from the `/proc/stat` ticks (10 ms steps).
    pub idle_ns: Vec<u64>,
    /// CPU time of the generator, the upstream and the proxy, ns.
    pub generator: u64,
    pub upstream: u64,
    pub proxy: u64,
}

/// The benchmark's own processes: itself, the upstream and the proxies.
static OURS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

pub fn register_ours(pid: u32) {
    OURS.lock().expect("not poisoned").push(pid);
}

/// utime + stime of one `/proc/PID/stat` line, unless it is a kernel thread (kernel workers and
/// softirq threads do the relaying, so they belong to the measurement). Children's time
/// (cutime, cstime) is left out: a parent reaping a long-lived child would add time spent
/// before the window; what a process that ended within the window used is missed instead, so
/// the estimate of others' use errs low.
pub fn parse_proc_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let flags: u64 = f.get(6)?.parse().ok()?;
    const PF_KTHREAD: u64 = 0x0020_0000;
    if flags & PF_KTHREAD != 0 {
        return None;
    }
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some(n(11) + n(12))
}

/// A process's CPU time in ns: the sum of its threads' `schedstat` run times (exact), or its
/// `stat` ticks where schedstat is missing.
fn proc_runtime_ns(pid: u32) -> Option<u64> {
    let exact = fs::read_dir(format!("/proc/{pid}/task")).ok().map(|dir| {
        dir.flatten()
            .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum::<u64>()
    });
    match exact {
        Some(ns) if ns > 0 => Some(ns),
        _ => proc_ticks(pid).map(|t| (t as f64 * 1e9 / ticks_per_sec()) as u64),
    }
}

/// Idle time of `cpu` in ns from cpuidle (µs per idle state), if the machine has a cpuidle driver.
fn cpuidle_ns(cpu: usize) -> Option<u64> {
    let dir = fs::read_dir(format!("/sys/devices/system/cpu/cpu{cpu}/cpuidle")).ok()?;
    let mut us = 0u64;
    let mut any = false;
    for state in dir.flatten() {
        if let Some(t) = fs::read_to_string(state.path().join("time"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
        {
            us += t;
            any = true;
        }
    }
    any.then_some(us * 1000)
}

fn proc_ticks(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .as_deref()
        .and_then(parse_proc_ticks)
}

fn foreign_ticks() -> HashMap<u32, u64> {
    let ours = OURS.lock().expect("not poisoned").clone();
    let me = std::process::id();
    let mut out = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || ours.contains(&pid) {
            continue;
        }
        if let Some(t) = proc_ticks(pid) {
            out.insert(pid, t);
        }
    }
    out
}

/// One CPU's share of a window (0..=1).
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct CpuShare {
    /// Busy (user, nice, system, irq, softirq).
    pub busy: f64,
    /// Of which softirq.
    pub softirq: f64,
}

/// CPU time spent between two samples.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct CpuDelta {
    /// Busy seconds of all CPUs together: wall time less idle, iowait and steal.
    pub busy_secs: f64,
    /// Wall seconds times the number of CPUs.
    pub total_secs: f64,
    pub per_cpu: Vec<CpuShare>,
    /// CPU seconds of processes that are not part of the benchmark (other users of the machine):
    /// growth of those alive at both ends, plus all of those that started in between.
    pub foreign_secs: f64,
    /// CPU seconds of the load generator (this process), the upstream and the proxy's process.
    pub generator_secs: f64,
    pub upstream_secs: f64,
    pub proxy_secs: f64,
    /// What the machine spent that no process of the benchmark was charged with: softirq, kernel
    /// workers (the psock backlog worker among them), interrupts.
    pub kernel_secs: f64,
}

impl CpuDelta {
    /// The benchmark's CPU: the whole machine's busy time less other users' processes.
    pub fn ours(&self) -> f64 {
        (self.busy_secs - self.foreign_secs).max(0.0)
    }
}

/// Parses one `cpu` line's numbers: user nice system idle iowait irq softirq steal [guest ...].
/// Guest time is already part of user time, so it is not added again.
pub fn parse_ticks(fields: &[u64]) -> Ticks {
    let get = |i: usize| fields.get(i).copied().unwrap_or(0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6);
    let total = busy + get(3) + get(4) + get(7);
    Ticks {
        busy,
        softirq: get(6),
        total,
        idle: get(3) + get(4) + get(7),
    }
}

pub fn parse_stat(text: &str) -> CpuSample {
    let mut sample = CpuSample::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(name) = words.next() else { continue };
        if !name.starts_with("cpu") {
            continue;
        }
        let fields: Vec<u64> = words.filter_map(|w| w.parse().ok()).collect();
        let ticks = parse_ticks(&fields);
        if name == "cpu" {
            sample.all = ticks;
        } else {
            sample.per_cpu.push(ticks);
        }
    }
    sample
}

pub fn cpu_sample() -> CpuSample {
    let roles = *ROLES.lock().expect("not poisoned");
    let foreign = foreign_ticks();
    let mut s = parse_stat(&fs::read_to_string("/proc/stat").unwrap_or_default());
    s.wall_ns = crate::ws::now_ns();
    s.foreign = foreign;
    let tick_ns = 1e9 / ticks_per_sec();
    s.idle_ns = (0..s.per_cpu.len())
        .map(|c| cpuidle_ns(c).unwrap_or((s.per_cpu[c].idle as f64 * tick_ns) as u64))
        .collect();
    s.generator = proc_runtime_ns(std::process::id()).unwrap_or(0);
    s.upstream = roles.upstream.and_then(proc_runtime_ns).unwrap_or(0);
    s.proxy = roles.proxy.and_then(proc_runtime_ns).unwrap_or(0);
    s
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

impl CpuSample {
    pub fn since(&self, earlier: &CpuSample) -> CpuDelta {
        let hz = ticks_per_sec();
        let wall = self.wall_ns.saturating_sub(earlier.wall_ns) as f64 / 1e9;
        let share = |(c, (now, then)): (usize, (&Ticks, &Ticks))| {
            if wall <= 0.0 {
                return CpuShare::default();
            }
            let idle = self.idle_ns.get(c).zip(earlier.idle_ns.get(c)).map_or_else(
                || now.idle.saturating_sub(then.idle) as f64 / hz,
                |(n, t)| n.saturating_sub(*t) as f64 / 1e9,
            );
            CpuShare {
                busy: (1.0 - idle / wall).clamp(0.0, 1.0),
                softirq: (now.softirq.saturating_sub(then.softirq) as f64 / hz / wall).clamp(0.0, 1.0),
            }
        };
        let foreign: u64 = self
            .foreign
            .iter()
            .map(|(pid, t)| t.saturating_sub(earlier.foreign.get(pid).copied().unwrap_or(0)))
            .sum();
        let secs = |now: u64, then: u64| now.saturating_sub(then) as f64 / 1e9;
        let per_cpu: Vec<CpuShare> = self
            .per_cpu
            .iter()
            .zip(&earlier.per_cpu)
            .enumerate()
            .map(share)
            .collect();
        let mut d = CpuDelta {
            foreign_secs: foreign as f64 / hz,
            busy_secs: per_cpu.iter().map(|c| c.busy * wall).sum(),
            total_secs: wall * per_cpu.len() as f64,
            per_cpu,
            generator_secs: secs(self.generator, earlier.generator),
            upstream_secs: secs(self.upstream, earlier.upstream),
            proxy_secs: secs(self.proxy, earlier.proxy),
            kernel_secs: 0.0,
        };
        d.kernel_secs = (d.ours() - d.generator_secs - d.upstream_secs - d.proxy_secs).max(0.0);
        d
    }
}

/// `/proc/meminfo` in bytes, by field name.
pub fn meminfo() -> HashMap<String, u64> {
    let text = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
            Some((name.to_owned(), kb * 1024))
        })
        .collect()
}

/// Memory the kernel holds for itself: slab caches (socket structures, epoll items, files),
/// kernel stacks and page tables, in bytes.
pub fn kernel_memory() -> u64 {
    let m = meminfo();
    ["Slab", "KernelStack", "PageTables"]
        .iter()
        .map(|k| m.get(*k).copied().unwrap_or(0))
        .sum()
}

/// Host memory that idle connections can hold, at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct MemSample {
    /// The proxy's RSS (0 for direct).
    pub proxy_rss: u64,
    /// Kernel memory: slab (sockets, psocks, epoll items, map elements), kernel stacks, page tables.
    pub kernel: u64,
    /// TCP buffer memory of the whole host (`/proc/net/sockstat`, `mem` pages).
    pub tcp_mem: u64,
    /// TCP sockets in use in the proxy's namespace (this thread's for direct).
    pub tcp_inuse: u64,
    /// Memory of the eBPF maps the proxy holds (the `memlock` of each map in its fdinfo).
    pub bpf_maps: u64,
}

/// `TCP: inuse N ... mem M` of a `sockstat` text: (inuse, mem in pages).
pub fn parse_sockstat(text: &str) -> (u64, u64) {
    let Some(line) = text.lines().find(|l| l.starts_with("TCP:")) else {
        return (0, 0);
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| {
        words
            .iter()
            .position(|w| *w == name)
            .and_then(|i| words.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("inuse"), field("mem"))
}

/// The `memlock` of every map the process holds a descriptor of, each map once: a process may
/// hold several descriptors of one map (wsproxy keeps copies for a successor process).
fn bpf_map_bytes(pid: u32) -> u64 {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    let infos = dir.flatten().filter_map(|e| fs::read_to_string(e.path()).ok());
    map_bytes(infos)
}

fn map_bytes(fdinfos: impl Iterator<Item = String>) -> u64 {
    let mut by_id = std::collections::HashMap::new();
    for t in fdinfos.filter(|t| t.contains("map_type:")) {
        let field = |name: &str| {
            t.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(bytes)) = (field("map_id:"), field("memlock:")) {
            by_id.insert(id, bytes);
        }
    }
    by_id.values().sum()
}

pub fn memory(proxy: Option<u32>) -> MemSample {
    let sockstat = match proxy {
        Some(pid) => fs::read_to_string(format!("/proc/{pid}/net/sockstat")),
        None => fs::read_to_string("/proc/thread-self/net/sockstat"),
    }
    .unwrap_or_default();
    let (inuse, pages) = parse_sockstat(&sockstat);
    MemSample {
        proxy_rss: proxy.and_then(|p| rss(p).ok()).unwrap_or(0),
        kernel: kernel_memory(),
        tcp_mem: pages * 4096,
        tcp_inuse: inuse,
        bpf_maps: proxy.map_or(0, bpf_map_bytes),
    }
}

/// Resident set size of a process (VmRSS), in bytes.
pub fn rss(pid: u32) -> Result<u64> {
    let status =
        fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading /proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let kb: u64 = rest.split_whitespace().next().unwrap_or("0").parse()?;
            return Ok(kb * 1024);
        }
    }
    bail!("no VmRSS in /proc/{pid}/status")
}

/// Pins the calling thread (and what it spawns later) to one CPU.
pub fn pin_self(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity(cpu {cpu}): {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Raises RLIMIT_NOFILE (soft and, as root, hard) so that 10,000 connections fit; children inherit it.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: want.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            let soft = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// First line of a command's output (stdout or stderr), or "unknown".
pub fn command_line(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("unknown")
                .trim()
                .to_owned()
        }
        Err(_) => "unknown".to_owned(),
    }
}

/// The first line of a command's output (stdout, then stderr) that contains `needle`, trimmed.
pub fn command_find(program: &str, args: &[&str], needle: &str) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    [out.stdout, out.stderr].iter().find_map(|text| {
        String::from_utf8_lossy(text)
            .lines()
            .find(|l| l.contains(needle))
            .map(|l| l.trim().to_owned())
    })
}

/// The facts printed at the top of the report.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub os: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
}

pub fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let os = fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_owned()))
        .unwrap_or_else(|| "unknown".into());
    Machine {
        cpu_model,
        // Not available_parallelism: the benchmark has pinned itself to one CPU by now.
        cpus: cpu_sample().per_cpu.len(),
        memory_gib: meminfo().get("MemTotal").copied().unwrap_or(0) as f64 / (1u64 << 30) as f64,
        kernel: command_line("uname", &["-srm"]),
        os,
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
    }
}

pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_held_through_two_descriptors_counts_once() {
        let map = |id: u32, bytes: u64| {
            format!("pos:\t0\nflags:\t02000002\nmap_type:\t2\nmemlock:\t{bytes}\nmap_id:\t{id}\n")
        };
        let infos = [
            map(7, 4096),
            map(7, 4096),
            map(9, 8192),
            "pos:\t0\nflags:\t02\n".to_owned(),
        ];
        assert_eq!(map_bytes(infos.into_iter()), 4096 + 8192);
    }

    #[test]
    fn stat_lines_give_busy_and_total_ticks() {
        let text =
            "cpu  100 5 50 1000 10 3 7 2 40 0\ncpu0 60 5 30 500 5 2 4 1 0 0\ncpu1 40 0 20 500 5 1 3 1 0 0\nintr 1\n";
        let s = parse_stat(text);
        assert_eq!(s.all.busy, 100 + 5 + 50 + 3 + 7);
        assert_eq!(s.all.total, 165 + 1000 + 10 + 2);
        assert_eq!(s.per_cpu.len(), 2);
        assert_eq!(s.per_cpu[1].busy, 64);
        assert_eq!(s.per_cpu[1].softirq, 3);
    }

    #[test]
    fn sockstat_gives_tcp_sockets_and_pages() {
        let text = "sockets: used 10\nTCP: inuse 7 orphan 0 tw 2 alloc 9 mem 123\nUDP: inuse 1 mem 4\n";
        assert_eq!(parse_sockstat(text), (7, 123));
        assert_eq!(parse_sockstat("nothing"), (0, 0));
    }

    #[test]
    fn process_ticks_skip_kernel_threads() {
        let user = "42 (a b) S 1 42 42 0 -1 4194560 10 0 0 0 7 3 2 1 20 0 1 0 5 0 0";
        assert_eq!(parse_proc_ticks(user), Some(7 + 3));
        let kthread = "9 (kworker/0:1) I 2 0 0 0 -1 69238880 0 0 0 0 5 5 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_proc_ticks(kthread), None);
    }
}
