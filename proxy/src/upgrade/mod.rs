//! Binary upgrades that drop nothing: the running process starts its successor (the same
//! executable path, possibly a new build) and hands it, over a Unix socket (`[upgrade] socket`,
//! mode 0600) with `SCM_RIGHTS`: its listening sockets (no connection attempt is refused), the
//! kernel relay's maps (the verdict stays attached: kernel-relayed pairs are never paused), the
//! per-client limit and upstream health state, then every relayed connection at a point where no
//! byte is in userspace's hands. Handshakes in progress finish here and then move too; pairs with
//! a TLS leg (their TLS state is this process's) stay to their end, bounded by the drain. A
//! successor that fails to start or to take over leaves everything here.
//!
//! The order (see `docs/upgrades.md`): Hello (version, kernel object) -> listeners, kernel maps,
//! limits, health, Ready -> the successor accepts and answers Ready -> this process stops
//! accepting and moves its pairs as they become movable -> Done (the kernel relay's ring buffer
//! changes hands) -> the successor answers Done (every pair admitted) -> this process exits.

mod wire;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use wire::{Channel, Message, VERSION};
pub use wire::{ClientState, PairState};

use crate::ebpf::KernelPrograms;
use crate::lock::lock;
use crate::relay::Moved;
use crate::{Server, Shared};

/// The environment variable that tells a new process to take over from the running one (its
/// value: the hand-over socket).
pub const TAKE_OVER_FROM: &str = "WSPROXY_TAKE_OVER_FROM";

/// How long a peer of the hand-over socket has for its first message.
const FIRST_MESSAGE: Duration = Duration::from_secs(5);

/// How long this process waits for the successor to answer its Done.
const DONE_ANSWER: Duration = Duration::from_secs(5);

/// Limiter entries per message.
const CLIENTS_PER_MESSAGE: usize = 1000;

/// How the process was started: what an upgrade starts again.
struct Invocation {
    executable: PathBuf,
    args: Vec<OsString>,
}

static INVOCATION: OnceLock<Invocation> = OnceLock::new();

/// Records the executable's path and arguments, before anything can replace the file (a new
/// build installed over it is what an upgrade runs). Call once, at the start of `main`.
pub fn record_invocation() {
    let executable = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let args = std::env::args_os().skip(1).collect();
    let _ = INVOCATION.set(Invocation { executable, args });
}

/// A moved pair on its way out: sent to the successor, or (none) closed with a line.
pub(crate) fn hand_over(shared: &Shared, state: PairState, moved: Moved) {
    let sent = match &*lock(&shared.successor) {
        Some(tx) => tx.send((state, moved)).map_err(|e| e.0),
        None => Err((state, moved)),
    };
    if let Err((state, _)) = sent {
        error!(request_id = %state.request_id, "handover: no successor to take the connection; it is closed");
    }
}

