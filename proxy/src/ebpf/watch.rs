//! Wake-ups for kernel-relayed sockets, without the reactor's read interest.
//!
//! While the verdict redirects, every batch it moves calls the socket's data-ready callback,
//! which wakes any epoll instance that watches the socket for input: on the proxy's reactor that
//! is one thread wake-up (measured: one context switch and about 10 us of the proxy's CPU) per
//! message, for nothing to read. So relayed sockets leave the reactor and are watched here
//! instead, in an epoll instance of their own, for hang-up and errors only (`EPOLLRDHUP`,
//! `EPOLLHUP`, `EPOLLERR`: a FIN, a reset), while the verdict reports the one thing userspace
//! must act on, bytes passed to it, through a ring buffer ([`proxy_common::EVENTS_MAP`]). Both
//! become a [`Notify`] per socket: a wake-up that comes while nobody waits is kept.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use aya::maps::{Array, MapData, RingBuf};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::lock::lock;

/// Events taken from the epoll instance per system call.
const BATCH: usize = 256;

/// The watch of one set of loaded programs.
pub struct Watch {
    epoll: Epoll,
    /// Socket cookie -> who waits on it.
    waiters: Mutex<HashMap<u64, Arc<Notify>>>,
    /// Taken by the dispatcher when it starts (on the first registration, inside the runtime).
    events: Mutex<Option<RingBuf<MapData>>>,
    lost: Mutex<Array<MapData, u64>>,
    started: OnceLock<()>,
    /// Cancelled when the programs are dropped: the dispatcher ends.
    stop: CancellationToken,
    /// Cancelled once this process may consume the ring buffer: at once for programs it loaded,
    /// when its predecessor has released it for adopted ones (one consumer at a time).
    ring_ours: CancellationToken,
    /// Cancelled to stop consuming the ring buffer (a successor takes it over).
    ring_released: CancellationToken,
    /// Pairs parked now (see [`ParkedCount`]).
    parked: AtomicUsize,
}

/// Counts a parked pair (its sockets stay watched, its task keeps a small record) for as long
/// as it lives.
pub struct ParkedCount(Arc<Watch>);

impl ParkedCount {
    pub fn new(watch: &Arc<Watch>) -> Self {
        watch.parked.fetch_add(1, Relaxed);
        ParkedCount(Arc::clone(watch))
    }
}

impl Drop for ParkedCount {
    fn drop(&mut self) {
        self.0.parked.fetch_sub(1, Relaxed);
    }
}

impl Watch {
    pub(super) fn new(events: RingBuf<MapData>, lost: Array<MapData, u64>, ring_now: bool) -> io::Result<Self> {
        let ring_ours = CancellationToken::new();
        if ring_now {
            ring_ours.cancel();
        }
        Ok(Watch {
            ring_ours,
            ring_released: CancellationToken::new(),
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            waiters: Mutex::new(HashMap::new()),
            events: Mutex::new(Some(events)),
            lost: Mutex::new(lost),
            started: OnceLock::new(),
            stop: CancellationToken::new(),
            parked: AtomicUsize::new(0),
        })
    }

    /// Watches `fd` (socket `cookie`, no longer on the reactor) for a FIN, a reset or an error,
    /// and for the verdict's wake-ups; returns what the caller waits on.
    pub fn register(self: &Arc<Self>, cookie: u64, fd: BorrowedFd<'_>) -> io::Result<Arc<Notify>> {
        self.start();
        let notify = Arc::new(Notify::new());
        lock(&self.waiters).insert(cookie, Arc::clone(&notify));
        let flags = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR | EpollFlags::EPOLLET;
        if let Err(e) = self.epoll.add(fd, EpollEvent::new(flags, cookie)) {
            lock(&self.waiters).remove(&cookie);
            return Err(e.into());
        }
        Ok(notify)
    }

    /// Stops watching `fd` (before it closes).
    pub fn unregister(&self, cookie: u64, fd: BorrowedFd<'_>) {
        let _ = self.epoll.delete(fd);
        lock(&self.waiters).remove(&cookie);
    }

    /// Sockets watched now.
    pub fn watched(&self) -> usize {
        lock(&self.waiters).len()
    }

