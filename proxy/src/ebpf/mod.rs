//! Loading and attaching the kernel relay (`proxy-ebpf`), and the map operations the relay uses:
//! putting a pair of proxy-side sockets under the verdict, reading its counters, taking it out.
//!
//! Per socket the relay keeps one socket-map entry (by cookie, the redirect target), one index
//! entry (cookie -> slot) and one slot (`slots`: state and credit together, in memory shared
//! with the verdict). A pair costs four map updates to put in (the index's two in one batch)
//! and three to take out; reading its counters and reporting forwarded bytes cost none.
//!
//! Errors from [`KernelPrograms::load`] are one short line, fit for
//! `kernel relay: unavailable (<reason>)`.

use std::{
    io,
    mem::offset_of,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, RingBuf, SockHash},
    programs::{ProgramError, SkSkb, sk_skb::SkSkbLink},
};
use proxy_common::{
    COPIED_SEQ_OFFSET_GLOBAL, EVENTS_MAP, INDEX_MAP, LOST_MAP, MAX_SOCKETS, SKB_CB_OFFSET_GLOBAL, SLOTS_MAP,
    SOCKETS_MAP, Slot, VERDICT_PROGRAM, WRITE_SEQ_OFFSET_GLOBAL,
};

use crate::lock::lock;

mod bpf_sys;
mod kernel_layout;
mod slots;
mod watch;
use bpf_sys::BPF_NOEXIST;
pub use kernel_layout::KernelLayout;
use slots::Slots;
pub use watch::{ParkedCount, Watch};

/// The eBPF object built by `build.rs` (empty when the build was skipped with AYA_BUILD_SKIP).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// The loaded verdict program, attached to the socket map, and the maps it uses.
///
/// Dropping it detaches and unloads the program. Share it (e.g. in an `Arc`) between
/// connections: every method takes `&self`.
pub struct KernelPrograms {
    maps: Arc<RelayMaps>,
    watch: Arc<Watch>,
    /// Copies of the maps' descriptors, in [`HANDOVER_MAPS`] order: what a successor process
    /// receives to carry on with the same maps (and the verdict attached to the socket map).
    handover: Vec<OwnedFd>,
    /// The verdict's attachment to the socket map, when this process made it: dropped, it
    /// detaches the verdict, unless a successor has taken the maps over ([`Self::keep_attached`]).
    link: Mutex<Option<SkSkbLink>>,
    /// Owns the program (`None` when adopted: the socket map holds the attached verdict, and
    /// the process that loaded it may be gone).
    _ebpf: Option<Ebpf>,
}

/// The maps a successor receives, in order.
const HANDOVER_MAPS: [&str; 5] = [SOCKETS_MAP, INDEX_MAP, SLOTS_MAP, EVENTS_MAP, LOST_MAP];

/// The per-socket maps. Updates go through `bpf_sys` (thread-safe system calls, no lock); aya's
/// typed maps serve to count entries and to attach the verdict.
struct RelayMaps {
    sockets: SockHash<MapData, u64>,
    index: HashMap<MapData, u64, u32>,
    index_fd: OwnedFd,
    slots: Slots,
    /// Keeps the slots map's descriptor open: the loaded verdict was relocated against it.
    _slots_map: MapData,
}

impl KernelPrograms {
    /// Loads the object, creates the maps, loads the verdict and attaches it to the socket map
    /// (once, before any socket is inserted).
    pub fn load() -> anyhow::Result<Self> {
        if OBJECT.is_empty() {
            bail!("not built (AYA_BUILD_SKIP was set)");
        }
        let layout = KernelLayout::of_running_kernel().context("kernel layout")?;
        raise_memlock_limit();
        let mut ebpf = EbpfLoader::new()
            .override_global(SKB_CB_OFFSET_GLOBAL, &layout.skb_cb, true)
            .override_global(COPIED_SEQ_OFFSET_GLOBAL, &layout.tcp_copied_seq, true)
            .override_global(WRITE_SEQ_OFFSET_GLOBAL, &layout.tcp_write_seq, true)
            .load(OBJECT)
            .map_err(|e| short_ebpf_error("loading the object", e))?;
        let mut taken = Vec::new();
        for name in HANDOVER_MAPS {
            taken.push(
                ebpf.take_map(name)
                    .ok_or_else(|| anyhow!("map {name} missing from the object"))?,
            );
        }
        let handover = taken
            .iter()
            .map(|m| map_data(m).fd().as_fd().try_clone_to_owned())
            .collect::<io::Result<Vec<_>>>()
            .context("copying the maps' descriptors")?;
        let mut programs = Self::from_maps(taken, handover, true)?;
        let link = attach_verdict(&mut ebpf, &programs.maps.sockets)?;
        *lock(&programs.link) = Some(link);
        programs._ebpf = Some(ebpf);
        Ok(programs)
    }

