//! The userspace relay: both directions copied by tokio, with half-close.

use std::io;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{End, Mode, Outcome, reset_on_close};

/// Large enough that a bulk transfer costs few system calls; one buffer per direction.
const BUF_SIZE: usize = 64 * 1024;

/// Which side a copy error came from.
enum Failed {
    Read(io::Error),
    Write(io::Error),
}

pub async fn relay(mut client: TcpStream, mut upstream: TcpStream) -> Outcome {
    let started = Instant::now();
    let (mut c2u, mut u2c) = (0u64, 0u64);
    let end = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let up = copy(&mut cr, &mut uw, &mut c2u);
        let down = copy(&mut ur, &mut cw, &mut u2c);
        // The first error ends both directions: try_join drops the other copy at once.
        match tokio::try_join!(up_side(up, true), up_side(down, false)) {
            Ok(_) => End::Closed,
            Err(end) => end,
        }
    };
    if end != End::Closed {
        // Pass the abort on: a reset tells the surviving peer the stream did not end cleanly, and
        // discards whatever it would otherwise still try to deliver.
        reset_on_close(&client);
        reset_on_close(&upstream);
    }
    Outcome { mode: Mode::Userspace, end, client_to_upstream: c2u, upstream_to_client: u2c, duration: started.elapsed() }
}

/// Maps a direction's failure onto the side that caused it.
async fn up_side(copy: impl Future<Output = Result<(), Failed>>, client_to_upstream: bool) -> Result<(), End> {
    copy.await.map_err(|f| match (f, client_to_upstream) {
        (Failed::Read(e), true) | (Failed::Write(e), false) => End::ClientError(e.kind()),
        (Failed::Read(e), false) | (Failed::Write(e), true) => End::UpstreamError(e.kind()),
    })
}

/// Copies until EOF, then shuts the destination down for writing (passes the FIN on).
async fn copy<R, W>(from: &mut R, to: &mut W, count: &mut u64) -> Result<(), Failed>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = from.read(&mut buf).await.map_err(Failed::Read)?;
        if n == 0 {
            return to.shutdown().await.map_err(Failed::Write);
        }
        to.write_all(&buf[..n]).await.map_err(Failed::Write)?;
        *count += n as u64;
    }
}
