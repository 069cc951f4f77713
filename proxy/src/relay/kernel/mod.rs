//! The kernel relay: the pair of sockets is put under the sockmap verdict, which redirects each
//! side's received bytes to the other side's egress without copying them through userspace.
//!
//! What the kernel does not do, this module does (see `docs/kernel-relay.md`):
//! - It bounds the bytes in flight per direction. The verdict redirects while the bytes the
//!   destination's TCP has not taken stay within a window (it reads the destination's progress
//!   itself); past it, it passes the bytes to this socket's receive queue, which holds the sender
//!   back by its own TCP window. A pass wakes [`direction`], which waits until the destination
//!   has taken every redirected byte, forwards the passed bytes itself (in order: the verdict
//!   redirects nothing while a passed byte may be in userspace's hands) and reports them.
//! - It relays FIN. At EOF on one side it waits, bounded by the drain timeout, until the other
//!   side's TCP has taken every byte from this side, then shuts that side down for writing.
//!   Closing earlier loses the bytes still queued in the kernel.
//! - It tears both sides down at once on a reset or error, and always takes the pair out of the
//!   maps before the sockets close.

mod direction;
mod park;
pub mod step;

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use futures_util::FutureExt as _;
use tokio::net::TcpStream;

use super::read::{Read, read};
use super::tcp_probe::{acked_and_unacked, fin_received};
use super::{End, Mode, Outcome, Stop, reset_on_close, until_end, write_all};
use crate::config;
use crate::ebpf::{KernelPrograms, Side, Window};
use direction::{Direction, Ran};
pub use park::Parked;

/// Settling's buffer (see [`settle`]).
const BUF_SIZE: usize = 64 * 1024;

/// Why a direction stopped early.
#[derive(Debug)]
enum Failed {
    /// Reading from the source, or the source's connection failed.
    Source(io::ErrorKind),
    /// Writing to the destination, or the destination's connection failed.
    Destination(io::ErrorKind),
    /// The destination did not take the bytes within the drain timeout.
    DrainTimeout,
    /// The verdict met bytes it could not put in order; they must not be forwarded.
    Stream,
}

/// Where a kernel-relayed pair stands when it moves to a successor process: what the
/// successor needs to carry on exactly where this process stopped.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Handed {
    /// Socket cookies (client side, upstream side): the pair's map entries.
    pub cookies: [u64; 2],
    /// The sockets' slots (client side, upstream side).
    pub slots: [u32; 2],
    /// `taken()` of each destination when the pair was inserted (index: the destination's side).
    pub bases: [u64; 2],
}

/// How the kernel relay let go of a pair it took.
pub enum Carried {
    Ended(Outcome),
    /// Stopped for a handover; the sockets are off the reactor.
    Moved {
        client: std::net::TcpStream,
        upstream: std::net::TcpStream,
        state: Handed,
        /// Bytes userspace moved (settled before insertion, passed and forwarded after).
        client_to_upstream: u64,
        upstream_to_client: u64,
    },
    /// Parked (see [`Parked`]); [`run`] carries it on ([`Parked::into_taken`]).
    Parked(Parked),
}

/// A pair put under the verdict, for [`run`].
pub struct Taken {
    client: std::net::TcpStream,
    upstream: std::net::TcpStream,
    pair: crate::ebpf::PairGuard,
    bases: [u64; 2],
    /// Bytes userspace settled before the insertion.
    moved: [u64; 2],
    started: Instant,
    /// The watch's wake-ups, when the sockets are watched already (a parked pair).
    wakes: Option<[Arc<tokio::sync::Notify>; 2]>,
    /// Since when no byte has moved, as far as is known (a parked pair's idle time goes on).
    quiet_since: tokio::time::Instant,
    /// Bytes waited in a send queue when the pair was taken (it is not parked at once then).
    waiting: bool,
}

/// What [`take`] made of a pair.
pub enum Take {
    /// Under the verdict: [`run`] carries it on.
    Taken(Taken),
    /// It ended before the verdict relayed a byte of it.
    Ended(Carried),
    /// The sockets back with the reason, for the userspace relay to carry.
    Declined(Declined),
}