    /// The programs and maps a predecessor process loaded, from its map descriptors (in the
    /// order [`KernelPrograms::handover_fds`] gives them): the verdict stays attached to the
    /// socket map, so pairs it relays go on being relayed. The ring buffer of wake-ups stays the
    /// predecessor's until [`Watch::take_ring`].
    pub fn adopt(fds: Vec<OwnedFd>) -> anyhow::Result<Self> {
        if fds.len() != HANDOVER_MAPS.len() {
            bail!("{} map descriptors, {} expected", fds.len(), HANDOVER_MAPS.len());
        }
        let handover = fds
            .iter()
            .map(|f| f.try_clone())
            .collect::<io::Result<Vec<_>>>()
            .context("copying the maps' descriptors")?;
        let mut maps = Vec::new();
        for (fd, variant) in fds.into_iter().zip(HANDOVER_MAPS) {
            let data = MapData::from_fd(fd).map_err(|e| anyhow!("map {variant}: {e}"))?;
            maps.push(match variant {
                SOCKETS_MAP => Map::SockHash(data),
                EVENTS_MAP => Map::RingBuf(data),
                LOST_MAP | SLOTS_MAP => Map::Array(data),
                _ => Map::HashMap(data),
            });
        }
        Self::from_maps(maps, handover, false)
    }

    fn from_maps(maps: Vec<Map>, handover: Vec<OwnedFd>, ring_now: bool) -> anyhow::Result<Self> {
        let mut maps = maps.into_iter();
        let mut next = |name: &str| maps.next().ok_or_else(|| anyhow!("map {name} missing"));
        let typed = |name: &str, e: MapError| anyhow!("map {name}: {e}");
        let sockets: SockHash<MapData, u64> = next(SOCKETS_MAP)?.try_into().map_err(|e| typed(SOCKETS_MAP, e))?;
        let index = next(INDEX_MAP)?;
        // aya's hash map does not lend its descriptor: keep one for the batch commands.
        let index_fd = map_data(&index)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("copying the index's descriptor")?;
        let index: HashMap<MapData, u64, u32> = index.try_into().map_err(|e| typed(INDEX_MAP, e))?;
        let Map::Array(slots_map) = next(SLOTS_MAP)? else {
            bail!("map {SLOTS_MAP}: not an array");
        };
        let slots = Slots::map(slots_map.fd().as_fd(), MAX_SOCKETS).context("mapping the slots")?;
        let events: RingBuf<MapData> = next(EVENTS_MAP)?.try_into().map_err(|e| typed(EVENTS_MAP, e))?;
        let lost: Array<MapData, u64> = next(LOST_MAP)?.try_into().map_err(|e| typed(LOST_MAP, e))?;
        let watch = Watch::new(events, lost, ring_now).context("an epoll instance for relayed sockets")?;
        Ok(Self {
            maps: Arc::new(RelayMaps {
                sockets,
                index,
                index_fd,
                slots,
                _slots_map: slots_map,
            }),
            watch: Arc::new(watch),
            handover,
            link: Mutex::new(None),
            _ebpf: None,
        })
    }

    /// A successor relays with these maps from now on: the verdict must stay attached when
    /// this process ends (the socket map keeps the program; both go with the last process that
    /// holds the map).
    pub fn keep_attached(&self) {
        if let Some(link) = lock(&self.link).take() {
            std::mem::forget(link);
        }
    }

    /// Copies of the maps' descriptors for a successor process ([`KernelPrograms::adopt`]).
    pub fn handover_fds(&self) -> io::Result<Vec<OwnedFd>> {
        self.handover.iter().map(|f| f.try_clone()).collect()
    }

    /// What a successor must have been built with to adopt these programs: a hash of the
    /// kernel object (the verdict, the maps and the layout of their values).
    pub fn object_hash() -> u64 {
        use std::hash::Hasher as _;
        let mut h = siphasher::sip::SipHasher13::new_with_keys(0, 0);
        h.write(OBJECT);
        h.finish()
    }

