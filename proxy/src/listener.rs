//! The accept loop: a global connection cap (`listen.max_connections`, lowered to what the
//! descriptor budget allows: see `descriptors`), backoff when the process is out of file
//! descriptors anyway, and shutdown.

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

use crate::log_limit::Throttle;
use crate::{Shared, connection, descriptors};

/// "Accepts paused" lines: at most one a second.
static PAUSED_LINES: Throttle = Throttle::new(1);

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
    let (cap, by_descriptors) = client_cap(&shared);
    let cap = Arc::new(Semaphore::new(cap));
    let tasks = TaskTracker::new();
    let cancel = CancellationToken::new();
    let mut backoff = BACKOFF_MIN;
    tokio::pin!(shutdown);
    loop {
        // At the cap, stop accepting: new connections wait in the kernel's queue, and accepting
        // resumes as soon as a connection ends.
        let permit = match Arc::clone(&cap).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if let Some(budget) = by_descriptors
                    && let Some(suppressed) = PAUSED_LINES.admit(std::time::Instant::now())
                {
                    warn!(
                        clients = budget.clients,
                        nofile = budget.limit,
                        reserve = budget.reserve,
                        suppressed,
                        "client accepts paused: the descriptor budget is in use; the reserve stays for the admin listener and upstream connects"
                    );
                }
                tokio::select! {
                    _ = &mut shutdown => break,
                    p = Arc::clone(&cap).acquire_owned() => p.expect("the semaphore is never closed"),
                }
            }
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

/// The cap on client connections open at once: `listen.max_connections`, or fewer when the
/// descriptor budget holds fewer (then with the budget, for the "paused" line).
fn client_cap(shared: &Shared) -> (usize, Option<descriptors::Budget>) {
    let rt = shared.runtime.load();
    let c = &rt.config;
    let upstreams = c.upstreams.main.len() + c.upstreams.backup.len();
    let budget = match descriptors::Budget::now(c.admin.as_ref().map(|a| a.max_connections), upstreams) {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "descriptors: cannot read the limit or the open descriptors; no descriptor budget");
            return (c.max_connections, None);
        }
    };
    if budget.clients < c.max_connections {
        warn!(
            nofile = budget.limit,
            open = budget.open,
            reserve = budget.reserve,
            clients = budget.clients,
            max_connections = c.max_connections,
            "descriptors: RLIMIT_NOFILE allows fewer client connections than listen.max_connections; raise it (LimitNOFILE=) to serve that many"
        );
        (budget.clients, Some(budget))
    } else {
        info!(
            nofile = budget.limit,
            open = budget.open,
            reserve = budget.reserve,
            "descriptors: the reserve is kept from client connections"
        );
        (c.max_connections, None)
    }
}

/// Errors that concern only the connection being accepted (it was reset before we took it).
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    )
}