/// Puts `client` <-> `upstream` under the verdict. Apart from [`run`], so that a relayed pair's
/// state (boxed by the caller) keeps no room for this step's.
pub async fn take(client: TcpStream, upstream: TcpStream, programs: &KernelPrograms, cfg: &config::Relay) -> Take {
    let started = Instant::now();
    let (c2u, u2c) = (AtomicU64::new(0), AtomicU64::new(0));
    // The pair ended before the kernel relayed a byte of it (settled bytes are counted).
    let ended_early = |end| Take::Ended(ended_before(end, &c2u, &u2c, started));
    let declined = |client, upstream, reason| Take::Declined(Declined::new(client, upstream, reason, &c2u, &u2c));
    match settle(&client, &upstream, &c2u, &u2c).await {
        Ok(true) => {}
        Ok(false) => return declined(client, upstream, PeerClosed.into()),
        // A side failed (a reset): the connection ends here. Handing it to the userspace relay
        // would be wrong: the read that failed has taken the socket's pending error, so that
        // relay would read a plain EOF and pass a FIN on instead of the reset.
        Err(end) => {
            reset_on_close(&client);
            reset_on_close(&upstream);
            return ended_early(end);
        }
    }
    // Everything userspace wrote so far (the 101, the request, settled bytes) is in the send
    // queues now; the destinations' "taken" counts (acknowledged plus queued) start from here.
    let (bases, waiting) = match (acked_and_unacked(&client), acked_and_unacked(&upstream)) {
        (Ok(c), Ok(u)) => ([c.0 + c.1, u.0 + u.1], c.1 + u.1 > 0),
        (Err(e), _) | (_, Err(e)) => return declined(client, upstream, e.into()),
    };
    super::buffers::for_kernel_relay(&client, &upstream, cfg);
    let pair = match programs.insert_pair(&client, &upstream, window(cfg)) {
        Ok(p) => p,
        Err(_) if fin_received(&client) || fin_received(&upstream) => {
            return declined(client, upstream, PeerClosed.into());
        }
        Err(e) => return declined(client, upstream, e),
    };
    // Off the reactor: while the verdict redirects, every batch would wake it for nothing to
    // read. The watch wakes a direction on a FIN, an error or passed bytes instead.
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => (c, u),
        (c, u) => {
            tracing::warn!("kernel relay: cannot take the sockets off the reactor");
            let _ = pair.remove();
            for s in [c.ok(), u.ok()].into_iter().flatten() {
                reset_on_close(&s);
            }
            return ended_early(End::Internal);
        }
    };
    Take::Taken(Taken {
        client,
        upstream,
        pair,
        bases,
        moved: [c2u.into_inner(), u2c.into_inner()],
        started,
        wakes: None,
        quiet_since: tokio::time::Instant::now(),
        waiting,
    })
}

/// How a pair just [`take`]n starts.
pub enum Start {
    /// Parked at once ([`Parked::wait`], then [`run`] of [`Parked::into_taken`]).
    Parked(Parked),
    /// Its relay runs ([`run`]).
    Run(Taken),
}

/// Parks a pair just [`take`]n, before its relay runs, when nothing waits in its sockets' send
/// queues and nothing was passed to userspace yet: an idle connection then never holds the
/// running relay's state (with `relay.park_after` zero, never).
pub fn start(t: Taken, programs: &KernelPrograms, cfg: &config::Relay) -> Start {
    if cfg.park_after.is_zero() || t.waiting {
        return Start::Run(t);
    }
    let watch = programs.watch();
    let (c, u) = t.pair.cookies();
    let wakes = match (
        watch.register(c, t.client.as_fd()),
        watch.register(u, t.upstream.as_fd()),
    ) {
        (Ok(c), Ok(u)) => [c, u],
        _ => {
            // The relay registers them again, and says why if it fails too.
            watch.unregister(c, t.client.as_fd());
            watch.unregister(u, t.upstream.as_fd());
            return Start::Run(t);
        }
    };
    // Bytes passed before the sockets were watched woke nobody: the relay reads them first.
    let (from_client, from_upstream) = (t.pair.side(Side::Client), t.pair.side(Side::Upstream));
    if from_client.passed > 0 || from_upstream.passed > 0 {
        return Start::Run(Taken {
            wakes: Some(wakes),
            ..t
        });
    }
    // Quiet as of the look at the send queues, before the insertion: nothing redirected then.
    // A byte the verdict redirected since (it may already wait for a peer that does not read)
    // counts as activity, which the parked pair's first look finds.
    let quiet = t.moved[0] + t.moved[1];
    let since = t.quiet_since;
    Start::Parked(Parked::new(t, wakes, (quiet, since), watch))
}