    /// Takes over a pair a predecessor put under the verdict (its entries are in the maps).
    pub fn adopt_pair(&self, cookies: [u64; 2], slots: [u32; 2]) -> PairGuard {
        PairGuard {
            maps: Arc::clone(&self.maps),
            cookies,
            slots,
            removed: false,
        }
    }

    /// Where relayed sockets wait for a FIN, an error or passed bytes (see [`Watch`]).
    pub fn watch(&self) -> &Arc<Watch> {
        &self.watch
    }

    /// Puts a pair of proxy-side sockets under the verdict: bytes received on `client` go out
    /// on `upstream` and the reverse, within `window` per direction.
    ///
    /// Order: both slots claimed and filled, both index entries (one batch), then both sockets
    /// into the socket map, then a kick on each (`SO_RCVLOWAT` = 1) so that bytes already
    /// queued on a socket are relayed now rather than when the next segment arrives. Bytes
    /// arriving on `client` in the instant before `upstream` is in the map cannot be redirected:
    /// they are passed to userspace on `client` and counted in `passed`.
    ///
    /// The caller keeps both sockets open for as long as the guard lives. On error, whatever
    /// was inserted has been removed again.
    pub fn insert_pair(&self, client: &impl AsFd, upstream: &impl AsFd, window: Window) -> anyhow::Result<PairGuard> {
        let (client, upstream) = (client.as_fd(), upstream.as_fd());
        let cookies = [socket_cookie(client)?, socket_cookie(upstream)?];
        let fill = |peer_cookie| Slot {
            peer_cookie,
            window_bytes: window.bytes,
            window_skbs: window.skbs,
            ..Slot::default()
        };
        let maps = &self.maps;
        let Some(first) = maps.slots.claim(cookies[0], &fill(cookies[1])) else {
            bail!("every slot of the kernel relay is in use");
        };
        let Some(second) = maps.slots.claim(cookies[1], &fill(cookies[0])) else {
            maps.slots.release(first, cookies[0]);
            bail!("every slot of the kernel relay is in use");
        };
        // From here on the guard owns the slots and entries: any error below drops it, which
        // removes whatever is in.
        let guard = PairGuard {
            maps: Arc::clone(maps),
            cookies,
            slots: [first, second],
            removed: false,
        };
        // Cookies are never reused and a socket enters the relay once, from the task that owns
        // it, so the index entries are new (the batch command takes no `BPF_NOEXIST`); the
        // socket map refuses a socket already in it.
        bpf_sys::update_two(maps.index_fd.as_fd(), &cookies, &guard.slots, 0)
            .map_err(|e| io_error("adding the sockets' index entries", &e))?;
        for (cookie, fd) in cookies.iter().zip([client, upstream]) {
            bpf_sys::update(maps.sockets.fd().as_fd(), cookie, &(fd.as_raw_fd() as u32), BPF_NOEXIST)
                .map_err(|e| io_error("adding a socket to the socket map", &e))?;
        }
        for fd in [client, upstream] {
            kick(fd)?;
        }
        Ok(guard)
    }

    /// Entries in (socket map, index) and slots held: all zero when no pair is relayed.
    pub fn map_entry_counts(&self) -> (usize, usize, usize) {
        let sockets = self.maps.sockets.keys().count();
        let index = self.maps.index.keys().count();
        (sockets, index, self.maps.slots.held())
    }
}

impl Drop for KernelPrograms {
    fn drop(&mut self) {
        self.watch.stop();
    }
}

/// One side of a relayed pair; also the direction that starts there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client = 0,
    Upstream = 1,
}

impl Side {
    /// The other side of the pair.
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
}

/// The verdict's bound on bytes in flight per direction (see `proxy_common::Slot`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Most bytes in flight (0: never redirect).
    pub bytes: u64,
    /// Most skbs redirected since the peer last had nothing in flight.
    pub skbs: u64,
}

/// Byte counts of one proxy-side socket, as the verdict saw them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketCounters {
    /// Bytes received on this socket and redirected to the peer's egress.
    pub redirected: u64,
    /// Bytes received on this socket and left to userspace (`SK_PASS`).
    pub passed: u64,
    /// Bytes the kernel handed the verdict a second time, cut before relaying.
    pub repeated: u64,
    /// Skbs that could not be made to follow on from the last (the pair must end).
    pub broken: u64,
}

