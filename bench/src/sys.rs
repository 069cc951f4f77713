//! What the benchmark reads from and sets on the machine: `/proc/stat` CPU time, `/proc/meminfo`,
//! a process's RSS, CPU affinity, the file-descriptor limit, and the facts for the report header.

use std::collections::HashMap;
use std::fs;
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

/// Busy and total clock ticks of one CPU line of `/proc/stat`.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct Ticks {
    pub busy: u64,
    pub total: u64,
}

/// The whole machine and each CPU, from `/proc/stat`, and the CPU time of every process that is
/// not part of the benchmark (by pid, clock ticks), to tell how much of the machine others used.
#[derive(Debug, Clone, Default)]
pub struct CpuSample {
    pub all: Ticks,
    pub per_cpu: Vec<Ticks>,
    pub foreign: HashMap<u32, u64>,
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
        if let Some(t) = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .as_deref()
            .and_then(parse_proc_ticks)
        {
            out.insert(pid, t);
        }
    }
    out
}

/// CPU time spent between two samples.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct CpuDelta {
    /// Busy seconds of all CPUs together (user, nice, system, irq, softirq; not idle, iowait, steal).
    pub busy_secs: f64,
    /// Wall seconds times the number of CPUs, as the kernel counted them.
    pub total_secs: f64,
    /// Busy fraction of each CPU (0..=1).
    pub per_cpu_busy: Vec<f64>,
    /// CPU seconds of processes that are not part of the benchmark (other users of the machine):
    /// growth of those alive at both ends, plus all of those that started in between.
    #[serde(default)]
    pub foreign_secs: f64,
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
    Ticks { busy, total }
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
    let foreign = foreign_ticks();
    let mut s = parse_stat(&fs::read_to_string("/proc/stat").unwrap_or_default());
    s.foreign = foreign;
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
        let frac = |now: &Ticks, then: &Ticks| {
            let total = now.total.saturating_sub(then.total);
            if total == 0 {
                0.0
            } else {
                now.busy.saturating_sub(then.busy) as f64 / total as f64
            }
        };
        let foreign: u64 = self
            .foreign
            .iter()
            .map(|(pid, t)| t.saturating_sub(earlier.foreign.get(pid).copied().unwrap_or(0)))
            .sum();
        CpuDelta {
            foreign_secs: foreign as f64 / hz,
            busy_secs: self.all.busy.saturating_sub(earlier.all.busy) as f64 / hz,
            total_secs: self.all.total.saturating_sub(earlier.all.total) as f64 / hz,
            per_cpu_busy: self
                .per_cpu
                .iter()
                .zip(&earlier.per_cpu)
                .map(|(n, t)| frac(n, t))
                .collect(),
        }
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
    fn stat_lines_give_busy_and_total_ticks() {
        let text =
            "cpu  100 5 50 1000 10 3 7 2 40 0\ncpu0 60 5 30 500 5 2 4 1 0 0\ncpu1 40 0 20 500 5 1 3 1 0 0\nintr 1\n";
        let s = parse_stat(text);
        assert_eq!(s.all.busy, 100 + 5 + 50 + 3 + 7);
        assert_eq!(s.all.total, 165 + 1000 + 10 + 2);
        assert_eq!(s.per_cpu.len(), 2);
        assert_eq!(s.per_cpu[1].busy, 64);
    }

    #[test]
    fn process_ticks_skip_kernel_threads() {
        let user = "42 (a b) S 1 42 42 0 -1 4194560 10 0 0 0 7 3 2 1 20 0 1 0 5 0 0";
        assert_eq!(parse_proc_ticks(user), Some(7 + 3));
        let kthread = "9 (kworker/0:1) I 2 0 0 0 -1 69238880 0 0 0 0 5 5 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_proc_ticks(kthread), None);
    }
}
