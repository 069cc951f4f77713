//! The userspace relay: both directions copied by tokio, with half-close.
//!
//! Given a promotion [`Policy`] (`relay.mode = "auto"`), it hands the pair back once the policy
//! says so, at a point where neither direction holds a byte (each has written all it read), so
//! that the kernel relay can carry on exactly where it stopped.
//!
//! A direction blocked on its destination (a peer that does not read) does not look at its
//! source, and a direction waiting for its source does not write to its destination: neither
//! would see that socket fail. So a watcher, beside the copies, waits for an error on either
//! socket and ends both directions at once.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::frames::Frames;
use super::promotion::{Policy, Run};
use super::read::{Read, read};
use super::{
    CopyFailed, End, Mode, Outcome, Stop, copy_side, reset_on_close, until_end, write_all, write_all_then_fin,
};
use crate::config;

/// Large enough that a bulk transfer costs few system calls. Allocated only while bytes are
/// flowing, so that an idle connection holds no buffer.
const BUF_SIZE: usize = 64 * 1024;

/// How the userspace relay let go of a connection.
pub enum Carried {
    /// It carried the connection to its end.
    Ended(Outcome),
    /// The promotion policy was met: the pair, with nothing in userspace's hands, for the
    /// kernel relay.
    Promote(Handover),
}

/// A pair the userspace relay hands over, with what it relayed so far.
pub struct Handover {
    pub client: TcpStream,
    pub upstream: TcpStream,
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    /// Messages the userspace relay carried (both directions; see `relay::promotion`).
    pub messages: u64,
}

/// Relays to the end, or (with a `policy`) until the pair is due to move to the kernel relay.
#[allow(clippy::manual_async_fn)] // the body's comment says why
pub fn relay(
    client: TcpStream,
    upstream: TcpStream,
    cfg: &config::Relay,
    stop: Stop<'_>,
    policy: Option<Policy>,
) -> impl Future<Output = Carried> {
    // Not an `async fn`: its future would keep each argument twice, as the argument and as
    // the body's own binding.
    async move {
        let started = Instant::now();
        if policy.is_some_and(|p| p.due(&mut Run::default())) {
            // `promote_after_messages = 0`: nothing to carry here.
            return Carried::Promote(Handover {
                client,
                upstream,
                client_to_upstream: 0,
                upstream_to_client: 0,
                messages: 0,
            });
        }
        let counts = Counts::default();
        // Cancelled once the policy is met, or by a handover (a child of its token): each direction
        // then stops at its next point with an empty buffer. One token for both, so that a waiting
        // direction waits on one.
        let moving = stop.handover.child_token();
        let promoter = Promoter {
            policy,
            moving: &moving,
            counts: &counts,
        };
        let flow = {
            // The first error ends both directions: try_join drops the other copy at once. (The
            // copies are made where they are awaited, inside the `select!`: a future made before the
            // block that awaits it is kept twice in its state, as a captured value and as the
            // future awaited.)
            let both = async {
                tokio::select! {
                    r = async {
                        let (a, b) = tokio::try_join!(
                            copy_side(copy(&client, &upstream, &counts.c2u, &promoter), true),
                            copy_side(copy(&upstream, &client, &counts.u2c, &promoter), false)
                        )?;
                        // A direction that finished (EOF passed on) cannot move: the other goes on
                        // here (boxed: rare, and every connection would otherwise carry its state).
                        match (a, b) {
                            (Copied::Paused, Copied::Paused) => Ok(Flow::Promote),
                            (Copied::Finished, Copied::Finished) => Ok(Flow::Done),
                            (Copied::Paused, Copied::Finished) => {
                                let never = Promoter::never(&counts);
                                Box::pin(copy_side(copy(&client, &upstream, &counts.c2u, &never), true)).await?;
                                Ok(Flow::Done)
                            }
                            (Copied::Finished, Copied::Paused) => {
                                let never = Promoter::never(&counts);
                                Box::pin(copy_side(copy(&upstream, &client, &counts.u2c, &never), false)).await?;
                                Ok(Flow::Done)
                            }
                        }
                    } => r,
                    end = failed(&client, &upstream) => Err(end),
                }
            };
            let both = std::pin::pin!(both);
            until_end(
                both,
                [&client, &upstream],
                cfg,
                stop,
                || counts.bytes(),
                tokio::time::Instant::now(),
            )
            .await
        };
        let end = match flow {
            Ok(Flow::Promote) => {
                return Carried::Promote(Handover {
                    client,
                    upstream,
                    client_to_upstream: counts.c2u.into_inner(),
                    upstream_to_client: counts.u2c.into_inner(),
                    messages: counts.messages.into_inner(),
                });
            }
            Ok(Flow::Done) => End::Closed,
            Err(end) => end,
        };
        if end != End::Closed {
            // Pass the abort on: a reset tells the surviving peer the stream did not end cleanly, and
            // discards whatever it would otherwise still try to deliver.
            reset_on_close(&client);
            reset_on_close(&upstream);
        }
        let bytes = (counts.c2u.into_inner(), counts.u2c.into_inner());
        Carried::Ended(Outcome::copied(Mode::Userspace, end, bytes, started.elapsed()))
    }
}

