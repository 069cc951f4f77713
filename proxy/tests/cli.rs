//! The `wsproxy` binary as an operator meets it: help, configuration checks, start-up failures,
//! log lines and signals.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;

use common::{BIN, DAEMON_DEADLINE, Daemon, free_port, temp_config};
use wsproxy_tests::request;

fn config_text(listen_port: u16, upstream: &str, extra: &str) -> String {
    format!(
        "[listen]\naddress = \"127.0.0.1:{listen_port}\"\n{extra}\n[upstreams]\nmain = [{{ address = \"{upstream}\" }}]\n\
         timeout = \"2s\"\n"
    )
}

fn send_and_read(port: u16, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DAEMON_DEADLINE)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn help_for_every_subcommand() {
    for sub in [&[][..], &["run"], &["check-config"], &["echo-server"]] {
        let out = Command::new(BIN).args(sub).arg("--help").output().unwrap();
        assert!(out.status.success(), "{sub:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"), "{sub:?}");
    }
}

#[test]
fn check_config_accepts_the_shipped_file() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/wsproxy.toml");
    let out = Command::new(BIN).args(["check-config", shipped]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn check_config_names_every_bad_field_and_exits_2() {
    let path = temp_config(
        "bad.toml",
        "[listen]\naddress = \"nope\"\n[limits]\nburst = 0\n[upstreams]\nmain = []\ntimeout = \"0s\"\n",
    );
    let out = Command::new(BIN)
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for field in ["listen.address", "limits.burst", "upstreams.main", "upstreams.timeout"] {
        assert!(err.contains(field), "{field} not named in:\n{err}");
    }
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
}

#[test]
fn missing_file_and_busy_port_are_one_clear_line() {
    let out = Command::new(BIN)
        .args(["run", "--config", "/nonexistent/wsproxy.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read the file") && !err.contains("panicked"),
        "{err}"
    );

    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let path = temp_config(
        "busy.toml",
        &config_text(port, "127.0.0.1:9", "[relay]\nmode = \"userspace\""),
    );
    let out = Command::new(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen on 127.0.0.1:{port}")), "{err}");
    assert!(err.contains("in use"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_each_handshake_outcome_and_stops_on_sigterm() {
    let echo_port = free_port();
    let mut echo = Daemon::start(&["echo-server", "--listen", &format!("127.0.0.1:{echo_port}")], None);
    echo.wait_for("echo server accepting connections").await;

    let port = free_port();
    let extra = "[relay]\nmode = \"userspace\"\n[handshake]\nheader_timeout = \"10s\"";
    let path = temp_config("run.toml", &config_text(port, &format!("127.0.0.1:{echo_port}"), extra));
    let mut proxy = Daemon::run(&path, None).await;

    let answer = send_and_read(port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let line = proxy.wait_for("handshake refused").await;
    assert!(
        line.contains("status=400") && line.contains("client=127.0.0.1"),
        "{line}"
    );

    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DAEMON_DEADLINE)).unwrap();
    s.write_all(request("/").as_bytes()).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    let line = proxy.wait_for("status=101").await;
    assert!(
        line.contains(&format!("upstream=127.0.0.1:{echo_port}")) && line.contains("duration_ms="),
        "{line}"
    );
    drop(s);
    let line = proxy.wait_for("connection closed").await;
    assert!(
        line.contains("relay=userspace") && line.contains("client_to_upstream="),
        "{line}"
    );

    assert!(proxy.terminate().await.success());
    assert!(echo.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_status_is_logged_and_nothing_forwarded() {
    // An upstream that answers 503 to anything.
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in upstream.incoming().take(1) {
            let mut s = s.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let port = free_port();
    let path = temp_config(
        "503.toml",
        &config_text(port, &up_addr.to_string(), "[relay]\nmode = \"userspace\""),
    );
    let mut proxy = Daemon::run_json(&path).await;
    let answer = send_and_read(port, request("/").as_bytes());
    assert_eq!(answer, "", "nothing of a failed upstream answer may reach the client");
    let line = proxy.wait_for("upstream refused the handshake").await;
    assert!(
        line.starts_with('{') && line.contains("\"upstream_status\":503"),
        "{line}"
    );
    assert!(proxy.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_relay_availability_is_logged_at_start() {
    let port = free_port();
    let path = temp_config(
        "auto.toml",
        &config_text(port, "127.0.0.1:9", "[relay]\nmode = \"auto\""),
    );
    let mut proxy = Daemon::start(&["run", "--config", path.to_str().unwrap()], None);
    let line = proxy.wait_for("kernel relay: ").await;
    assert!(
        line.contains("kernel relay: available") || line.contains("kernel relay: unavailable ("),
        "{line}"
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        assert!(
            line.contains("kernel relay: available"),
            "in CI the kernel relay must load: {line}"
        );
    }
    // SIGTERM is handled from the moment the proxy accepts (before that it ends the process).
    proxy.wait_for("accepting connections").await;
    assert!(proxy.terminate().await.success());
}
