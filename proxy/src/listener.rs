//! The listeners: one accept loop per listening address, a connection cap shared by all of them
//! (`listen.max_connections`, lowered to what the descriptor budget allows: see `descriptors`),
//! backoff when the process is out of file descriptors anyway, and the set of listeners a reload
//! grows and shrinks.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::lock::lock;
use crate::log_limit::Throttle;
use crate::socket_options::Inherited;
use crate::{Shared, config, connection, descriptors, socket_options};

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

/// The listeners being served, by configured address.
#[derive(Clone)]
pub(crate) struct Set {
    inner: Arc<SetInner>,
}

struct SetInner {
    running: Mutex<HashMap<SocketAddr, Running>>,
    /// Client connections open on all listeners together.
    cap: Arc<Semaphore>,
    /// Set when the descriptor budget lowered the cap (for the "paused" line).
    by_descriptors: Option<descriptors::Budget>,
    /// The accept loops (each waits for its connections before it ends).
    loops: TaskTracker,
    /// Connections handed over by a predecessor, and what cuts them at the drain's end.
    resumed: TaskTracker,
    resumed_cancel: CancellationToken,
    /// Cancelled at shutdown; each listener's own stop is a child of it.
    shutdown: CancellationToken,
}

struct Running {
    /// The address it is bound to (a configured port 0 is the kernel's choice).
    local: SocketAddr,
    stop: CancellationToken,
    /// A copy of the listening socket, for a successor process.
    fd: std::os::fd::OwnedFd,
}

impl Set {
    pub fn new(shared: &Shared) -> Set {
        let (cap, by_descriptors) = client_cap(shared);
        Set {
            inner: Arc::new(SetInner {
                running: Mutex::default(),
                cap: Arc::new(Semaphore::new(cap)),
                by_descriptors,
                loops: TaskTracker::new(),
                resumed: TaskTracker::new(),
                resumed_cancel: CancellationToken::new(),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// Serves `listener` as the configured address `addr`.
    pub fn start(&self, addr: SocketAddr, listener: TcpListener, shared: &Arc<Shared>) {
        let local = listener.local_addr().unwrap_or(addr);
        let rt = shared.runtime.load();
        let services: Vec<&str> = rt
            .services
            .iter()
            .filter(|s| s.config.listen.contains(&addr))
            .map(|s| s.name())
            .collect();
        // A listener of many services names the first few (GET /services lists them all).
        const NAMED: usize = 8;
        let mut named = services.iter().take(NAMED).copied().collect::<Vec<_>>().join(",");
        if services.len() > NAMED {
            named.push_str(&format!(",... ({} in all)", services.len()));
        }
        info!(listen = %local, services = %named, "accepting connections");
        let stop = self.inner.shutdown.child_token();
        let fd = match std::os::fd::AsFd::as_fd(&listener).try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                error!(listen = %local, error = %e, "cannot keep a copy of the listening socket; not served");
                return;
            }
        };
        lock(&self.inner.running).insert(
            addr,
            Running {
                local,
                stop: stop.clone(),
                fd,
            },
        );
        let accepting = Accepting {
            listener,
            addr,
            shared: Arc::clone(shared),
            cap: Arc::clone(&self.inner.cap),
            by_descriptors: self.inner.by_descriptors,
        };
        self.inner.loops.spawn(accepting.run(stop));
    }

    /// Binds each of `wanted` that is not served yet. All or nothing: when one cannot be bound,
    /// none is kept, and the problems come back (one per address).
    pub fn bind_new(&self, wanted: &[SocketAddr]) -> Result<Vec<(SocketAddr, TcpListener)>, Vec<String>> {
        let running = lock(&self.inner.running);
        let mut bound = Vec::new();
        let mut problems = Vec::new();
        for &addr in wanted.iter().filter(|a| !running.contains_key(a)) {
            match bind(addr) {
                Ok(l) => bound.push((addr, l)),
                Err(e) => problems.push(format!("listen: cannot listen on {addr}: {e}")),
            }
        }
        if problems.is_empty() { Ok(bound) } else { Err(problems) }
    }

    /// After a reload: serves `added`, and stops the listeners no service of the runtime in
    /// force uses any more (their open connections get the drain timeout).
    pub fn reconcile(&self, added: Vec<(SocketAddr, TcpListener)>, shared: &Arc<Shared>) {
        for (addr, l) in added {
            self.start(addr, l, shared);
        }
        let wanted = shared.runtime.load().config.listeners();
        lock(&self.inner.running).retain(|addr, r| {
            let keep = wanted.contains(addr);
            if !keep {
                info!(listen = %r.local, "listener removed by the configuration: stopped accepting; its open connections drain");
                r.stop.cancel();
            }
            keep
        });
    }

    /// Configured addresses and copies of the listening sockets (for a successor).
    pub fn fds(&self) -> io::Result<(Vec<SocketAddr>, Vec<std::os::fd::OwnedFd>)> {
        let running = lock(&self.inner.running);
        let mut addresses = Vec::new();
        let mut fds = Vec::new();
        for (a, r) in running.iter() {
            addresses.push(*a);
            fds.push(r.fd.try_clone()?);
        }
        Ok((addresses, fds))
    }

    /// Runs a connection handed over by a predecessor (`run` gets the token that ends it when
    /// the drain is over), drained with the rest at the end.
    pub fn resume<F: Future<Output = ()> + Send + 'static>(&self, run: impl FnOnce(CancellationToken) -> F) {
        let stop = self.inner.resumed_cancel.clone();
        self.inner.resumed.spawn(run(stop));
    }

    /// Configured and bound address of every listener served.
    pub fn addresses(&self) -> Vec<(SocketAddr, SocketAddr)> {
        lock(&self.inner.running).iter().map(|(a, r)| (*a, r.local)).collect()
    }

    /// Stops every listener and waits until each has drained and closed its connections, and
    /// the connections handed over by a predecessor too (within `drain`).
    pub async fn stop_all(&self, drain: Duration) {
        lock(&self.inner.running).clear();
        self.inner.shutdown.cancel();
        self.inner.loops.close();
        self.inner.resumed.close();
        let resumed = async {
            if tokio::time::timeout(drain, self.inner.resumed.wait()).await.is_err() {
                warn!(
                    open = self.inner.resumed.len(),
                    "drain timeout: closing the handed-over connections still open"
                );
            }
            self.inner.resumed_cancel.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.inner.resumed.wait()).await;
        };
        tokio::join!(self.inner.loops.wait(), resumed);
    }
}

