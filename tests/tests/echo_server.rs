//! The echo server behind `wsproxy echo-server` (`wsproxy::echo::serve`), the first thing a
//! newcomer puts behind the proxy: it echoes, answers pings, and completes the close handshake,
//! directly and through the proxy in both relay modes.

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsproxy_tests::daemon_kit::ServerProxy;
use wsproxy_tests::relay_kit::poll_until;
use wsproxy_tests::*;

/// Echo, ping, then Close(1000, "bye"): the answer must be a Close with code 1000, after which
/// the server ends the TCP stream with a FIN (a clean close, not 1006 or a reset).
async fn echo_ping_and_clean_close(mut ws: WebSocketStream<TcpStream>) {
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        within("the echo", ws.next()).await.unwrap().unwrap(),
        Message::text("hello")
    );
    ws.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
    assert_eq!(
        within("the pong", ws.next()).await.unwrap().unwrap(),
        Message::Pong(b"p".to_vec().into())
    );
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    match within("the close reply", ws.next()).await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal, "{frame:?}"),
        other => panic!("expected a Close frame with code 1000, got {other:?}"),
    }
    // The close handshake is complete: the library says so, and the server closes its side.
    assert!(within("the end of the stream", ws.next()).await.is_none());
    let mut tcp = ws.into_inner();
    let mut rest = Vec::new();
    let end = within("the server's FIN", tcp.read_to_end(&mut rest)).await;
    assert!(end.is_ok() && rest.is_empty(), "after the close: {end:?}, {rest:?}");
}

#[tokio::test]
async fn echo_server_answers_close_with_close_and_ends_cleanly() {
    let echo = echo_upstream().await;
    let stream = connect_from(client_ip(1), echo).await;
    let (ws, _) = within(
        "a handshake",
        tokio_tungstenite::client_async(format!("ws://{echo}/"), stream),
    )
    .await
    .unwrap();
    echo_ping_and_clean_close(ws).await;
}

#[tokio::test]
async fn echo_server_close_handshake_completes_through_the_proxy_in_both_relay_modes() {
    let echo = echo_upstream().await;
    for (n, mode) in ["userspace", "kernel"].into_iter().enumerate() {
        let Some(p) = ServerProxy::in_mode(mode, echo, "").await else {
            continue;
        };
        let ws = ws_connect(client_ip(10 + n as u32), p.addr).await.unwrap();
        echo_ping_and_clean_close(ws).await;
        // The connection was carried by the relay asked for (index: kernel 0, userspace 1).
        let ended = poll_until(DEADLINE, || {
            let t = p.server.totals();
            (t.ended.iter().sum::<u64>() == 1).then_some(t)
        })
        .await
        .unwrap_or_else(|| panic!("{mode}: the relayed connection did not end: {:?}", p.server.totals()));
        let mut want = [0, 0];
        want[if mode == "kernel" { 0 } else { 1 }] = 1;
        assert_eq!((ended.ended, ended.fallbacks), (want, 0), "{mode}: {ended:?}");
        p.stop().await;
    }
}
