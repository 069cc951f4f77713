//! The userspace relay: both directions copied by tokio, with half-close.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;

use super::{End, Mode, Outcome, reset_on_close, until_end_or_idle};

/// Large enough that a bulk transfer costs few system calls. Allocated only while bytes are
/// flowing, so that an idle connection holds no buffer.
const BUF_SIZE: usize = 64 * 1024;

/// Which side a copy error came from.
enum Failed {
    Read(io::Error),
    Write(io::Error),
}

pub async fn relay(
    mut client: TcpStream,
    mut upstream: TcpStream,
    idle_timeout: Option<Duration>,
    shutdown: &CancellationToken,
) -> Outcome {
    let started = Instant::now();
    let (c2u, u2c) = (AtomicU64::new(0), AtomicU64::new(0));
    let end = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let up = copy(&mut cr, &mut uw, &c2u);
        let down = copy(&mut ur, &mut cw, &u2c);
        // The first error ends both directions: try_join drops the other copy at once.
        let both = async { tokio::try_join!(up_side(up, true), up_side(down, false)).map(|_| ()) };
        until_end_or_idle(both, idle_timeout, shutdown, || c2u.load(Relaxed) + u2c.load(Relaxed)).await
    };
    if end != End::Closed {
        // Pass the abort on: a reset tells the surviving peer the stream did not end cleanly, and
        // discards whatever it would otherwise still try to deliver.
        reset_on_close(&client);
        reset_on_close(&upstream);
    }
    Outcome {
        mode: Mode::Userspace,
        end,
        client_to_upstream: c2u.into_inner(),
        upstream_to_client: u2c.into_inner(),
        duration: started.elapsed(),
    }
}

/// Maps a direction's failure onto the side that caused it.
async fn up_side(copy: impl Future<Output = Result<(), Failed>>, client_to_upstream: bool) -> Result<(), End> {
    copy.await.map_err(|f| match (f, client_to_upstream) {
        (Failed::Read(e), true) | (Failed::Write(e), false) => End::ClientError(e.kind()),
        (Failed::Read(e), false) | (Failed::Write(e), true) => End::UpstreamError(e.kind()),
    })
}

/// Copies until EOF, then shuts the destination down for writing (passes the FIN on).
async fn copy(from: &mut ReadHalf<'_>, to: &mut WriteHalf<'_>, count: &AtomicU64) -> Result<(), Failed> {
    loop {
        from.as_ref().readable().await.map_err(Failed::Read)?;
        let mut buf = vec![0u8; BUF_SIZE];
        loop {
            match from.as_ref().try_read(&mut buf) {
                Ok(0) => return to.shutdown().await.map_err(Failed::Write),
                Ok(n) => {
                    to.write_all(&buf[..n]).await.map_err(Failed::Write)?;
                    count.fetch_add(n as u64, Relaxed);
                }
                // Drained: drop the buffer while waiting for more.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(Failed::Read(e)),
            }
        }
    }
}