/// The socket options a listener passes on to the sockets it accepts (see `socket_options`),
/// kept to what its services share in the runtime in force. A socket the kernel made before the
/// options were set or changed has the previous ones. The accept queue is first in, first out,
/// so the accepts up to the first one that finds it empty tell their connections that what they
/// inherited is unknown, and so do those of the next [`OPTIONS_DOUBT`]: the kernel makes a
/// connection's socket and queues it in one step, which a preempted CPU may stretch.
#[derive(Default)]
struct Options {
    /// What the listening socket carries; `None` before the first setting.
    applied: Option<Option<config::Keepalive>>,
    inherited: Inherited,
    /// Sockets made before `applied` may still be queued.
    unsure: bool,
    /// Until when, after a setting, accepted sockets are doubted anyway.
    doubt_until: Option<std::time::Instant>,
}

/// How long after the listener's options changed its connections set their own anyway.
const OPTIONS_DOUBT: Duration = Duration::from_secs(1);

impl Options {
    /// Sets the listening socket's options when its services' shared keepalive changed (at the
    /// first accept, after a reload).
    fn follow(&mut self, listener: &TcpListener, addr: SocketAddr, shared: &Shared) {
        let rt = shared.runtime.load();
        self.set(listener, rt.routes.listener(addr).and_then(|l| l.keepalive.clone()));
    }

    /// Sets the listening socket's options to pass `wanted` on, unless it does already.
    fn set(&mut self, listener: &TcpListener, wanted: Option<config::Keepalive>) {
        if self.applied.as_ref() != Some(&wanted) {
            self.inherited = socket_options::listener(listener, wanted.as_ref());
            self.applied = Some(wanted);
            self.unsure = true;
            self.doubt_until = Some(std::time::Instant::now() + OPTIONS_DOUBT);
        }
    }

    /// While sockets queued before the options may wait: the next one, if one is queued. At the
    /// first empty queue that doubt is over. (The kernel's queue is asked directly: the reactor
    /// may not have seen yet that a connection is queued, and would say there is none.)
    fn queued_before(&mut self, listener: &TcpListener) -> Option<io::Result<(TcpStream, SocketAddr)>> {
        if !self.unsure {
            return None;
        }
        let next = match socket2::SockRef::from(listener).accept() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => Some(Err(e)),
            Ok((socket, peer)) => Some((|| {
                let peer = peer
                    .as_socket()
                    .ok_or_else(|| io::Error::other("an accepted socket without an IP peer"))?;
                socket.set_nonblocking(true)?;
                Ok((TcpStream::from_std(socket.into())?, peer))
            })()),
        };
        self.unsure = next.is_some();
        next
    }

    /// What the socket just accepted inherited.
    fn inherited(&self) -> Inherited {
        let doubted = self.doubt_until.is_some_and(|t| std::time::Instant::now() < t);
        if self.unsure || doubted {
            Inherited::Unknown
        } else {
            self.inherited.clone()
        }
    }
}

