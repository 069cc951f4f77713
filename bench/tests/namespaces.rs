//! The benchmark's own network: a run sets its namespaces up over whatever an earlier run left,
//! an interrupted run (SIGINT) removes them, and `cleanup` is idempotent. Nothing of it is ever in
//! the host's namespace.
//!
//! Needs root (`ip netns`): with `CI=true` it fails without it; elsewhere it says it was skipped.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BENCH: &str = env!("CARGO_BIN_EXE_wsproxy-bench");

fn privileged() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the namespace test needs root (and CI=true)"
        );
        eprintln!("SKIPPED: the benchmark's namespace test needs root");
    }
    root
}

/// The benchmark's namespaces that exist now.
fn ours() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("wspb-"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names
}

/// Interfaces of the host's namespace whose name the benchmark uses.
fn host_links() -> Vec<String> {
    let out = Command::new("ip").args(["-o", "link"]).output().expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("wspb-"))
        .map(str::to_owned)
        .collect()
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20)); // poll interval of a deadline-bounded wait
    }
}

#[test]
fn an_interrupted_run_leaves_no_namespace_and_cleanup_is_idempotent() {
    if !privileged() {
        return;
    }
    // What a run killed with SIGKILL would leave: set-up must replace it.
    let _ = Command::new("ip").args(["netns", "add", "wspb-load"]).status();
    let out = std::env::temp_dir().join(format!("wsproxy-bench-ns-test-{}", std::process::id()));
    let mut child = Command::new(BENCH)
        .args([
            "run",
            "--quick",
            "--topologies",
            "veth",
            "--contenders",
            "direct",
            "--runs",
            "1",
        ])
        .args(["--only", "echo-1x128", "--wsproxy", BENCH, "--out"])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting wsproxy-bench");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Once the contenders are up, the namespaces and the veth pair exist.
    let start = Instant::now();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60).saturating_sub(start.elapsed()))
            .expect("the run said its contenders were up within 60 s");
        if line.contains("contenders up") {
            break;
        }
    }
    assert_eq!(ours(), ["wspb-load", "wspb-proxy"]);
    assert!(
        host_links().is_empty(),
        "a veth end in the host's namespace: {:?}",
        host_links()
    );

    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let mut status = None;
    wait_until("the run stops on SIGINT", Duration::from_secs(20), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    assert!(!status.unwrap().success(), "an interrupted run does not report success");
    assert_eq!(ours(), Vec::<String>::new(), "namespaces left after SIGINT");

    for _ in 0..2 {
        let o = Command::new(BENCH).arg("cleanup").output().unwrap();
        assert!(o.status.success(), "cleanup: {}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(ours(), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(out);
}
