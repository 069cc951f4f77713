//! The payload relay after the 101: one interface, with the relay that carries a connection
//! chosen per connection.
//!
//! Both relays keep the same contract: bytes are delivered untouched, once and in order; when one
//! side closes, the other is shut down for writing only after every byte already received from the
//! closing side has been delivered (half-close); a reset or error on one side closes the other at
//! once.

mod buffers;
mod frames;
mod grid;
pub mod kernel;
pub mod promotion;
mod read;
mod stall;
pub mod tcp_probe;
mod tls_legs;
pub mod userspace;

use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::{self, RelayMode};
use crate::ebpf::KernelPrograms;
use crate::metrics::Scoped;
pub use crate::outcome::{End, Fallback, Mode, Outcome};
use crate::stream::Stream;

pub use crate::metrics::TotalsSnapshot;
pub use buffers::{SendLimits, host_limit_message, warn_of_host_limits};

/// Fallback lines per second: clients can cause fallbacks, so they must not fill the log.
static FALLBACK_LINES: crate::log_limit::Throttle = crate::log_limit::Throttle::new(20);

/// What ends a relay from outside: the proxy's shutdown drain, and the connection's maximum
/// lifetime (`relay.max_lifetime`), a deadline that holds across a move between the relays;
/// and what moves it to a successor process (`handover`: the relay lets go of the pair at its
/// next point where no byte is in userspace's hands).
#[derive(Clone, Copy)]
pub struct Stop<'a> {
    pub shutdown: &'a CancellationToken,
    pub deadline: Option<tokio::time::Instant>,
    pub handover: &'a CancellationToken,
    /// After `shutdown`, how long this connection still has: its share of `listen.close_spread`,
    /// so that the connections a drain ends do not all close (and reconnect) at once.
    pub close_delay: Duration,
}

/// How a relay let go of a connection.
pub enum Relayed {
    /// It carried the connection to its end.
    Ended(Outcome),
    /// It stopped for a handover, with nothing in userspace's hands: the pair for a successor.
    Moved(Moved),
    /// The kernel relay parked the pair (`relay.park_after`): [`Parked::wait`], then
    /// [`unpark`].
    Parked(Parked),
}

/// A kernel-relayed pair while no relay runs it (see [`kernel::Parked`]).
pub struct Parked {
    pair: kernel::Parked,
    /// Bytes relayed before the kernel relay took the pair.
    before: (u64, u64),
}

impl Parked {
    /// Completes when the pair must run again ([`kernel::Parked::wait`]).
    pub fn wait<'a>(&'a self, cfg: &'a config::Relay, stop: Stop<'a>) -> impl Future<Output = ()> + 'a {
        self.pair.wait(cfg, stop)
    }
}

/// Carries on with a parked pair once [`Parked::wait`] has completed, in the kernel relay that
/// parked it; it may park again.
pub async fn unpark(
    parked: Parked,
    programs: Option<&KernelPrograms>,
    cfg: &config::Relay,
    metrics: Scoped<'_>,
    stop: Stop<'_>,
) -> Relayed {
    let Some(programs) = programs else {
        // Only the kernel relay parks a pair, and the programs live as long as the process.
        warn!("kernel relay: a parked pair without the kernel relay; it is closed");
        return lost(parked.before);
    };
    let began = parked.pair.started();
    let carried = Box::pin(kernel::run(parked.pair.into_taken(), programs, cfg, stop)).await;
    kernel_carried(carried, parked.before, began, metrics)
}