/// One listener's accept loop and what it needs.
struct Accepting {
    listener: TcpListener,
    /// The configured address: what routes its connections.
    addr: SocketAddr,
    shared: Arc<Shared>,
    cap: Arc<Semaphore>,
    by_descriptors: Option<descriptors::Budget>,
}

impl Accepting {
    /// Accepts until `stop` is cancelled; then lets this listener's open connections finish for
    /// the drain timeout, cancels the rest and waits for their tasks to end.
    async fn run(self, stop: CancellationToken) {
        let Accepting {
            listener,
            addr,
            shared,
            cap,
            by_descriptors,
        } = self;
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        let mut backoff = BACKOFF_MIN;
        let mut options = Options::default();
        loop {
            // At the cap, stop accepting: new connections wait in the kernel's queue, and
            // accepting resumes as soon as a connection ends.
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
                        _ = stop.cancelled() => break,
                        p = Arc::clone(&cap).acquire_owned() => p.expect("the semaphore is never closed"),
                    }
                }
            };
            options.follow(&listener, addr, &shared);
            let accepted = match options.queued_before(&listener) {
                Some(a) => a,
                None => tokio::select! {
                    _ = stop.cancelled() => break,
                    a = listener.accept() => a,
                },
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = BACKOFF_MIN;
                    let shared = Arc::clone(&shared);
                    let cancel = cancel.clone();
                    let inherited = options.inherited();
                    tasks.spawn(connection::serve(stream, peer, addr, inherited, shared, cancel, permit));
                }
                Err(e) if is_per_connection(&e) => {}
                Err(e) => {
                    // Out of file descriptors or memory: spinning on accept would burn a core
                    // and fill the log; wait and retry, doubling the wait while it lasts.
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        drop(listener);
        tasks.close();
        let drain = shared.runtime.load().config.drain_timeout;
        let open = tasks.len();
        if open > 0 {
            info!(
                listen = %addr,
                open,
                drain_s = drain.as_secs_f64(),
                "stopped accepting; letting open connections finish"
            );
        }
        if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
            warn!(listen = %addr, open = tasks.len(), "drain timeout: closing the connections still open");
        }
        cancel.cancel();
        if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
            .await
            .is_err()
        {
            error!(listen = %addr, "connections did not end within 5 s of being cancelled");
        }
    }
}

/// The cap on client connections open at once: `listen.max_connections`, or fewer when the
/// descriptor budget holds fewer (then with the budget, for the "paused" line).
fn client_cap(shared: &Shared) -> (usize, Option<descriptors::Budget>) {
    let rt = shared.runtime.load();
    let c = &rt.config;
    // One descriptor per upstream a probe may connect to at once: distinct addresses of the
    // services that probe (an upstream shared by many services is one).
    let upstreams = c
        .services
        .iter()
        .filter(|s| s.upstreams.health.probe_interval.is_some())
        .flat_map(|s| s.upstreams.main.iter().chain(&s.upstreams.backup))
        .map(|u| u.address)
        .collect::<std::collections::HashSet<_>>()
        .len();
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

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{getsockopt, sockopt};

    #[tokio::test]
    async fn sockets_queued_before_the_options_are_told_their_options_are_unknown() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = listener.local_addr().unwrap();
        let k = config::Keepalive {
            idle: Duration::from_secs(33),
            ..config::Keepalive::default()
        };
        // Two connections the kernel made before the listener had any option.
        let early = [
            TcpStream::connect(to).await.unwrap(),
            TcpStream::connect(to).await.unwrap(),
        ];
        let mut options = Options::default();
        options.set(&listener, Some(k.clone()));
        for _ in &early {
            let (s, _) = options.queued_before(&listener).expect("a queued socket").unwrap();
            assert_eq!(options.inherited(), Inherited::Unknown);
            assert!(!getsockopt(&s, sockopt::KeepAlive).unwrap(), "made before the options");
        }
        // The queue is empty: every later socket has the options (told so once the doubt
        // period is over too).
        assert!(options.queued_before(&listener).is_none());
        let _late = TcpStream::connect(to).await.unwrap();
        let (s, _) = listener.accept().await.unwrap();
        assert_eq!(options.inherited(), Inherited::Unknown, "within the doubt period");
        options.doubt_until = Some(std::time::Instant::now());
        assert_eq!(options.inherited(), Inherited::Options(Some(k)));
        assert!(getsockopt(&s, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&s, sockopt::TcpKeepIdle).unwrap(), 33);
        assert!(getsockopt(&s, sockopt::TcpNoDelay).unwrap());
        // The same settings again change nothing; other ones bring the doubt back.
        options.set(&listener, options.applied.clone().flatten());
        assert!(options.queued_before(&listener).is_none());
        options.set(&listener, None);
        assert!(options.unsure);
    }
}
