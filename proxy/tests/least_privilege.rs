//! The daemon needs no more than CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and CAP_NET_BIND_SERVICE, drops them
//! after start-up, and still relays in the kernel; the shipped systemd unit is valid and grants
//! exactly those.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{BIN, free_port};
use wsproxy_tests::relay_kit::poll_every_blocking;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/wsproxy.service");
const DEADLINE: Duration = Duration::from_secs(20);

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Fails in CI, skips with a message elsewhere.
fn cannot_run(why: &str) {
    assert!(!in_ci(), "{why}");
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

#[test]
fn unit_file_grants_exactly_four_capabilities_and_verifies() {
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}="))
    };
    assert_eq!(value("Type"), "notify");
    for key in ["AmbientCapabilities", "CapabilityBoundingSet"] {
        let mut caps: Vec<&str> = value(key).split_whitespace().collect();
        caps.sort();
        assert_eq!(
            caps,
            ["CAP_BPF", "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_PERFMON"],
            "{key}"
        );
    }
    assert_eq!(value("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_ne!(value("User"), "root");

    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        return cannot_run("systemd-analyze is not installed: the unit was not verified");
    };
    assert!(out.status.success());
    // Verify a copy that points at the binary just built (the unit names the installed path).
    let dir = std::env::temp_dir().join(format!("wsproxy-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("wsproxy.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/wsproxy", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = err.lines().filter(|l| l.contains("wsproxy.service")).collect();
    assert!(
        out.status.success() && problems.is_empty(),
        "systemd-analyze verify:\n{err}"
    );
}

#[test]
fn runs_as_nobody_with_four_capabilities_then_drops_them_and_relays_in_the_kernel() {
    if Command::new("setpriv").arg("--version").output().is_err() {
        return cannot_run("setpriv (util-linux) is not installed");
    }
    // A raw echo upstream that answers the handshake (run by the test, not the proxy).
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = upstream.accept().unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).unwrap() == 0 {
                return;
            }
            head.push(b[0]);
        }
        let text = String::from_utf8_lossy(&head).to_string();
        let key = text
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap()
            .trim()
            .to_string();
        let accept = wsproxy::upstream::accept_key(&key);
        let r = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        s.write_all(r.as_bytes()).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => s.write_all(&buf[..n]).unwrap(),
            }
        }
    });

    let (port, admin) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("wsproxy-nobody-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("wsproxy.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\naddress = \"127.0.0.1:{port}\"\n[admin]\naddress = \"127.0.0.1:{admin}\"\n\
             [relay]\nmode = \"kernel\"\n[upstreams]\nmain = [{{ address = \"{up_addr}\" }}]\n"
        ),
    )
    .unwrap();
    let caps = "+bpf,+net_admin,+perfmon,+net_bind_service";
    let mut child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps=-all,{caps}"))
        .arg(format!("--ambient-caps=-all,{caps}"))
        .arg(format!("--bounding-set=-all,{caps}"))
        .arg(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, lines) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut seen = Vec::new();
    let end = Instant::now() + DEADLINE;
    while !seen.iter().any(|l: &String| l.contains("accepting connections")) {
        match lines.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(l) => seen.push(l),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().unwrap();
                let log = seen.join("\n");
                if log.contains("kernel relay: unavailable") && !in_ci() {
                    return cannot_run(&format!("kernel relay unavailable here:\n{log}"));
                }
                panic!("wsproxy as nobody did not start ({status}):\n{log}");
            }
        }
    }
    let log = seen.join("\n");
    assert!(log.contains("kernel relay: available"), "{log}");
    assert!(
        log.contains("privileges: dropped every capability after start-up"),
        "{log}"
    );
    assert!(
        log.contains("CAP_BPF") && !log.contains("CAP_SYS_ADMIN"),
        "held more than it needs: {log}"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for set in ["CapEff", "CapPrm", "CapAmb"] {
        let line = status.lines().find(|l| l.starts_with(set)).unwrap();
        assert!(line.ends_with("0000000000000000"), "{line}");
    }

    // Relays in the kernel with no capability left.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "closed during the handshake");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    s.write_all(&payload).unwrap();
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).unwrap();
    assert!(back == payload, "echo differs");
    drop(s);

    // The admin listener reports the connection as relayed and ended in the kernel.
    // The counters raise no event: polled, within the deadline.
    let scrape = || {
        let mut a = TcpStream::connect(("127.0.0.1", admin)).unwrap();
        // The admin listener serves only requests whose Host is its address.
        a.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{admin}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let mut text = String::new();
        a.read_to_string(&mut text).unwrap();
        text
    };
    let ended = "wsproxy_connections_ended_total{service=\"default\",relay=\"kernel\",end=\"closed\"} 1";
    let text = poll_every_blocking(DEADLINE, Duration::from_millis(20), || {
        Some(scrape()).filter(|t| t.contains(ended))
    })
    .unwrap_or_else(|| panic!("the connection never ended as a kernel-relayed one:\n{}", scrape()));
    for reason in ["peer_closed", "refused"] {
        let none = format!("wsproxy_relay_fallbacks_total{{reason=\"{reason}\"}} 0");
        assert!(text.contains(&none), "{text}");
    }
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let st = common::wait_exit(&mut child, DEADLINE).expect("no exit after SIGTERM");
    assert!(st.success(), "{st}");
}
