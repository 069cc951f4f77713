//! The admin listener of the `wsproxy` binary (the in-process side is `tests/tests/admin.rs`,
//! descriptor limits are `emfile.rs`): `wsproxy reload` sends the token of `admin.token_file`;
//! the listener on a Unix socket (mode 0600, a stale file replaced, `/metrics` and `wsproxy
//! reload` over it, the file gone after SIGTERM); the WARN for an address beyond loopback
//! without a token.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;

use common::{Daemon, admin_tcp, admin_unix, free_port, reload_command, temp_config, temp_path};
use wsproxy_tests::echo_upstream;

const BEYOND_LOOPBACK: &str = "admin listener reachable beyond loopback without a token";

/// A configuration file `name` with this `[admin]` section body.
async fn config_file(name: &str, admin: &str) -> PathBuf {
    let up = echo_upstream().await;
    temp_config(
        name,
        &format!(
            "[listen]\naddress = \"127.0.0.1:{}\"\ndrain_timeout = \"1s\"\n[admin]\n{admin}\n\
             [relay]\nmode = \"userspace\"\n[upstreams]\nmain = [{{ address = \"{up}\" }}]\n",
            free_port()
        ),
    )
}

fn token_file(name: &str, token: &str) -> PathBuf {
    temp_config(name, &format!("{token}\n"))
}

fn request(method: &str, path: &str, headers: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wsproxy_reload_sends_the_token_of_its_configuration() {
    let port = free_port();
    let token = token_file("reload.token", "reload-t0ken");
    let with = config_file(
        "token.toml",
        &format!("address = \"127.0.0.1:{port}\"\ntoken_file = \"{}\"", token.display()),
    )
    .await;
    let mut d = Daemon::run(&with, None).await;
    d.wait_for("admin endpoints").await;

    let (code, out, err) = reload_command(&with).await;
    assert_eq!(code, Some(0), "wsproxy reload: {out}{err}\n{}", d.text());
    assert!(out.starts_with("reloaded"), "{out}");
    d.wait_for("configuration reloaded (admin endpoint)").await;

    // The same listener named by a file without the token: refused, and said so.
    let without = config_file("no-token.toml", &format!("address = \"127.0.0.1:{port}\"")).await;
    let (code, out, err) = reload_command(&without).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("answered 401"), "{err}");
    let host = format!("Host: 127.0.0.1:{port}\r\n");
    assert_eq!(admin_tcp(port, &request("POST", "/reload", &host)).await.0, 401);
    // A token file that cannot be read is the configuration's problem, named by its field.
    let broken = config_file(
        "broken-token.toml",
        &format!("address = \"127.0.0.1:{port}\"\ntoken_file = \"/nonexistent/wsproxy.token\""),
    )
    .await;
    let (code, _, err) = reload_command(&broken).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("admin.token_file"), "{err}");

    // On loopback with a token: no warning.
    assert_eq!(d.count(BEYOND_LOOPBACK), 0, "{}", d.text());
    let status = d.terminate().await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_admin_listener_of_the_binary() {
    let sock = temp_path("admin.sock");
    let _ = std::fs::remove_file(&sock);
    // Left by a proxy that did not stop cleanly.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let path = config_file("unix.toml", &format!("address = \"unix:{}\"", sock.display())).await;
    let mut d = Daemon::run(&path, None).await;
    d.wait_for("admin endpoints").await;
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let (code, body) = admin_unix(&sock, &request("GET", "/metrics", "Host: localhost\r\n")).await;
    assert_eq!(code, 200);
    assert!(
        body.contains("wsproxy_admin_refused_total{reason=\"host\"} 0"),
        "{body}"
    );
    let (code, out, err) = reload_command(&path).await;
    assert_eq!(
        code,
        Some(0),
        "wsproxy reload over the socket: {out}{err}\n{}",
        d.text()
    );
    assert!(out.starts_with("reloaded"), "{out}");
    // No TCP listener, so no warning.
    assert_eq!(d.count(BEYOND_LOOPBACK), 0, "{}", d.text());

    let status = d.terminate().await;
    assert!(status.success(), "exit status {status}");
    assert!(!sock.exists(), "the socket file is still there after the stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warning_when_the_admin_listener_is_beyond_loopback_without_a_token() {
    // Bound on every address, reached (by this test) on loopback only.
    let port = free_port();
    let path = config_file("anywhere.toml", &format!("address = \"0.0.0.0:{port}\"")).await;
    let mut d = Daemon::run(&path, None).await;
    d.wait_for("admin endpoints").await;
    d.wait_for(BEYOND_LOOPBACK).await;
    let warning = &d.seen.iter().find(|(_, l)| l.contains(BEYOND_LOOPBACK)).unwrap().1;
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains(&format!("0.0.0.0:{port}")), "{warning}");
    // The address a connection came to is its Host.
    let (code, _) = admin_tcp(
        port,
        &request("GET", "/healthz", &format!("Host: 127.0.0.1:{port}\r\n")),
    )
    .await;
    assert_eq!(code, 200);
    let status = d.terminate().await;
    assert!(status.success(), "exit status {status}");

    // With a token: no warning (a refused request is logged after where it would be).
    let token = token_file("anywhere.token", "anywhere-t0ken");
    let path = config_file(
        "anywhere-token.toml",
        &format!("address = \"0.0.0.0:{port}\"\ntoken_file = \"{}\"", token.display()),
    )
    .await;
    let mut d = Daemon::run(&path, None).await;
    d.wait_for("admin endpoints").await;
    let origin = format!("Host: 127.0.0.1:{port}\r\nOrigin: http://evil.example\r\n");
    assert_eq!(admin_tcp(port, &request("GET", "/healthz", &origin)).await.0, 403);
    d.wait_for("admin request refused").await;
    assert_eq!(d.count(BEYOND_LOOPBACK), 0, "{}", d.text());
    let status = d.terminate().await;
    assert!(status.success(), "exit status {status}");
}
