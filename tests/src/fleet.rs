//! WebSocket clients (tokio-tungstenite) that talk through the proxy: one echo checked, a clean
//! close, and a fleet of connections exchanging numbered messages in rounds the test starts, so a
//! test can reload, signal or stop the proxy between rounds and prove no connection noticed.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::{client_ip, within, ws_connect};

/// Messages each connection sends (and checks the echo of) per round.
pub const PER_ROUND: usize = 5;
/// The round number that tells every connection to close.
const STOP: usize = usize::MAX;

/// Sends a text message and checks its echo.
pub async fn echo_check(ws: &mut WebSocketStream<TcpStream>, text: &str) {
    within("a send", ws.send(Message::text(text))).await.unwrap();
    match within("an echo", ws.next()).await {
        Some(Ok(Message::Text(t))) if t.as_str() == text => {}
        other => panic!("expected the echo of {text:?}, got {other:?}"),
    }
}

/// Closes a WebSocket cleanly (Close sent, the peer's Close and EOF read) and drops it.
pub async fn ws_close(mut ws: WebSocketStream<TcpStream>) {
    within("the close", ws.close(None)).await.unwrap();
    while let Some(Ok(_)) = within("the close", ws.next()).await {}
}

/// What a connection reports after a round: (connection, round, outcome).
type Report = (usize, usize, Result<(), String>);

/// WebSockets that exchange numbered messages one round at a time: each round every connection
/// sends [`PER_ROUND`] messages and checks every echo.
pub struct Fleet {
    rounds: watch::Sender<usize>,
    done: mpsc::UnboundedReceiver<Report>,
    tasks: Vec<JoinHandle<Result<usize, String>>>,
}

impl Fleet {
    /// `n` connections to `proxy`, from the client addresses `client_ip(first_ip ..)`.
    pub async fn open(proxy: SocketAddr, n: usize, first_ip: u32) -> Fleet {
        let (rounds, round_rx) = watch::channel(0usize);
        let (done_tx, done) = mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for i in 0..n {
            let ws = ws_connect(client_ip(first_ip + i as u32), proxy)
                .await
                .unwrap_or_else(|e| panic!("ws {i}: {e}"));
            tasks.push(tokio::spawn(talk(i, ws, round_rx.clone(), done_tx.clone())));
        }
        Fleet { rounds, done, tasks }
    }

    pub fn start_round(&self, r: usize) {
        self.rounds.send(r).unwrap();
    }

    /// Waits for every connection's report of round `r`; fails the test on any failure.
    pub async fn finish_round(&mut self, r: usize) {
        for _ in 0..self.tasks.len() {
            let (i, got, res) = within("a round's reports", self.done.recv()).await.unwrap();
            assert_eq!(got, r, "connection {i} reported another round");
            if let Err(e) = res {
                panic!("connection {i}, round {r}: {e}");
            }
        }
    }

    pub async fn round(&mut self, r: usize) {
        self.start_round(r);
        self.finish_round(r).await;
    }

    /// Ends every connection; returns the messages each exchanged.
    pub async fn close(self) -> Vec<usize> {
        self.rounds.send(STOP).unwrap();
        let mut out = Vec::new();
        for (i, t) in self.tasks.into_iter().enumerate() {
            out.push(
                within("a connection to end", t)
                    .await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("connection {i}: {e}")),
            );
        }
        out
    }
}

async fn talk(
    i: usize,
    mut ws: WebSocketStream<TcpStream>,
    mut rounds: watch::Receiver<usize>,
    done: mpsc::UnboundedSender<Report>,
) -> Result<usize, String> {
    let mut next = 0usize;
    loop {
        if rounds.changed().await.is_err() {
            return Err("the test went away".into());
        }
        let r = *rounds.borrow_and_update();
        if r == STOP {
            break;
        }
        let res = async {
            for k in next..next + PER_ROUND {
                ws.send(Message::text(format!("conn {i} msg {k}")))
                    .await
                    .map_err(|e| format!("send {k}: {e}"))?;
            }
            for k in next..next + PER_ROUND {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) if t.as_str() == format!("conn {i} msg {k}") => {}
                    other => return Err(format!("message {k}: got {other:?}")),
                }
            }
            Ok(())
        }
        .await;
        next += PER_ROUND;
        let failed = res.clone().err();
        let _ = done.send((i, r, res));
        if let Some(e) = failed {
            return Err(e);
        }
    }
    ws.close(None).await.map_err(|e| format!("close: {e}"))?;
    while let Some(Ok(_)) = ws.next().await {}
    Ok(next)
}
