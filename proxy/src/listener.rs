//! The accept loop: a global connection cap, backoff when the process is out of file descriptors,
//! and shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::{Shared, connection};

/// Pending connections the kernel may queue for us; a burst of handshakes should wait in the
/// queue rather than be refused by the kernel.
const BACKLOG: u32 = 4096;
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Binds the listening socket (with SO_REUSEADDR, so a restart does not wait for TIME_WAIT).
/// Needs a tokio runtime; see [`bind_std`] for binding before one exists.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::from_std(bind_std(addr)?)
}

/// Like [`bind`], without a runtime: the daemon binds before it drops its privileges, and
/// before it starts the runtime's threads (capabilities are per thread).
pub fn bind_std(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG as i32)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Accepts until `shutdown` completes; then lets open connections finish for the drain timeout,
/// cancels the rest and waits for their tasks to end.
pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: impl Future<Output = ()>) {
    let cap = Arc::new(Semaphore::new(shared.runtime.load().config.max_connections));
    let tasks = TaskTracker::new();
    let cancel = CancellationToken::new();
    let mut backoff = BACKOFF_MIN;
    tokio::pin!(shutdown);
    loop {
        // At the cap, stop accepting: new connections wait in the kernel's queue.
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = Arc::clone(&cap).acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = BACKOFF_MIN;
                let shared = Arc::clone(&shared);
                let cancel = cancel.clone();
                tasks.spawn(async move {
                    connection::serve(stream, peer, shared, cancel).await;
                    drop(permit);
                });
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                // Out of file descriptors or memory: spinning on accept would burn a core and
                // fill the log; wait and retry, doubling the wait while it lasts.
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    drop(listener);
    shared.accepting.store(false, Ordering::SeqCst);
    tasks.close();
    let drain = shared.runtime.load().config.drain_timeout;
    let open = tasks.len();
    if open > 0 {
        info!(
            open,
            drain_s = drain.as_secs_f64(),
            "stopped accepting; letting open connections finish"
        );
    }
    if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
        warn!(open = tasks.len(), "drain timeout: closing the connections still open");
    }
    cancel.cancel();
    if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .is_err()
    {
        error!("connections did not end within 5 s of being cancelled");
    }
}

/// Errors that concern only the connection being accepted (it was reset before we took it).
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    )
}