/// How both directions left off.
enum Flow {
    Done,
    Promote,
}

/// How one direction left off.
enum Copied {
    /// EOF, passed on as a FIN.
    Finished,
    /// Stopped for a promotion, holding no byte.
    Paused,
}

#[derive(Default)]
struct Counts {
    c2u: AtomicU64,
    u2c: AtomicU64,
    messages: AtomicU64,
    /// The promotion policy's current run of messages (both directions).
    run: std::sync::Mutex<Run>,
}

impl Counts {
    fn bytes(&self) -> u64 {
        self.c2u.load(Relaxed) + self.u2c.load(Relaxed)
    }
}

/// What a direction checks after each write: whether the pair is due to move.
struct Promoter<'a> {
    policy: Option<Policy>,
    /// Cancelled when the pair is to move: to the kernel relay once the policy is met, or to a
    /// successor process (a handover).
    moving: &'a CancellationToken,
    counts: &'a Counts,
}

impl<'a> Promoter<'a> {
    fn never(counts: &'a Counts) -> Self {
        static NEVER: std::sync::LazyLock<CancellationToken> = std::sync::LazyLock::new(CancellationToken::new);
        Promoter {
            policy: None,
            moving: &NEVER,
            counts,
        }
    }

    /// Counts the messages of `bytes` (a read, written on; `frames` follows its direction's
    /// headers); true once the pair should stop for the move. Without a policy nothing is
    /// counted: only a move needs the count.
    fn after_write(&self, bytes: &[u8], frames: &mut Frames) -> bool {
        if self.moving.is_cancelled() {
            return true;
        }
        let Some(p) = self.policy else {
            return false;
        };
        let messages = frames.feed(bytes);
        self.counts.messages.fetch_add(messages, Relaxed);
        let mut run = crate::lock::lock(&self.counts.run);
        if p.observe(&mut run, bytes.len() as u64, messages, Instant::now()) {
            self.moving.cancel();
        }
        self.moving.is_cancelled()
    }

    /// Completes once a move was asked for: by the policy (never without one), or a handover.
    fn requested(&self) -> tokio_util::sync::WaitForCancellationFuture<'a> {
        self.moving.cancelled()
    }
}

/// Completes once either socket has an error (a reset, a keepalive timeout), with the end of the
/// side that failed. A FIN is no error: the bytes still to be delivered either way are.
async fn failed(client: &TcpStream, upstream: &TcpStream) -> End {
    let kind = |s: &TcpStream| {
        // The error itself, if no copy has consumed it meanwhile (a read or write that returns it
        // clears it); then the reset that is the usual cause.
        s.take_error()
            .ok()
            .flatten()
            .map_or(io::ErrorKind::ConnectionReset, |e| e.kind())
    };
    tokio::select! {
        r = client.ready(Interest::ERROR) => End::ClientError(r.err().map_or_else(|| kind(client), |e| e.kind())),
        r = upstream.ready(Interest::ERROR) => End::UpstreamError(r.err().map_or_else(|| kind(upstream), |e| e.kind())),
    }
}

/// Copies until EOF, then shuts the destination down for writing (passes the FIN on); or, once
/// a promotion is asked for, stops where it holds no byte.
async fn copy(
    from: &TcpStream,
    to: &TcpStream,
    count: &AtomicU64,
    promoter: &Promoter<'_>,
) -> Result<Copied, CopyFailed> {
    let mut frames = Frames::default();
    loop {
        let fin_seen = tokio::select! {
            // A promotion asked for while this direction waits: it holds nothing, stop here.
            biased;
            () = promoter.requested() => return Ok(Copied::Paused),
            r = from.ready(Interest::READABLE) => r.map_err(CopyFailed::Read)?.is_read_closed(),
        };
        let mut buf = Vec::with_capacity(BUF_SIZE);
        loop {
            let (drained, last) = match read(from, &mut buf, fin_seen) {
                Ok(Read::End) => {
                    nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write)
                        .map_err(|e| CopyFailed::Write(e.into()))?;
                    return Ok(Copied::Finished);
                }
                Ok(Read::Full) => (false, false),
                Ok(Read::Drained) => (true, false),
                Ok(Read::Last) => (true, true),
                // Drop the buffer while waiting for more.
                Ok(Read::Nothing) => break,
                Err(e) => return Err(CopyFailed::Read(e)),
            };
            if last {
                write_all_then_fin(to, &buf).await.map_err(CopyFailed::Write)?;
            } else {
                write_all(to, &buf).await.map_err(CopyFailed::Write)?;
            }
            count.fetch_add(buf.len() as u64, Relaxed);
            let pause = promoter.after_write(&buf, &mut frames);
            if last {
                // The FIN is passed on: nothing is left to move, whatever the promoter says.
                return Ok(Copied::Finished);
            }
            if pause {
                return Ok(Copied::Paused);
            }
            if drained {
                break;
            }
        }
    }
}
