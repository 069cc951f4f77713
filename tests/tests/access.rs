//! `[access]` from outside: client networks allowed and denied, and an `Origin` allow-list; a
//! refused client gets 403 and no upstream is contacted.

use tokio::io::AsyncWriteExt;
use wsproxy_tests::exposition::Exposition;
use wsproxy_tests::*;

/// The status a request with `extra` header lines from `client_ip(n)` gets.
async fn status_for(proxy: std::net::SocketAddr, n: u32, extra: &str) -> u16 {
    let req = request("/").replace("Host: test\r\n", &format!("Host: test\r\n{extra}"));
    let mut s = connect_from(client_ip(n), proxy).await;
    s.write_all(req.as_bytes()).await.unwrap();
    status(&read_head(&mut s).await)
}

#[tokio::test]
async fn denied_and_unlisted_networks_get_403_before_any_upstream() {
    let up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    // client_ip(n) is 127.16.0.n: allow .0/24 but deny .8/29 (.8 to .15).
    let extra = "[access]\nallow = [\"127.16.0.0/24\"]\ndeny = [\"127.16.0.8/29\"]\n";
    let proxy = Proxy::start(&config(&[up.addr], &[], extra)).await;
    assert_eq!(status_for(proxy.addr, 1, "").await, 101);
    assert_eq!(status_for(proxy.addr, 9, "").await, 403, "denied");
    assert_eq!(status_for(proxy.addr, 256, "").await, 403, "127.16.1.0: not allowed");
    assert_eq!(up.accepted(), 1, "only the allowed client reached the upstream");
    let m = Exposition::parse(&proxy.server.metrics_text());
    assert_eq!(
        m.value("wsproxy_handshakes_total", &[("outcome", "refused"), ("status", "403")]),
        2.0
    );
    proxy.stop().await;
}

#[tokio::test]
async fn an_origin_allow_list_refuses_other_pages_and_requests_without_one() {
    let up = Upstream::start(Script::Upgrade { after: vec![] }).await;
    let extra = "[access]\norigins = [\"https://chat.example.com\", \"https://m.example.com:8443\"]\n";
    let proxy = Proxy::start(&config(&[up.addr], &[], extra)).await;
    for (origin, want) in [
        ("Origin: https://chat.example.com\r\n", 101),
        ("Origin: HTTPS://M.EXAMPLE.COM:8443\r\n", 101),
        ("Origin: https://evil.example\r\n", 403),
        ("Origin: https://chat.example.com:443\r\n", 403),
        ("", 403),
    ] {
        assert_eq!(status_for(proxy.addr, 1, origin).await, want, "{origin:?}");
    }
    assert_eq!(up.accepted(), 2);
    proxy.stop().await;
}
