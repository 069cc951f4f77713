//! `cargo xtask cluster`: a fleet to try. A Redis server (Debian's `redis-server`, installed by
//! the set-up) on 127.0.0.1:6390, three wsproxy nodes on 127.0.0.11, .12 and .13 (port 8080,
//! admin on 9090) sharing cluster limits in it, and two echo upstreams, supervised like `run`:
//! how to try it is printed once every node says it is ready; Ctrl-C stops everything (so does
//! any child that ends on its own, with the reason).
//!
//! The nodes' files and Redis's directory are written under `target/cluster/`, anew each time.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::run::{POLL, Proc, Readiness, SIGNALS, catch_signals, stop_all};

pub const REDIS: &str = "127.0.0.1:6390";
pub const NODES: [&str; 3] = ["127.0.0.11", "127.0.0.12", "127.0.0.13"];
pub const UPSTREAMS: [&str; 2] = ["127.0.0.1:9011", "127.0.0.1:9012"];
/// The fleet's shared limits, small enough to meet by hand.
const CAP: u32 = 4;
const RATE: f64 = 5.0;
const BURST: u32 = 10;
/// How long Redis gets to accept connections.
const REDIS_START: Duration = Duration::from_secs(10);

/// A node's configuration file.
pub fn node_config(ip: &str) -> String {
    let [a, b] = UPSTREAMS;
    format!(
        r#"# Written by `cargo xtask cluster`: one node of a fleet of three sharing cluster limits in
# Redis on {REDIS}. Every node has the same [cluster] and [upstreams] sections: the same
# upstreams and weights give a client the same upstream on every node.
[listen]
address = "{ip}:8080"
drain_timeout = "2s"

[admin]
address = "{ip}:9090"

[limits]
# The node's own limits, the first line: more than the fleet allows a client.
requests_per_second = 50.0
burst = 100
max_connections_per_ip = 64

[cluster]
url = "redis://{REDIS}/"
key_prefix = "wsproxy-demo"
requests_per_second = {RATE:?}
burst = {BURST}
max_connections_per_ip = {CAP}
lease_ttl = "6s"
timeout = "5ms"
on_store_error = "allow"

[upstreams]
main = [{{ address = "{a}" }}, {{ address = "{b}" }}]
"#
    )
}

pub fn cluster(root: &Path, binary: &Path) -> Result<ExitCode> {
    let dir = root.join("target").join("cluster");
    let _ = std::fs::remove_dir_all(&dir);
    let redis_dir = dir.join("redis");
    std::fs::create_dir_all(&redis_dir).with_context(|| format!("creating {}", redis_dir.display()))?;
    let mut files = Vec::new();
    for (i, ip) in NODES.iter().enumerate() {
        let path = dir.join(format!("node-{}.toml", i + 1));
        std::fs::write(&path, node_config(ip)).with_context(|| format!("writing {}", path.display()))?;
        files.push(path);
    }
    catch_signals();
    let notify = Readiness::bind()?;
    let mut procs = Vec::new();
    let outcome = start_all(root, binary, &redis_dir, &files, &notify, &mut procs).and_then(|ready| {
        if ready {
            print_usage(&dir);
        }
        supervise(&mut procs)
    });
    stop_all(&mut procs)?;
    outcome?;
    Ok(ExitCode::SUCCESS)
}

/// Redis first (waited for), then the upstreams, then the nodes; true once every node said
/// READY=1, false when a signal or a child's end came first (`supervise` reports it).
fn start_all(
    root: &Path,
    binary: &Path,
    redis_dir: &Path,
    files: &[std::path::PathBuf],
    notify: &Readiness,
    procs: &mut Vec<Proc>,
) -> Result<bool> {
    let redis: SocketAddr = REDIS.parse()?;
    let port = redis.port().to_string();
    let ip = redis.ip().to_string();
    let dir = redis_dir.to_str().context("a Redis directory that is UTF-8")?;
    let args = [
        "--bind",
        &ip,
        "--port",
        &port,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        dir,
        "--loglevel",
        "warning",
    ];
    procs.push(Proc::spawn(
        format!("redis-server {REDIS}"),
        Path::new("redis-server"),
        &args,
        &[],
        root,
    )?);
    let started = Instant::now();
    while TcpStream::connect_timeout(&redis, POLL).is_err() {
        if SIGNALS.load(Ordering::SeqCst) > 0 || procs[0].poll()? {
            return Ok(false);
        }
        if started.elapsed() > REDIS_START {
            bail!("redis-server did not accept connections on {REDIS} within {REDIS_START:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    for addr in UPSTREAMS {
        procs.push(Proc::spawn(
            format!("echo upstream {addr}"),
            binary,
            &["echo-server", "--listen", addr],
            &[],
            root,
        )?);
    }
    for (ip, file) in NODES.iter().zip(files) {
        let file = file.to_str().context("a configuration path that is UTF-8")?;
        let envs = [("NOTIFY_SOCKET", notify.path.as_path())];
        procs.push(Proc::spawn(
            format!("wsproxy {ip}:8080"),
            binary,
            &["run", "--config", file],
            &envs,
            root,
        )?);
    }
    crate::run::wait_ready(procs, notify, NODES.len())
}

fn print_usage(dir: &Path) {
    let [n1, n2, n3] = NODES;
    println!();
    println!("A fleet of three wsproxy nodes, {n1}:8080, {n2}:8080 and {n3}:8080 (admin on :9090),");
    println!(
        "sharing cluster limits in Redis on {REDIS}, in front of echo upstreams {} and {}.",
        UPSTREAMS[0], UPSTREAMS[1]
    );
    println!(
        "Their files are in {}. It is ready. Talk to any node (type a line, see it echoed):",
        dir.display()
    );
    println!("  python3 -m websockets ws://{n1}:8080/");
    println!("A client may hold {CAP} connections across the fleet, and open {RATE} a second ({BURST} at once): keep");
    println!("{CAP} of those open, on any nodes, and a fifth is refused with 429 on every node:");
    println!(
        "  curl -si -H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' \
         -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' http://{n3}:8080/ | head -1"
    );
    println!("The leases and rate state, in Redis:");
    println!("  redis-cli -p 6390 --scan --pattern 'wsproxy-demo:*'");
    println!("What a node counts (store latency and errors, refusals, leases):");
    println!("  curl -s http://{n1}:9090/metrics | grep wsproxy_cluster");
    println!("Ctrl-C here stops the nodes, the upstreams and Redis.");
    println!();
}

/// Waits until a signal arrives or a child ends (an error, naming it).
fn supervise(procs: &mut [Proc]) -> Result<()> {
    loop {
        if SIGNALS.load(Ordering::SeqCst) > 0 {
            return Ok(());
        }
        for proc in procs.iter_mut() {
            if proc.poll()? {
                let status = proc.status.expect("polled");
                bail!("{} exited ({status}); stopped the others", proc.name);
            }
        }
        thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_shares_the_store_and_the_upstreams() {
        for ip in NODES {
            let text = node_config(ip);
            assert!(text.contains(&format!("address = \"{ip}:8080\"")), "{text}");
            assert!(text.contains(&format!("address = \"{ip}:9090\"")), "{text}");
            assert!(text.contains(&format!("url = \"redis://{REDIS}/\"")), "{text}");
            let shared = |t: &str| t[t.find("\n[cluster]").unwrap()..].to_string();
            assert_eq!(shared(&text), shared(&node_config(NODES[0])));
        }
    }
}