/// The running process's side: listens on the hand-over socket, and runs an upgrade on
/// SIGUSR2 ([`Server::request_upgrade`]) or a `wsproxy upgrade`. Cancels `stop` when a successor
/// has taken over (the process then drains what stays and exits); returns once everything that
/// could move has moved, or at `stop` without an upgrade.
pub async fn serve(server: Server, stop: CancellationToken) {
    let shared = Arc::clone(&server.shared);
    let Some(cfg) = server.config().upgrade else {
        // Without a socket there is nothing to hand over through: say so when asked.
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = shared.upgrade_requested.notified() => {
                    warn!("upgrade requested, but upgrades are off: set upgrade.socket");
                }
            }
        }
    };
    let listener = match wire::Listener::bind(&cfg.socket) {
        Ok(l) => l,
        Err(e) => {
            error!(socket = %cfg.socket.display(), error = %e, "upgrades: cannot listen on the hand-over socket; upgrades are off");
            stop.cancelled().await;
            return;
        }
    };
    info!(socket = %cfg.socket.display(), "upgrades: waiting for SIGUSR2 or `wsproxy upgrade`");
    // The upgrade in progress waits for its successor's Hello here.
    let mut waiting: Option<oneshot::Sender<(Channel, u32, u64, u32)>> = None;
    let mut running: Option<tokio::task::JoinHandle<Result<(Channel, u32), String>>> = None;
    let mut requester: Option<Channel> = None;
    let outcome = loop {
        tokio::select! {
            () = stop.cancelled(), if running.is_none() => break None,
            () = shared.upgrade_requested.notified(), if running.is_none() => {
                let (tx, rx) = oneshot::channel();
                waiting = Some(tx);
                running = Some(tokio::spawn(start(Arc::clone(&shared), cfg.timeout, rx)));
            }
            accepted = listener.accept() => {
                let Ok(channel) = accepted else { continue };
                // A peer that connects and says nothing must not hold this loop up.
                let Ok(first) = tokio::time::timeout(FIRST_MESSAGE, channel.recv()).await else { continue };
                match first {
                    Ok(Some((Message::Trigger, _))) if running.is_none() => {
                        let (tx, rx) = oneshot::channel();
                        waiting = Some(tx);
                        running = Some(tokio::spawn(start(Arc::clone(&shared), cfg.timeout, rx)));
                        requester = Some(channel);
                    }
                    Ok(Some((Message::Trigger, _))) => {
                        let _ = channel.send(&Message::Outcome { ok: false, message: "an upgrade is in progress".into() }, &[] as &[OwnedFd]).await;
                    }
                    Ok(Some((Message::Hello { version, kernel_object, pid }, _))) => match waiting.take() {
                        Some(tx) => {
                            info!(pid, "upgrade: the successor introduced itself");
                            let _ = tx.send((channel, version, kernel_object, pid));
                        }
                        None => {
                            let reason = "no upgrade was asked for".to_string();
                            let _ = channel.send(&Message::Refused { reason }, &[] as &[OwnedFd]).await;
                        }
                    },
                    _ => {}
                }
            }
            r = async { running.as_mut().expect("guarded").await }, if running.is_some() => {
                running = None;
                waiting = None;
                let r = r.unwrap_or_else(|e| Err(format!("the upgrade task failed: {e}")));
                let message = match &r {
                    Ok((_, pid)) => format!("the successor (pid {pid}) has taken over"),
                    Err(e) => e.clone(),
                };
                if let Some(req) = requester.take() {
                    let _ = req.send(&Message::Outcome { ok: r.is_ok(), message: message.clone() }, &[] as &[OwnedFd]).await;
                }
                match r {
                    Ok((channel, pid)) => {
                        info!(pid, "upgrade: the successor has taken over");
                        break Some(channel);
                    }
                    Err(e) => {
                        shared.metrics.upgrade(false);
                        error!(error = %e, "upgrade failed; this process keeps serving everything");
                    }
                }
            }
        }
    };
    drop(listener);
    let _ = std::fs::remove_file(&cfg.socket);
    let Some(channel) = outcome else { return };
    shared.metrics.upgrade(true);
    if let Some(k) = &shared.kernel {
        // The successor relays with these maps now, new pairs included.
        k.keep_attached();
    }
    // From here on the successor accepts: stop, and move every pair as it becomes movable.
    let (tx, mut rx) = mpsc::unbounded_channel::<(PairState, Moved)>();
    *lock(&shared.successor) = Some(tx);
    shared.handover.cancel();
    shared.upgraded.cancel();
    stop.cancel();
    let drained = shared.drained.clone();
    let mut moved = 0u64;
    loop {
        tokio::select! {
            p = rx.recv() => {
                let Some((state, pair)) = p else { break };
                let fds = [pair.client.as_fd(), pair.upstream.as_fd()];
                if let Err(e) = channel.send(&Message::Pair(state), &fds).await {
                    error!(error = %e, "handover: the successor is gone; the connection is closed");
                } else {
                    moved += 1;
                }
            }
            () = drained.cancelled(), if lock(&shared.successor).is_some() => {
                // Every connection task has ended: what is left in the queue is all.
                lock(&shared.successor).take();
            }
        }
    }
    if let Some(k) = &shared.kernel {
        k.watch().release_ring();
    }
    let _ = channel.send(&Message::Done, &[] as &[OwnedFd]).await;
    // The successor answers Done once it has admitted every pair sent before it: from then on
    // its per-client counts include them. Bounded: this process exits either way.
    match tokio::time::timeout(DONE_ANSWER, channel.recv()).await {
        Ok(Ok(Some((Message::Done, _)))) => {}
        _ => warn!("upgrade: the successor did not confirm it took every connection"),
    }
    info!(moved, "upgrade: every movable connection handed over; exiting");
}