/// Counters of both sides of a pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairCounters {
    /// Bytes that arrived on the client-side socket (from the client).
    pub from_client: SocketCounters,
    /// Bytes that arrived on the upstream-side socket (from the upstream).
    pub from_upstream: SocketCounters,
}

/// A pair under the verdict. [`PairGuard::remove`] (or drop) takes both sockets out of the
/// socket map and the index, and releases their slots.
#[must_use = "dropping the guard takes the pair out of the kernel relay at once"]
pub struct PairGuard {
    maps: Arc<RelayMaps>,
    /// Cookies of the client-side and the upstream-side socket.
    cookies: [u64; 2],
    /// Their slots.
    slots: [u32; 2],
    removed: bool,
}

impl PairGuard {
    /// Socket cookies of the client side and the upstream side.
    pub fn cookies(&self) -> (u64, u64) {
        (self.cookies[0], self.cookies[1])
    }

    /// Current counters (they keep growing while the pair is relayed).
    pub fn counters(&self) -> PairCounters {
        PairCounters {
            from_client: self.side(Side::Client),
            from_upstream: self.side(Side::Upstream),
        }
    }

    /// The verdict's counters of one side's socket (bytes that arrived on it).
    pub fn side(&self, side: Side) -> SocketCounters {
        // The four words, not the whole slot: read on every wake-up and activity check.
        let load = |field| self.word(side, field).load(Ordering::Acquire);
        SocketCounters {
            redirected: load(offset_of!(Slot, redirected)),
            passed: load(offset_of!(Slot, passed)),
            repeated: load(offset_of!(Slot, repeated)),
            broken: load(offset_of!(Slot, broken)),
        }
    }

    /// Passed bytes from `side`'s socket that userspace has reported written to the other side
    /// ([`PairGuard::report_forwarded`]; zero for a new pair).
    pub fn forwarded(&self, side: Side) -> u64 {
        self.word(side, offset_of!(Slot, forwarded)).load(Ordering::Acquire)
    }

    /// Reports to the verdict how many passed bytes from `side`'s socket userspace has written
    /// to the other side.
    pub fn report_forwarded(&self, side: Side, forwarded: u64) {
        self.word(side, offset_of!(Slot, forwarded))
            .store(forwarded, Ordering::Release);
    }

    /// One field (its offset in [`Slot`]) of `side`'s slot.
    fn word(&self, side: Side, field: slots::Field) -> &AtomicU64 {
        self.maps.slots.field(self.slots[side as usize], field)
    }

    /// Leaves the pair in the maps, for a successor process to take over
    /// ([`KernelPrograms::adopt_pair`]); returns its cookies and slots.
    pub fn hand_over(mut self) -> ([u64; 2], [u32; 2]) {
        self.removed = true;
        (self.cookies, self.slots)
    }

    /// Takes the pair out of the relay and returns the final counters.
    pub fn remove(mut self) -> anyhow::Result<PairCounters> {
        self.removed = true;
        self.take_out()
    }

    /// Sockets first (no new verdicts for the pair), then the counters, then the index entries
    /// and the slots. Entries already gone (a socket the kernel dropped from the map at close,
    /// or a half-done insertion) are not errors.
    fn take_out(&self) -> anyhow::Result<PairCounters> {
        let maps = &self.maps;
        let mut first_error = None;
        for cookie in &self.cookies {
            if let Err(e) = bpf_sys::delete(maps.sockets.fd().as_fd(), cookie) {
                first_error.get_or_insert(io_error("removing a socket from the socket map", &e));
            }
        }
        let counters = self.counters();
        if let Err(e) = bpf_sys::delete_two(maps.index_fd.as_fd(), &self.cookies) {
            first_error.get_or_insert(io_error("removing the sockets' index entries", &e));
        }
        for (slot, cookie) in self.slots.into_iter().zip(self.cookies) {
            maps.slots.release(slot, cookie);
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(counters),
        }
    }
}

impl Drop for PairGuard {
    fn drop(&mut self) {
        if !self.removed
            && let Err(err) = self.take_out()
        {
            tracing::warn!(error = %format!("{err:#}"), "kernel relay: removing a pair failed");
        }
    }
}

