//! The upstream every contender forwards to: a WebSocket server on one thread.
//!
//! - `/echo` (and any other path): every data message is sent back as it came.
//! - `/sink`: binary messages are counted and dropped; a text message `END` is answered with the
//!   number of payload bytes received since the last `END`, as text.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

use crate::load::ws_config;

pub fn run(listen: SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(serve(listen))
}

async fn serve(listen: SocketAddr) -> Result<()> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(listen).with_context(|| format!("binding {listen}"))?;
    let listener: TcpListener = socket.listen(4096)?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and the like: wait a little instead of spinning.
                eprintln!("upstream: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = connection(stream).await {
                // Peers that vanish are normal in a benchmark; a protocol error is not.
                if !matches!(
                    e.downcast_ref::<tokio_tungstenite::tungstenite::Error>(),
                    Some(tokio_tungstenite::tungstenite::Error::Io(_))
                        | Some(tokio_tungstenite::tungstenite::Error::ConnectionClosed)
                ) {
                    eprintln!("upstream: connection failed: {e:#}");
                }
            }
        });
    }
}

// The handshake callback's error type is tungstenite's, large or not.
#[allow(clippy::result_large_err)]
async fn connection(stream: TcpStream) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut path = String::new();
    let callback = |req: &Request, resp: Response| {
        path = req.uri().path().to_owned();
        Ok(resp)
    };
    let mut ws = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config(false))).await?;
    if path == "/sink" {
        let mut total: u64 = 0;
        while let Some(msg) = ws.next().await {
            match msg? {
                Message::Binary(b) => total += b.len() as u64,
                Message::Text(t) if t.as_str() == "END" => {
                    ws.send(Message::text(total.to_string())).await?;
                    total = 0;
                }
                _ => {}
            }
        }
    } else {
        while let Some(msg) = ws.next().await {
            if let m @ (Message::Binary(_) | Message::Text(_)) = msg? {
                ws.send(m).await?;
            }
        }
    }
    Ok(())
}