/// Carries on with a pair a predecessor process relayed in the kernel and handed over
/// ([`Carried::Moved`]): the same map entries, the same counts.
pub fn resume<'a>(
    client: std::net::TcpStream,
    upstream: std::net::TcpStream,
    state: Handed,
    moved: [u64; 2],
    programs: &'a KernelPrograms,
    cfg: &'a config::Relay,
    stop: Stop<'a>,
) -> impl Future<Output = Carried> + 'a {
    let taken = Taken {
        client,
        upstream,
        pair: programs.adopt_pair(state.cookies, state.slots),
        bases: state.bases,
        moved,
        started: Instant::now(),
        wakes: None,
        quiet_since: tokio::time::Instant::now(),
        waiting: true,
    };
    run(taken, programs, cfg, stop)
}

/// A pair that ended before the verdict relayed a byte of it: the bytes userspace moved.
fn ended_before(end: End, c2u: &AtomicU64, u2c: &AtomicU64, started: Instant) -> Carried {
    let bytes = (c2u.load(Relaxed), u2c.load(Relaxed));
    Carried::Ended(Outcome::copied(Mode::Kernel, end, bytes, started.elapsed()))
}

/// Relays a pair under the verdict ([`take`]n, [`resume`]d, or [`Parked`] and woken) to its
/// end, or until it moves to a successor or parks.
#[allow(clippy::manual_async_fn)] // the body's comment says why
pub fn run<'a>(
    taken: Taken,
    programs: &'a KernelPrograms,
    cfg: &'a config::Relay,
    stop: Stop<'a>,
) -> impl Future<Output = Carried> + 'a {
    // Taken apart here, not in the body: what the body's future captures it keeps once.
    let Taken {
        client,
        upstream,
        pair,
        bases,
        moved,
        started,
        wakes,
        quiet_since,
        waiting: _,
    } = taken;
    // Not an `async fn`: its future would keep each argument twice, as the argument and as the
    // body's own binding, for the pair's whole life.
    async move {
        let (c2u, u2c) = (AtomicU64::new(moved[0]), AtomicU64::new(moved[1]));
        let ended_early = |end| ended_before(end, &c2u, &u2c, started);
        let watch = programs.watch();
        let (cookies, wakes) = {
            let (c, u) = pair.cookies();
            let wake = |cookie, s: &std::net::TcpStream| watch.register(cookie, s.as_fd());
            let wakes = match wakes {
                Some([c, u]) => (Ok(c), Ok(u)),
                None => (wake(c, &client), wake(u, &upstream)),
            };
            ([c, u], wakes)
        };
        let unwatch = || {
            watch.unregister(cookies[0], client.as_fd());
            watch.unregister(cookies[1], upstream.as_fd());
        };
        let wakes = match wakes {
            (Ok(c), Ok(u)) => [c, u],
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "kernel relay: cannot watch the sockets");
                unwatch();
                let _ = pair.remove();
                reset_on_close(&client);
                reset_on_close(&upstream);
                return ended_early(End::Internal);
            }
        };
        // Set once this relay has shut a socket down for writing (index: the socket's side).
        let shut = [AtomicBool::new(false), AtomicBool::new(false)];
        let never = tokio_util::sync::CancellationToken::new();
        // Stops both directions at their next wait: for a handover (a child of its token), or
        // to park the pair once it is quiet (the count it was quiet at, and since when).
        let pause = stop.handover.child_token();
        let parked_at = OnceLock::new();
        let flow = {
            // Each direction starts from the passed bytes already reported forwarded in its slot:
            // none for a new pair, the predecessor's count for one handed over.
            let direction = |from: Side, handover| {
                let forwarded = pair.forwarded(from);
                let (pair_of, dst_base) = match from {
                    Side::Client => ([&client, &upstream], bases[1]),
                    Side::Upstream => ([&upstream, &client], bases[0]),
                };
                Direction::new(
                    pair_of,
                    from,
                    dst_base,
                    forwarded,
                    &pair,
                    cfg,
                    &shut,
                    &wakes[from as usize],
                    handover,
                )
            };
            // Activity: bytes the verdict moved plus bytes userspace forwarded.
            let activity = || {
                let k = pair.counters();
                k.from_client.redirected + k.from_upstream.redirected + c2u.load(Relaxed) + u2c.load(Relaxed)
            };
            let both = async {
                let directions = async {
                    tokio::try_join!(
                        side_of(direction(Side::Client, &pause).run(&c2u), Side::Client),
                        side_of(direction(Side::Upstream, &pause).run(&u2c), Side::Upstream)
                    )
                };
                let park = async {
                    let quiet = park::quiet(cfg.park_after, [&client, &upstream], &activity, quiet_since).await;
                    let _ = parked_at.set(quiet);
                    pause.cancel();
                    std::future::pending::<std::convert::Infallible>().await
                };
                let (a, b) = tokio::select! {
                    r = directions => r?,
                    never = park => match never {},
                };
                // A direction that finished (FIN passed on) cannot move: the other goes on here, as
                // the userspace relay does (boxed: rare).
                match (a, b) {
                    (Ran::Paused, Ran::Paused) => Ok(true),
                    (Ran::Done, Ran::Done) => Ok(false),
                    (Ran::Paused, Ran::Done) => {
                        Box::pin(side_of(direction(Side::Client, &never).run(&c2u), Side::Client)).await?;
                        Ok(false)
                    }
                    (Ran::Done, Ran::Paused) => {
                        let rest = direction(Side::Upstream, &never).run(&u2c);
                        Box::pin(side_of(rest, Side::Upstream)).await?;
                        Ok(false)
                    }
                }
            };
            let both = std::pin::pin!(both);
            until_end(both, [&client, &upstream], cfg, stop, &activity, quiet_since).await
        };
        let (c2u, u2c) = (c2u.into_inner(), u2c.into_inner());
        let end = match flow {
            Ok(true) if !stop.handover.is_cancelled() => {
                // Parked: the sockets stay watched, the entries in the maps.
                let now = tokio::time::Instant::now();
                let quiet = parked_at.get().copied().unwrap_or((u64::MAX, now));
                let taken = Taken {
                    client,
                    upstream,
                    pair,
                    bases,
                    moved: [c2u, u2c],
                    started,
                    wakes: None,
                    quiet_since: quiet.1,
                    waiting: false,
                };
                return Carried::Parked(Parked::new(taken, wakes, quiet, watch));
            }
            Ok(true) => {
                // Handed over: the entries stay for the successor, this watch lets go.
                unwatch();
                let (cookies, slots) = pair.hand_over();
                return Carried::Moved {
                    client,
                    upstream,
                    state: Handed { cookies, slots, bases },
                    client_to_upstream: c2u,
                    upstream_to_client: u2c,
                };
            }
            Ok(false) => End::Closed,
            Err(end) => end,
        };
        // Out of the maps before the sockets close: no verdict may redirect into a closing socket.
        let counters = pair.remove().unwrap_or_default();
        unwatch();
        if end != End::Closed {
            reset_on_close(&client);
            reset_on_close(&upstream);
        }
        Carried::Ended(Outcome {
            mode: Mode::Kernel,
            end,
            client_to_upstream: counters.from_client.redirected + c2u,
            upstream_to_client: counters.from_upstream.redirected + u2c,
            repeated_cut: counters.from_client.repeated + counters.from_upstream.repeated,
            passed: c2u + u2c,
            duration: started.elapsed(),
        })
    }
}