/// A relayed pair on its way to a successor process.
pub struct Moved {
    pub client: std::net::TcpStream,
    pub upstream: std::net::TcpStream,
    /// Where the kernel relay stands, when it was carrying the pair (its map entries stay).
    pub kernel: Option<kernel::Handed>,
    /// Bytes relayed so far that the kernel's counters do not hold (all of them for a
    /// userspace-relayed pair).
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

/// Relays between the two ends until both have closed or one failed. A pair with a TLS leg is
/// copied in userspace ([`tls_legs`]); a plain pair in the kernel (`kernel`), in userspace
/// (`userspace`), or in userspace first and in the kernel once the connection shows message
/// traffic (`auto`, see [`promotion`]). Without loaded programs every mode is userspace.
#[allow(clippy::manual_async_fn)] // the body's comment says why
pub fn relay(
    client: Stream,
    upstream: Stream,
    programs: Option<&KernelPrograms>,
    cfg: &config::Relay,
    metrics: Scoped<'_>,
    stop: Stop<'_>,
) -> impl Future<Output = Relayed> {
    // Not an `async fn`: its future would keep each argument twice, as the argument and as
    // the body's own binding.
    async move {
        let (client, upstream) = match legs(client, upstream) {
            Legs::Plain(client, upstream, [from_client, from_upstream]) => {
                // Early bytes are a client's first bytes read with its PROXY protocol header: rare,
                // and few. Sent on boxed, so that every relayed connection's state does not keep
                // room for these writes.
                if !from_client.is_empty() || !from_upstream.is_empty() {
                    Box::pin(async {
                        let _ = write_all(&upstream, &from_client).await;
                        let _ = write_all(&client, &from_upstream).await;
                    })
                    .await;
                }
                (client, upstream)
            }
            Legs::Tls(client, upstream) => {
                // A TLS leg's state is this process's: such a pair stays here to its end.
                metrics.relay_started(Mode::Userspace);
                let o = Box::pin(tls_legs::relay(client, upstream, cfg, stop)).await;
                metrics.relay_ended(&o);
                return Relayed::Ended(o);
            }
        };
        relay_tcp(client, upstream, (0, 0), programs, cfg, metrics, stop).await
    }
}

/// A pair's legs, as the relay takes them.
enum Legs {
    /// No TLS: the TCP connections, with the early bytes each one's stream read but did not
    /// pass on (past a PROXY protocol header), to be sent to the other first.
    Plain(TcpStream, TcpStream, [Vec<u8>; 2]),
    /// A leg is TLS: the streams as they are.
    Tls(Stream, Stream),
}

fn legs(client: Stream, upstream: Stream) -> Legs {
    if client.is_tls() || upstream.is_tls() {
        return Legs::Tls(client, upstream);
    }
    let (Ok((client, from_client)), Ok((upstream, from_upstream))) = (client.into_tcp(), upstream.into_tcp()) else {
        unreachable!("checked: both plain");
    };
    Legs::Plain(client, upstream, [from_client, from_upstream])
}

/// [`relay`] of a plain pair; `before`: bytes relayed before this relay (a resumed pair).
#[allow(clippy::manual_async_fn)] // the body's comment says why
fn relay_tcp(
    client: TcpStream,
    upstream: TcpStream,
    before: (u64, u64),
    programs: Option<&KernelPrograms>,
    cfg: &config::Relay,
    metrics: Scoped<'_>,
    stop: Stop<'_>,
) -> impl Future<Output = Relayed> {
    // Not an `async fn`: its future would keep each argument twice, as the argument and as
    // the body's own binding.
    async move {
        let began = std::time::Instant::now();
        buffers::cap(&client, &upstream, cfg);
        let programs = programs.filter(|_| cfg.mode != RelayMode::Userspace);
        let (client, upstream, before) = match (programs, cfg.mode) {
            (Some(_), RelayMode::Auto) => {
                metrics.relay_started(Mode::Userspace);
                let policy = promotion::Policy::new(cfg);
                // Boxed: each relay's state is allocated only while that relay runs (see
                // `connection::serve`).
                match Box::pin(userspace::relay(client, upstream, cfg, stop, Some(policy))).await {
                    userspace::Carried::Ended(o) => return ended(o, before, metrics),
                    userspace::Carried::Promote(h) if stop.handover.is_cancelled() => {
                        metrics.relay_moved(Mode::Userspace);
                        return moved_from_userspace(h, before);
                    }
                    userspace::Carried::Promote(h) => {
                        metrics.relay_promoted();
                        debug!(
                            messages = h.messages,
                            client_to_upstream = h.client_to_upstream,
                            upstream_to_client = h.upstream_to_client,
                            "relay: moving the connection to the kernel relay"
                        );
                        (
                            h.client,
                            h.upstream,
                            (before.0 + h.client_to_upstream, before.1 + h.upstream_to_client),
                        )
                    }
                }
            }
            _ => (client, upstream, before),
        };
        let (client, upstream, settled) = match programs {
            Some(programs) => {
                metrics.relay_started(Mode::Kernel);
                // Taken, then run, each boxed: the pair's state keeps no room for the taking. (The
                // run is made inside the match, so that what `take` returned is not kept beside it;
                // a declined pair, rare, is boxed for the same reason.)
                let run = match Box::pin(kernel::take(client, upstream, programs, cfg)).await {
                    // A quiet pair parks before its relay runs: the relay's state is made only
                    // when something wakes it.
                    kernel::Take::Taken(t) => match kernel::start(t, programs, cfg) {
                        kernel::Start::Parked(parked) => {
                            return kernel_carried(kernel::Carried::Parked(parked), before, began, metrics);
                        }
                        kernel::Start::Run(t) => Ok(Box::pin(kernel::run(t, programs, cfg, stop))),
                    },
                    kernel::Take::Ended(carried) => return kernel_carried(carried, before, began, metrics),
                    kernel::Take::Declined(d) => Err(Box::new(d)),
                };
                match run {
                    Ok(run) => return kernel_carried(run.await, before, began, metrics),
                    Err(d) => {
                        let peer_closed = d.reason.is::<kernel::PeerClosed>();
                        metrics.relay_fallback(if peer_closed {
                            Fallback::PeerClosed
                        } else {
                            Fallback::Refused
                        });
                        if peer_closed {
                            // Ordinary: a peer that closes right after the 101.
                            debug!("kernel relay: {}; relaying it in userspace", d.reason);
                        } else if let Some(suppressed) = FALLBACK_LINES.admit(std::time::Instant::now()) {
                            // A client can cause this (a reset right after the 101): bounded.
                            let error = format!("{:#}", d.reason);
                            warn!(%error, suppressed, "kernel relay: cannot take the connection, relaying it in userspace");
                        }
                        (
                            d.client,
                            d.upstream,
                            (before.0 + d.client_to_upstream, before.1 + d.upstream_to_client),
                        )
                    }
                }
            }
            None => (client, upstream, before),
        };
        metrics.relay_started(Mode::Userspace);
        match Box::pin(userspace::relay(client, upstream, cfg, stop, None)).await {
            userspace::Carried::Ended(o) => ended(
                Outcome {
                    duration: began.elapsed(),
                    ..o
                },
                settled,
                metrics,
            ),
            userspace::Carried::Promote(h) => {
                metrics.relay_moved(Mode::Userspace);
                moved_from_userspace(h, settled)
            }
        }
    }
}

/// A pair the userspace relay let go of for a handover.
fn moved_from_userspace(h: userspace::Handover, before: (u64, u64)) -> Relayed {
    let (client, upstream) = match (h.client.into_std(), h.upstream.into_std()) {
        (Ok(c), Ok(u)) => (c, u),
        // Cannot happen for sockets registered with the reactor; the pair is lost if it does.
        (c, u) => {
            warn!("handover: cannot take a pair off the reactor; it is closed");
            drop((c, u));
            return lost((before.0 + h.client_to_upstream, before.1 + h.upstream_to_client));
        }
    };
    Relayed::Moved(Moved {
        client,
        upstream,
        kernel: None,
        client_to_upstream: before.0 + h.client_to_upstream,
        upstream_to_client: before.1 + h.upstream_to_client,
    })
}

/// A relay's end, with the bytes relayed `before` it (by an earlier relay of the pair) added;
/// counted.
fn ended(mut o: Outcome, before: (u64, u64), metrics: Scoped<'_>) -> Relayed {
    o.client_to_upstream += before.0;
    o.upstream_to_client += before.1;
    metrics.relay_ended(&o);
    Relayed::Ended(o)
}

/// A pair lost in a handover (an internal error), with the bytes it had carried.
fn lost(bytes: (u64, u64)) -> Relayed {
    Relayed::Ended(Outcome::copied(Mode::Userspace, End::Internal, bytes, Duration::ZERO))
}

/// What the kernel relay's end means for the caller (counted).
fn kernel_carried(
    carried: kernel::Carried,
    before: (u64, u64),
    began: std::time::Instant,
    metrics: Scoped<'_>,
) -> Relayed {
    match carried {
        kernel::Carried::Ended(o) => ended(
            Outcome {
                duration: began.elapsed(),
                ..o
            },
            before,
            metrics,
        ),
        kernel::Carried::Moved {
            client,
            upstream,
            state,
            client_to_upstream,
            upstream_to_client,
        } => {
            metrics.relay_moved(Mode::Kernel);
            Relayed::Moved(Moved {
                client,
                upstream,
                kernel: Some(state),
                client_to_upstream: before.0 + client_to_upstream,
                upstream_to_client: before.1 + upstream_to_client,
            })
        }
        kernel::Carried::Parked(pair) => Relayed::Parked(Parked { pair, before }),
    }
}

/// Carries on with a pair a predecessor process handed over: in the kernel relay where it was
/// (its entries are in the adopted maps), else as a new relay of this process's configuration
/// (which may move it to the kernel later).
pub async fn resume(
    moved: Moved,
    programs: Option<&KernelPrograms>,
    cfg: &config::Relay,
    metrics: Scoped<'_>,
    stop: Stop<'_>,
) -> Relayed {
    let before = (moved.client_to_upstream, moved.upstream_to_client);
    match (moved.kernel, programs) {
        (Some(state), Some(programs)) => {
            metrics.relay_started(Mode::Kernel);
            let carried = Box::pin(kernel::resume(
                moved.client,
                moved.upstream,
                state,
                [0, 0],
                programs,
                cfg,
                stop,
            ))
            .await;
            kernel_carried(carried, before, std::time::Instant::now(), metrics)
        }
        (kernel, _) => {
            if kernel.is_some() {
                // The handover refuses this (kernel pairs need the maps): never here.
                warn!("handover: a kernel-relayed pair without the kernel relay; relaying it in userspace");
            }
            let (client, upstream) = match (TcpStream::from_std(moved.client), TcpStream::from_std(moved.upstream)) {
                (Ok(c), Ok(u)) => (c, u),
                _ => {
                    warn!("handover: cannot register a pair with the reactor; it is closed");
                    return lost(before);
                }
            };
            relay_tcp(client, upstream, before, programs, cfg, metrics, stop).await
        }
    }
}

/// Runs `relay` (both directions) to its end, or until a peer stalls past the send timeout
/// ([`stall::watch`]), or `activity` (a count of bytes relayed) has not moved for the idle
/// timeout (counted from `quiet_since`, when it last moved as far as the caller knows), or the
/// proxy's shutdown drain is over.
///
/// `relay` is borrowed, pinned by the caller: every kept connection holds this state, and a
/// future passed by value would be stored twice (as the argument and inside the `select!`).
#[allow(clippy::manual_async_fn)] // the body's comment says why
pub(crate) fn until_end<T, S: AsFd>(
    relay: Pin<&mut impl Future<Output = Result<T, End>>>,
    [client, upstream]: [&S; 2],
    cfg: &config::Relay,
    stop: Stop<'_>,
    activity: impl Fn() -> u64,
    quiet_since: tokio::time::Instant,
) -> impl Future<Output = Result<T, End>> {
    // Not an `async fn`: its future would keep each argument twice, as the argument and as
    // the body's own binding.
    async move {
        let idle = async {
            match cfg.idle_timeout {
                Some(t) => idle_watch(t, &activity, quiet_since).await,
                None => std::future::pending().await,
            }
        };
        let lifetime = async {
            match stop.deadline {
                Some(at) => timer_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = relay => r,
            end = stall::watch(client, upstream, cfg.send_timeout, &activity) => Err(end),
            Err(end) = idle => Err(end),
            () = lifetime => Err(End::MaxLifetime),
            () = async {
                stop.shutdown.cancelled().await;
                timer(stop.close_delay).await;
            } => Err(End::Shutdown),
        }
    }
}

/// Completes with [`End::IdleTimeout`] once `activity` has not moved for `timeout` since
/// `since`. Checked four times per timeout, on the process's grid ([`grid`]; the first check no
/// later than the timeout's end), so a connection is closed between 1 and 1.25 times the
/// timeout (and at most a grid step) after its last byte.
async fn idle_watch(
    timeout: Duration,
    activity: impl Fn() -> u64,
    mut since: tokio::time::Instant,
) -> Result<std::convert::Infallible, End> {
    let mut last = activity();
    let every = timeout / grid::LOOKS_PER_TIMEOUT;
    let mut next = (since + timeout).min(grid::look_at(tokio::time::Instant::now(), every));
    loop {
        timer_until(next).await;
        next = grid::look_at(tokio::time::Instant::now(), every);
        let now = activity();
        if now != last {
            (last, since) = (now, tokio::time::Instant::now());
        } else if since.elapsed() >= timeout {
            return Err(End::IdleTimeout);
        }
    }
}

/// Which side a userspace copy's error came from (both userspace relays copy).
pub(crate) enum CopyFailed {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Maps a copy's failure onto the side that caused it.
///
/// A combinator, not an `async fn`: an async fn keeps its future argument twice in its state
/// (as the argument, and as the future it awaits), and a relay's copies are what a relayed
/// connection's memory is made of.
pub(crate) fn copy_side<T>(
    copy: impl Future<Output = Result<T, CopyFailed>>,
    client_to_upstream: bool,
) -> impl Future<Output = Result<T, End>> {
    use futures_util::FutureExt as _;
    copy.map(move |r| {
        r.map_err(|f| match (f, client_to_upstream) {
            (CopyFailed::Read(e), true) | (CopyFailed::Write(e), false) => End::ClientError(e.kind()),
            (CopyFailed::Read(e), false) | (CopyFailed::Write(e), true) => End::UpstreamError(e.kind()),
        })
    })
}

/// A timer on the heap. A relayed connection keeps its timers' futures for its whole life (a
/// `select!` holds every branch), and most never fire: inline, each pending one would be 112
/// bytes of every connection's task; boxed, 8 until it is armed.
pub(crate) fn timer(after: std::time::Duration) -> Pin<Box<tokio::time::Sleep>> {
    Box::pin(tokio::time::sleep(after))
}

/// [`timer`] until a deadline.
fn timer_until(at: tokio::time::Instant) -> Pin<Box<tokio::time::Sleep>> {
    Box::pin(tokio::time::sleep_until(at))
}

/// Writes all of `bytes` to `to`, shared with the other direction (hence `&TcpStream`, which
/// tokio's `AsyncWriteExt` does not write through).
pub(crate) async fn write_all(to: &TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    send_all(to, bytes, 0).await
}

/// Writes all of `bytes`, then passes the FIN on, in the same segment where TCP allows: the bytes
/// go with MSG_MORE, so that their tail waits in the socket for the FIN the shutdown adds to it.
/// One segment, and one wake-up of the peer, instead of two. (A send that has to wait for room
/// pushes what it queued regardless, so MSG_MORE never holds bytes back across a wait.)
pub(crate) async fn write_all_then_fin(to: &TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    send_all(to, bytes, libc::MSG_MORE).await?;
    nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write).map_err(std::io::Error::from)
}

/// `send(2)` with `flags` until all of `bytes` went, waiting for room in between.
async fn send_all(to: &TcpStream, mut bytes: &[u8], flags: libc::c_int) -> std::io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        let sent = to.try_io(tokio::io::Interest::WRITABLE, || {
            // SAFETY: `send` reads at most `bytes.len()` bytes of `bytes`.
            let n = unsafe {
                libc::send(
                    to.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    flags | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(n as usize)
        });
        match sent {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes the next close of `s` send a reset: passing an abort on tells the surviving peer the
/// stream did not end cleanly, and discards whatever would otherwise still be delivered.
pub(crate) fn reset_on_close(s: &impl AsFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // Failure only means a FIN instead of a reset; nothing to recover.
    let _ = nix::sys::socket::setsockopt(&s.as_fd(), nix::sys::socket::sockopt::Linger, &linger);
}

/// A connected loopback TCP pair (connecting end, accepted end), for the relay's unit tests.
#[cfg(test)]
pub(crate) async fn loopback_pair() -> (TcpStream, TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}