    /// Pairs parked now.
    pub fn parked(&self) -> usize {
        self.parked.load(Relaxed)
    }

    pub(super) fn stop(&self) {
        self.stop.cancel();
    }

    /// This process consumes the ring buffer from now on (its predecessor released it); every
    /// waiter looks once, for the wake-ups that went to the predecessor meanwhile.
    pub fn take_ring(&self) {
        self.ring_ours.cancel();
        self.wake_all();
    }

    /// Stops consuming the ring buffer, for a successor to take it over.
    pub fn release_ring(&self) {
        self.ring_released.cancel();
    }

    fn start(self: &Arc<Self>) {
        self.started.get_or_init(|| {
            let Some(events) = lock(&self.events).take() else {
                return;
            };
            tokio::spawn(dispatch(Arc::clone(self), events));
        });
    }

    fn wake(&self, cookie: u64) {
        if let Some(n) = lock(&self.waiters).get(&cookie) {
            n.notify_one();
        }
    }

    /// After a lost wake-up: every waiter looks once.
    fn wake_all(&self) {
        for n in lock(&self.waiters).values() {
            n.notify_one();
        }
    }

    /// True (and cleared) if the verdict lost a wake-up since the last look.
    fn take_lost(&self) -> bool {
        let mut lost = lock(&self.lost);
        match lost.get(&0, 0) {
            Ok(0) | Err(_) => false,
            Ok(_) => {
                let _ = lost.set(0, 0, 0);
                true
            }
        }
    }
}

/// The epoll instance's fd, for the reactor to watch (the instance lives in the [`Watch`]).
struct EpollFd(RawFd);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Turns the epoll instance's events and the ring buffer's records into wake-ups, until the
/// programs are dropped.
async fn dispatch(watch: Arc<Watch>, events: RingBuf<MapData>) {
    // SAFETY: the fd stays open and unchanged while registered: the epoll instance lives in
    // `watch`, which this task holds until the registration is dropped.
    let epoll =
        unsafe { AsyncFd::register_with_interest(EpollFd(watch.epoll.0.as_fd().as_raw_fd()), Interest::READABLE) };
    let epoll = match epoll {
        Ok(e) => e,
        Err(e) => {
            // Without it no relayed socket would learn of a FIN: say so loudly.
            tracing::error!(error = %io::Error::from(e), "kernel relay: cannot watch relayed sockets");
            return;
        }
    };
    // The ring buffer, once it is this process's to consume (and until it is released).
    let mut events = Some(events);
    let mut ring: Option<AsyncFd<RingBuf<MapData>>> = None;
    let mut batch = vec![EpollEvent::empty(); BATCH];
    loop {
        tokio::select! {
            () = watch.stop.cancelled() => return,
            r = epoll.readable() => {
                let Ok(mut guard) = r else { return };
                loop {
                    let n = match watch.epoll.wait(&mut batch, EpollTimeout::ZERO) {
                        Ok(n) => n,
                        Err(nix::errno::Errno::EINTR) => continue,
                        Err(_) => break,
                    };
                    for e in &batch[..n] {
                        watch.wake(e.data());
                    }
                    if n < batch.len() {
                        break;
                    }
                }
                guard.clear_ready();
            }
            () = watch.ring_ours.cancelled(), if events.is_some() => {
                // SAFETY: the ring buffer is owned by its AsyncFd and not closed before it.
                match unsafe { AsyncFd::register_with_interest(events.take().expect("checked"), Interest::READABLE) } {
                    Ok(r) => ring = Some(r),
                    Err(e) => {
                        tracing::error!(error = %io::Error::from(e), "kernel relay: cannot watch the ring buffer");
                        return;
                    }
                }
            }
            () = watch.ring_released.cancelled(), if ring.is_some() => ring = None,
            r = async { ring.as_mut().expect("guarded").readable_mut().await }, if ring.is_some() && !watch.ring_released.is_cancelled() => {
                let Ok(mut guard) = r else { return };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if let Ok(bytes) = <[u8; 8]>::try_from(&item[..]) {
                        watch.wake(u64::from_ne_bytes(bytes));
                    }
                }
                if watch.take_lost() {
                    watch.wake_all();
                }
                guard.clear_ready();
            }
        }
    }
}
