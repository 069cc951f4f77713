//! A WebSocket echo server: `wsproxy echo-server --listen ADDR`. It answers every text and binary
//! message with the same message, which is all an operator needs to try a proxy set-up, and what
//! the shipped configuration and the tests put behind the proxy.

use std::future::Future;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::task::TaskTracker;
use tracing::debug;

/// Serves until `shutdown` completes.
pub async fn serve(listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let tasks = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tasks.spawn(async move {
                        if let Err(e) = echo(stream).await {
                            debug!(%peer, error = %e, "echo connection ended with an error");
                        }
                    });
                }
                // Out of descriptors and the like: retry shortly instead of spinning.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            },
        }
    }
}

async fn echo(stream: TcpStream) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let _ = stream.set_nodelay(true);
    let mut ws = tokio_tungstenite::accept_async(stream).await?;
    // The library answers a ping with a pong and a Close with a Close (echoing the code), but
    // only queues those replies: they are written by the following reads. So the loop reads on
    // after a Close until the stream ends (the close handshake is complete), instead of dropping
    // the socket with the reply unsent, which every client would see as an abnormal close (1006).
    while let Some(msg) = ws.next().await {
        if let m @ (Message::Text(_) | Message::Binary(_)) = msg? {
            ws.send(m).await?;
        }
    }
    Ok(())
}