/// The map data of one of the relay's maps.
fn map_data(map: &Map) -> &MapData {
    match map {
        Map::SockHash(d) | Map::HashMap(d) | Map::RingBuf(d) | Map::Array(d) => d,
        _ => unreachable!("the relay has no map of another type"),
    }
}

fn attach_verdict(ebpf: &mut Ebpf, sockets: &SockHash<MapData, u64>) -> anyhow::Result<SkSkbLink> {
    let program: &mut SkSkb = ebpf
        .program_mut(VERDICT_PROGRAM)
        .ok_or_else(|| anyhow!("program {VERDICT_PROGRAM} missing from the object"))?
        .try_into()
        .map_err(|e: ProgramError| anyhow!("program {VERDICT_PROGRAM}: {e}"))?;
    program
        .load()
        .map_err(|e| short_program_error("loading the verdict", e))?;
    let link = program
        .attach(sockets.fd())
        .map_err(|e| short_program_error("attaching the verdict", e))?;
    program
        .take_link(link)
        .map_err(|e| short_program_error("keeping the verdict attached", e))
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones ignore it. Best effort:
/// a failure here shows up as a clearer error at load time.
fn raise_memlock_limit() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    if let Err(err) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        tracing::debug!(%err, "kernel relay: could not raise RLIMIT_MEMLOCK");
    }
}

/// `getsockopt(SOL_SOCKET, SO_COOKIE)`: the kernel's unique, never reused id of a socket.
fn socket_cookie(fd: BorrowedFd<'_>) -> anyhow::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd and an out-buffer of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("reading SO_COOKIE");
    }
    Ok(cookie)
}

/// `setsockopt(SOL_SOCKET, SO_RCVLOWAT, 1)`: makes TCP call the socket's data-ready callback,
/// which now runs the verdict over the bytes already queued (they would otherwise wait for the
/// next segment).
fn kick(fd: BorrowedFd<'_>) -> anyhow::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid fd and an in-buffer of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("kicking a socket (SO_RCVLOWAT)");
    }
    Ok(())
}

fn io_error(what: &str, err: &io::Error) -> anyhow::Error {
    anyhow!("{what}: {}", short_io(err))
}

fn short_ebpf_error(what: &str, err: EbpfError) -> anyhow::Error {
    if let EbpfError::ProgramError(e) = err {
        return short_program_error(what, e);
    }
    // Map creation and BTF loading keep the syscall's io::Error as the source.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(io_error) = e.downcast_ref::<io::Error>() {
            return anyhow!("{what}: {}", short_io(io_error));
        }
        source = e.source();
    }
    anyhow!("{what}: {err}")
}

fn short_program_error(what: &str, err: ProgramError) -> anyhow::Error {
    match err {
        ProgramError::LoadError { io_error, verifier_log } => {
            tracing::debug!(%verifier_log, "kernel relay: verifier log");
            if io_error.raw_os_error() == Some(libc::EPERM) {
                anyhow!("{what}: {}", short_io(&io_error))
            } else {
                anyhow!("{what}: rejected by the kernel ({io_error}); the verifier log is logged at debug level")
            }
        }
        ProgramError::SyscallError(e) => anyhow!("{what}: {}", short_io(&e.io_error)),
        other => anyhow!("{what}: {other}"),
    }
}

/// One line for the common causes; the OS message otherwise.
fn short_io(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => {
            "operation not permitted: need CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON".to_owned()
        }
        // ENOTSUPP (524) is the kernel-internal "not supported", leaked by some BPF paths.
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524) => {
            format!("not supported by this kernel ({err})")
        }
        _ => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_programs_can_be_shared_between_tasks() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<KernelPrograms>();
        assert_send_sync::<PairGuard>();
    }

    #[test]
    fn permission_errors_read_as_missing_capabilities() {
        let err = io::Error::from_raw_os_error(libc::EPERM);
        assert_eq!(
            short_io(&err),
            "operation not permitted: need CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
        );
    }

    #[test]
    fn the_object_is_embedded_and_aligned() {
        // Empty only when the eBPF build was skipped on purpose.
        if std::env::var_os("AYA_BUILD_SKIP").is_none() {
            assert!(OBJECT.starts_with(b"\x7fELF"), "proxy-ebpf object is not an ELF file");
        }
        assert_eq!(OBJECT.as_ptr().align_offset(8), 0);
    }
}
