//! Where the benchmark's processes sit on the network, and the set-up and teardown of the network
//! namespaces that put them there.
//!
//! - `loopback`: everything in the host's namespace, on 127.0.0.1.
//! - `veth`: the load generator and the upstream in namespace `wspb-load`, every proxy in
//!   `wspb-proxy`, joined by one veth pair; no receive steering, so the kernel's receive work
//!   (softirq, the sockmap verdict, the psock worker) runs on the CPU of whoever sent the packet.
//! - `veth-rps`: the same, with RPS sending each veth end's receive work to its own side's CPU
//!   (the load end to CPU 0, the proxy end to CPU 1), as a NIC's per-queue interrupts would.
//!
//! The addresses exist only inside those two namespaces (both veth ends are in them; nothing is
//! added to the host's namespace). Set-up removes what an earlier, interrupted run left; teardown
//! runs on drop, on SIGINT/SIGTERM, from the watchdog, and from `wsproxy-bench cleanup`.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd as _;
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

/// Every name the benchmark creates starts with this, so that cleanup finds exactly its own.
pub const PREFIX: &str = "wspb-";
const LOAD_NS: &str = "wspb-load";
const PROXY_NS: &str = "wspb-proxy";
const LOAD_DEV: &str = "wspb-l";
const PROXY_DEV: &str = "wspb-p";
const LOAD_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const PROXY_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// RPS masks: the load end's receive work on CPU 0, the proxy end's on CPU 1.
const LOAD_RPS: &str = "1";
const PROXY_RPS: &str = "2";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    Loopback,
    Veth,
    VethRps,
}

impl Topology {
    pub const ALL: [Topology; 3] = [Topology::Veth, Topology::VethRps, Topology::Loopback];

    pub fn name(self) -> &'static str {
        match self {
            Topology::Loopback => "loopback",
            Topology::Veth => "veth",
            Topology::VethRps => "veth-rps",
        }
    }

    pub fn from_name(name: &str) -> Option<Topology> {
        Topology::ALL.into_iter().find(|t| t.name() == name)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Topology::Loopback => {
                "generator, upstream and proxy on 127.0.0.1 in one namespace; the receive softirq runs on the sender's \
                 CPU, so relaying work done in the kernel lands on whichever CPU sent the packet"
            }
            Topology::Veth => {
                "generator and upstream in one network namespace (CPU 0), the proxy in another (CPU 1), joined by a veth \
                 pair, no receive steering: a packet's receive work runs on the CPU that sent it"
            }
            Topology::VethRps => {
                "as veth, with RPS steering each veth end's receive work to its own side's CPU (load end to CPU 0, \
                 proxy end to CPU 1); on this VM every steered packet costs an inter-processor interrupt"
            }
        }
    }
}

/// The network of one topology, up while this value lives.
pub struct Net {
    topology: Topology,
    /// The namespace this thread was in before `enter_load`.
    home: File,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn in_ns(ns: &str, script: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", script])
        .output()
        .context("running ip netns exec")?;
    if !out.status.success() {
        bail!("in {ns}: {script}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The namespaces the benchmark made (by their names), whoever made them.
fn ours() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_owned)
        .collect()
}

/// Removes every namespace the benchmark made (and with them the veth pair). Idempotent.
pub fn cleanup() -> Result<()> {
    for ns in ours() {
        ip(&["netns", "del", &ns])?;
        println!("bench: removed network namespace {ns}");
    }
    Ok(())
}

/// On SIGINT or SIGTERM: tear the namespaces down, then exit (the children die with us through
/// `PR_SET_PDEATHSIG`).
pub fn cleanup_on_signals() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            eprintln!("bench: signal {sig}: removing network namespaces and stopping");
            let _ = cleanup();
            std::process::exit(128 + sig);
        }
    });
    Ok(())
}