/// One upgrade: starts the successor, waits for its Hello (or its exit, or the timeout), hands
/// it the listeners and state, and waits for its Ready. `Err`: why it was called off.
async fn start(
    shared: Arc<Shared>,
    timeout: Duration,
    hello: oneshot::Receiver<(Channel, u32, u64, u32)>,
) -> Result<(Channel, u32), String> {
    let invocation = INVOCATION.get().ok_or("the executable's path was not recorded")?;
    let socket = shared
        .runtime
        .load()
        .config
        .upgrade
        .as_ref()
        .map(|u| u.socket.clone())
        .ok_or("upgrades are off")?;
    info!(executable = %invocation.executable.display(), "upgrade: starting the successor");
    let mut child = tokio::process::Command::new(&invocation.executable)
        .args(&invocation.args)
        .env(TAKE_OVER_FROM, &socket)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", invocation.executable.display()))?;
    let deadline = tokio::time::Instant::now() + timeout;
    let (channel, version, kernel_object, pid) = tokio::select! {
        h = hello => h.map_err(|_| "the upgrade was called off".to_string())?,
        status = child.wait() => return Err(format!("the successor exited before taking over ({})", status.map_or_else(|e| e.to_string(), |s| s.to_string()))),
        () = tokio::time::sleep_until(deadline) => {
            let _ = child.start_kill();
            return Err(format!("the successor did not introduce itself within {timeout:?}"));
        }
    };
    let refuse = |reason: String| async {
        let _ = channel
            .send(&Message::Refused { reason: reason.clone() }, &[] as &[OwnedFd])
            .await;
        Err::<(Channel, u32), String>(reason)
    };
    if version != VERSION {
        return refuse(format!("hand-over protocol {version}, this process speaks {VERSION}")).await;
    }
    if shared.kernel.is_some() && kernel_object != KernelPrograms::object_hash() {
        return refuse("its kernel relay differs from the one loaded here; restart to change it".into()).await;
    }
    let handed = async {
        send_state(&shared, &channel)
            .await
            .map_err(|e| format!("sending the state: {e}"))?;
        match channel.recv().await {
            Ok(Some((Message::Ready, _))) => Ok(()),
            Ok(Some((other, _))) => Err(format!("the successor said {other:?} instead of Ready")),
            Ok(None) => Err("the successor closed the hand-over socket before it was ready".into()),
            Err(e) => Err(format!("the hand-over socket failed: {e}")),
        }
    };
    tokio::select! {
        r = handed => r.map(|()| (channel, pid)),
        status = child.wait() => Err(format!("the successor exited before taking over ({})", status.map_or_else(|e| e.to_string(), |s| s.to_string()))),
        () = tokio::time::sleep_until(deadline) => {
            let _ = child.start_kill();
            Err(format!("the successor was not ready within {timeout:?}"))
        }
    }
}

/// Listeners, kernel maps, limits and health, then Ready.
async fn send_state(shared: &Shared, channel: &Channel) -> std::io::Result<()> {
    let (listen, mut fds) = shared.listener_fds()?;
    let admin = lock(&shared.admin_fd).as_ref().map(|f| f.try_clone()).transpose()?;
    let has_admin = admin.is_some();
    fds.extend(admin);
    channel
        .send(
            &Message::Listeners {
                listen,
                admin: has_admin,
            },
            &fds,
        )
        .await?;
    if let Some(k) = &shared.kernel {
        channel.send(&Message::Kernel, &k.handover_fds()?).await?;
    }
    let rt = shared.runtime.load_full();
    for s in &rt.services {
        let clients = s.state.limiter.export(std::time::Instant::now());
        for chunk in clients.chunks(CLIENTS_PER_MESSAGE) {
            let service = s.name().to_string();
            channel
                .send(
                    &Message::Limits {
                        service,
                        clients: chunk.to_vec(),
                    },
                    &[] as &[OwnedFd],
                )
                .await?;
        }
        let down = s.state.health.down(std::time::Instant::now());
        if !down.is_empty() {
            let service = s.name().to_string();
            channel
                .send(&Message::Health { service, down }, &[] as &[OwnedFd])
                .await?;
        }
    }
    channel.send(&Message::Ready, &[] as &[OwnedFd]).await
}

/// What a new process received from its predecessor before serving.
pub struct Takeover {
    channel: Channel,
    /// Listening sockets, by configured address.
    pub listeners: Vec<(SocketAddr, std::net::TcpListener)>,
    /// The admin listener's socket (TCP or Unix).
    pub admin: Option<OwnedFd>,
    /// The kernel relay's maps, when the predecessor had it loaded.
    pub kernel: Option<Vec<OwnedFd>>,
    limits: Vec<(String, Vec<ClientState>)>,
    health: Vec<(String, Vec<(SocketAddr, u64)>)>,
}