/// A connection the kernel relay did not take: the sockets, untouched but for the bytes
/// [`settle`] already moved (counted here), for the userspace relay to carry on.
pub struct Declined {
    pub client: TcpStream,
    pub upstream: TcpStream,
    pub reason: anyhow::Error,
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

impl Declined {
    fn new(client: TcpStream, upstream: TcpStream, reason: anyhow::Error, c2u: &AtomicU64, u2c: &AtomicU64) -> Self {
        let (client_to_upstream, upstream_to_client) = (c2u.load(Relaxed), u2c.load(Relaxed));
        Declined {
            client,
            upstream,
            reason,
            client_to_upstream,
            upstream_to_client,
        }
    }
}

/// A side closed before the pair could be put under the verdict (the socket map takes only
/// established sockets); the userspace relay carries such a connection to its end.
#[derive(Debug, thiserror::Error)]
#[error("a side closed before the kernel relay could take the connection")]
pub struct PeerClosed;

/// Reads what both sockets have queued, writing it to the other side. The verdict path takes
/// whole skbs from a receive queue (`tcp_read_skb`), so an skb that userspace has read in part
/// (the handshake reads in chunks) would be relayed again from its start. A read shorter than
/// the buffer emptied the queue, so no skb is left in part; bytes that arrive after it come in
/// whole skbs, which the kick after insertion relays. `Ok(false)`: a side reached EOF; `Err`:
/// a side failed, as the end of the connection.
async fn settle(client: &TcpStream, upstream: &TcpStream, c2u: &AtomicU64, u2c: &AtomicU64) -> Result<bool, End> {
    // Room only: usually nothing is queued, and a zeroed 64 KiB per pair would be for nothing.
    let mut buf = Vec::with_capacity(BUF_SIZE);
    let on = |side: Side, e: io::Error| failed_on(side, e.kind());
    for (src, dst, count, from) in [
        (client, upstream, c2u, Side::Client),
        (upstream, client, u2c, Side::Upstream),
    ] {
        loop {
            // The FIN is not looked for here: a side at its end ends the settle anyway.
            let drained = match read(src, &mut buf, false) {
                Ok(Read::End) => return Ok(false),
                Ok(Read::Nothing) => break,
                Ok(Read::Full) => false,
                Ok(Read::Drained | Read::Last) => true,
                Err(e) => return Err(on(from, e)),
            };
            write_all(dst, &buf).await.map_err(|e| on(from.other(), e))?;
            count.fetch_add(buf.len() as u64, Relaxed);
            if drained {
                break;
            }
        }
    }
    Ok(true)
}

/// How the connection ends when `side`'s socket failed.
fn failed_on(side: Side, kind: io::ErrorKind) -> End {
    match side {
        Side::Client => End::ClientError(kind),
        Side::Upstream => End::UpstreamError(kind),
    }
}

/// Maps a direction's failure onto the side that caused it.
///
/// A combinator, not an `async fn`: an async fn keeps its future argument twice in its state
/// (as the argument, and as the future it awaits), and a direction's future is what an idle
/// pair's memory is made of.
fn side_of<T>(run: impl Future<Output = Result<T, Failed>>, from: Side) -> impl Future<Output = Result<T, End>> {
    run.map(move |r| {
        r.map_err(|f| match f {
            Failed::Source(k) => failed_on(from, k),
            Failed::Destination(k) => failed_on(from.other(), k),
            Failed::DrainTimeout => End::DrainTimeout,
            Failed::Stream => End::StreamFault,
        })
    })
}

/// The verdict's bound on bytes in flight per direction.
fn window(cfg: &config::Relay) -> Window {
    Window {
        bytes: cfg.max_in_flight_bytes,
        skbs: cfg.max_in_flight_skbs,
    }
}