fn setns(f: &File) -> Result<()> {
    // SAFETY: a valid namespace fd; setns changes only the calling thread's namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Net {
    pub fn up(topology: Topology) -> Result<Net> {
        let home = File::open("/proc/thread-self/ns/net").context("opening this thread's network namespace")?;
        if topology != Topology::Loopback {
            cleanup()?;
            let net = Net { topology, home };
            // From here on, a failure drops `net`, which removes what was made.
            net.make()?;
            return Ok(net);
        }
        Ok(Net { topology, home })
    }

    fn make(&self) -> Result<()> {
        let l = format!("{LOAD_IP}/24");
        let p = format!("{PROXY_IP}/24");
        ip(&["netns", "add", LOAD_NS])?;
        ip(&["netns", "add", PROXY_NS])?;
        // Created inside the load namespace, its peer moved straight into the proxy's: neither
        // end ever exists in the host's namespace.
        ip(&[
            "-n", LOAD_NS, "link", "add", LOAD_DEV, "type", "veth", "peer", "name", PROXY_DEV, "netns", PROXY_NS,
        ])?;
        for (ns, dev, addr) in [(LOAD_NS, LOAD_DEV, &l), (PROXY_NS, PROXY_DEV, &p)] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        let rps = |ns: &str, dev: &str, mask: &str| {
            in_ns(ns, &format!("echo {mask} > /sys/class/net/{dev}/queues/rx-0/rps_cpus"))
        };
        // Each namespace starts with the kernel's defaults: a proxy's connections to the one
        // upstream address and the generator's to each proxy would run out of ephemeral ports
        // (TIME_WAIT from the handshake workload), which the host's loopback avoids through
        // tcp_tw_reuse = 2 (loopback only). Reuse, and a wider range below the listeners' ports.
        for ns in [LOAD_NS, PROXY_NS] {
            in_ns(
                ns,
                "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse && echo '25000 65000' > /proc/sys/net/ipv4/ip_local_port_range",
            )?;
        }
        let (lm, pm) = if self.topology == Topology::VethRps {
            (LOAD_RPS, PROXY_RPS)
        } else {
            ("0", "0")
        };
        rps(LOAD_NS, LOAD_DEV, lm)?;
        rps(PROXY_NS, PROXY_DEV, pm)?;
        Ok(())
    }

    pub fn topology(&self) -> Topology {
        self.topology
    }

    fn netns(&self, name: &'static str) -> Option<&'static str> {
        (self.topology != Topology::Loopback).then_some(name)
    }

    /// The namespace of the generator and the upstream (None: the host's).
    pub fn load_ns(&self) -> Option<&'static str> {
        self.netns(LOAD_NS)
    }

    /// The namespace of the proxies (None: the host's).
    pub fn proxy_ns(&self) -> Option<&'static str> {
        self.netns(PROXY_NS)
    }

    pub fn load_ip(&self) -> IpAddr {
        match self.topology {
            Topology::Loopback => Ipv4Addr::LOCALHOST.into(),
            _ => LOAD_IP.into(),
        }
    }

    pub fn proxy_ip(&self) -> IpAddr {
        match self.topology {
            Topology::Loopback => Ipv4Addr::LOCALHOST.into(),
            _ => PROXY_IP.into(),
        }
    }

    /// Moves the calling thread (the load generator) into the load namespace.
    pub fn enter_load(&self) -> Result<()> {
        if let Some(ns) = self.load_ns() {
            let f = File::open(format!("/run/netns/{ns}")).with_context(|| format!("opening namespace {ns}"))?;
            setns(&f)?;
        }
        Ok(())
    }

    /// Moves the calling thread back to where it was before `enter_load`.
    pub fn leave(&self) -> Result<()> {
        setns(&self.home)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if self.topology != Topology::Loopback {
            let _ = self.leave();
            if let Err(e) = cleanup() {
                eprintln!("bench: removing the network namespaces: {e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in Topology::ALL {
            assert_eq!(Topology::from_name(t.name()), Some(t));
        }
        assert_eq!(serde_json::to_string(&Topology::VethRps).unwrap(), "\"veth-rps\"");
    }
}