/// The new process's side, before it serves: introduces itself to the predecessor listening at
/// `socket` and receives the listeners and state.
pub async fn take_over(socket: &Path) -> Result<Takeover, String> {
    let channel = Channel::connect(socket)
        .await
        .map_err(|e| format!("cannot reach the running process at {}: {e}", socket.display()))?;
    let hello = Message::Hello {
        version: VERSION,
        kernel_object: KernelPrograms::object_hash(),
        pid: std::process::id(),
    };
    channel
        .send(&hello, &[] as &[OwnedFd])
        .await
        .map_err(|e| e.to_string())?;
    let mut t = Takeover {
        listeners: Vec::new(),
        admin: None,
        kernel: None,
        limits: Vec::new(),
        health: Vec::new(),
        channel,
    };
    loop {
        let (message, mut fds) = t
            .channel
            .recv()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the running process closed the hand-over socket")?;
        match message {
            Message::Refused { reason } => return Err(format!("the running process refused: {reason}")),
            Message::Listeners { listen, admin } => {
                if admin {
                    t.admin = fds.pop();
                }
                if fds.len() != listen.len() {
                    return Err("listener descriptors missing".into());
                }
                t.listeners = listen
                    .into_iter()
                    .zip(fds)
                    .map(|(a, fd)| (a, std::net::TcpListener::from(fd)))
                    .collect();
            }
            Message::Kernel => t.kernel = Some(fds),
            Message::Limits { service, clients } => t.limits.push((service, clients)),
            Message::Health { service, down } => t.health.push((service, down)),
            Message::Ready => return Ok(t),
            other => return Err(format!("unexpected {other:?} from the running process")),
        }
    }
}

impl Takeover {
    /// Restores the predecessor's limit and health state into `server`, tells the predecessor
    /// this process accepts, and carries on with every connection it hands over, until it says
    /// Done (the kernel relay's ring buffer is then this process's).
    pub async fn run(self, server: Server) {
        let shared = Arc::clone(&server.shared);
        shared.restore(&self.limits, &self.health);
        if let Err(e) = self.channel.send(&Message::Ready, &[] as &[OwnedFd]).await {
            error!(error = %e, "takeover: cannot tell the predecessor this process is ready");
            return;
        }
        let mut received = 0u64;
        loop {
            match self.channel.recv().await {
                Ok(Some((Message::Pair(state), fds))) => {
                    let mut fds = fds.into_iter();
                    let (Some(client), Some(upstream)) = (fds.next(), fds.next()) else {
                        error!(request_id = %state.request_id, "takeover: a connection without its sockets");
                        continue;
                    };
                    received += 1;
                    let moved = Moved {
                        client: std::net::TcpStream::from(client),
                        upstream: std::net::TcpStream::from(upstream),
                        kernel: state.kernel,
                        client_to_upstream: state.client_to_upstream,
                        upstream_to_client: state.upstream_to_client,
                    };
                    shared.resume(state, moved);
                }
                Ok(Some((Message::Done, _))) | Ok(None) => break,
                Ok(Some((other, _))) => warn!(message = ?other, "takeover: unexpected message"),
                Err(e) => {
                    error!(error = %e, "takeover: the hand-over socket failed");
                    break;
                }
            }
        }
        if let Some(k) = &shared.kernel {
            k.watch().take_ring();
        }
        // Every pair received is admitted (`Shared::resume` admits before it spawns): the
        // predecessor may exit.
        let _ = self.channel.send(&Message::Done, &[] as &[OwnedFd]).await;
        info!(received, "takeover: the predecessor handed over everything");
    }
}

/// `wsproxy upgrade`: asks the process listening at `socket` to upgrade, and waits for the
/// outcome (within `limit`).
pub async fn request(socket: &Path, limit: Duration) -> Result<String, String> {
    let channel = Channel::connect(socket)
        .await
        .map_err(|e| format!("cannot reach the running process at {}: {e}", socket.display()))?;
    channel
        .send(&Message::Trigger, &[] as &[OwnedFd])
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(limit, channel.recv()).await {
        Err(_) => Err(format!("no outcome within {limit:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(None)) => Err("the running process closed the connection".into()),
        Ok(Ok(Some((Message::Outcome { ok: true, message }, _)))) => Ok(message),
        Ok(Ok(Some((Message::Outcome { ok: false, message }, _)))) => Err(message),
        Ok(Ok(Some((other, _)))) => Err(format!("unexpected answer {other:?}")),
    }
}

/// How long `wsproxy upgrade` waits beyond the configured upgrade timeout.
pub const REQUEST_MARGIN: Duration = Duration::from_secs(10);
