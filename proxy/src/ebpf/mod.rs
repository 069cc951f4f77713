//! Loading and attaching the kernel relay (`proxy-ebpf`), and the map operations the relay uses:
//! putting a pair of proxy-side sockets under the verdict, reading its counters, taking it out.
//!
//! Errors from [`KernelPrograms::load`] are one short line, fit for
//! `kernel relay: unavailable (<reason>)`.

use std::{
    io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, OwnedFd},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, RingBuf, SockHash},
    programs::{ProgramError, SkSkb, sk_skb::SkSkbLink},
};
use proxy_common::{
    COPIED_SEQ_OFFSET_GLOBAL, CTRL_MAP, EVENTS_MAP, LOST_MAP, SKB_CB_OFFSET_GLOBAL, SOCKETS_MAP, STATE_MAP, SockCtrl,
    SockState, VERDICT_PROGRAM, WRITE_SEQ_OFFSET_GLOBAL,
};

use crate::lock::lock;

mod kernel_layout;
mod watch;
pub use kernel_layout::KernelLayout;
pub use watch::Watch;

/// The eBPF object built by `build.rs` (empty when the build was skipped with AYA_BUILD_SKIP).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// `BPF_NOEXIST`: a map insert fails if the key is present (a socket is relayed at most once).
const BPF_NOEXIST: u64 = 1;

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
const HANDOVER_MAPS: [&str; 5] = [SOCKETS_MAP, STATE_MAP, CTRL_MAP, EVENTS_MAP, LOST_MAP];

/// The three maps, each behind a mutex because aya's update calls take `&mut` (the syscalls
/// themselves are short and thread-safe).
struct RelayMaps {
    sockets: Mutex<SockHash<MapData, u64>>,
    states: Mutex<HashMap<MapData, u64, SockState>>,
    ctrls: Mutex<HashMap<MapData, u64, SockCtrl>>,
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
        let link = attach_verdict(&mut ebpf, &lock(&programs.maps.sockets))?;
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
                LOST_MAP => Map::Array(data),
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
        let states: HashMap<MapData, u64, SockState> = next(STATE_MAP)?.try_into().map_err(|e| typed(STATE_MAP, e))?;
        let ctrls: HashMap<MapData, u64, SockCtrl> = next(CTRL_MAP)?.try_into().map_err(|e| typed(CTRL_MAP, e))?;
        let events: RingBuf<MapData> = next(EVENTS_MAP)?.try_into().map_err(|e| typed(EVENTS_MAP, e))?;
        let lost: Array<MapData, u64> = next(LOST_MAP)?.try_into().map_err(|e| typed(LOST_MAP, e))?;
        let watch = Watch::new(events, lost, ring_now).context("an epoll instance for relayed sockets")?;
        Ok(Self {
            maps: Arc::new(RelayMaps {
                sockets: Mutex::new(sockets),
                states: Mutex::new(states),
                ctrls: Mutex::new(ctrls),
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
    pub fn adopt_pair(&self, cookies: [u64; 2]) -> PairGuard {
        PairGuard {
            maps: Arc::clone(&self.maps),
            cookies,
            removed: false,
        }
    }

    /// Where relayed sockets wait for a FIN, an error or passed bytes (see [`Watch`]).
    pub fn watch(&self) -> &Arc<Watch> {
        &self.watch
    }

    /// Puts a pair of proxy-side sockets under the verdict: bytes received on `client` go out
    /// on `upstream` and the reverse.
    ///
    /// `ctrl` is the initial credit of each direction (see [`SockCtrl`]).
    ///
    /// Order: both state and credit entries, then both sockets into the socket map, then a
    /// kick on each (`SO_RCVLOWAT` = 1) so that bytes already queued on a socket are relayed now
    /// rather than when the next segment arrives. Bytes arriving on `client` in the instant
    /// before `upstream` is in the map cannot be redirected: they are passed to userspace on
    /// `client` and counted in `passed`.
    ///
    /// The caller keeps both sockets open for as long as the guard lives. On error, whatever
    /// was inserted has been removed again.
    pub fn insert_pair(&self, client: &impl AsFd, upstream: &impl AsFd, ctrl: SockCtrl) -> anyhow::Result<PairGuard> {
        let (client, upstream) = (client.as_fd(), upstream.as_fd());
        let cookies = [socket_cookie(client)?, socket_cookie(upstream)?];
        self.maps.insert_states(cookies)?;
        if let Err(e) = self.maps.insert_ctrls(cookies, ctrl) {
            let _ = self.maps.remove_pair(cookies);
            return Err(e);
        }
        // From here on the guard owns both entries: any error below drops it, which removes them.
        let guard = PairGuard {
            maps: Arc::clone(&self.maps),
            cookies,
            removed: false,
        };
        self.maps.insert_sockets(cookies, [client, upstream])?;
        for fd in [client, upstream] {
            kick(fd)?;
        }
        Ok(guard)
    }

    /// Entries in (socket map, state map, credit map): all zero when no pair is relayed.
    pub fn map_entry_counts(&self) -> (usize, usize, usize) {
        let sockets = lock(&self.maps.sockets).keys().count();
        let states = lock(&self.maps.states).keys().count();
        let ctrls = lock(&self.maps.ctrls).keys().count();
        (sockets, states, ctrls)
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
/// socket map and deletes both state entries.
#[must_use = "dropping the guard takes the pair out of the kernel relay at once"]
pub struct PairGuard {
    maps: Arc<RelayMaps>,
    /// Cookies of the client-side and the upstream-side socket.
    cookies: [u64; 2],
    removed: bool,
}

impl PairGuard {
    /// Socket cookies of the client side and the upstream side.
    pub fn cookies(&self) -> (u64, u64) {
        (self.cookies[0], self.cookies[1])
    }

    /// Current counters (they keep growing while the pair is relayed).
    pub fn counters(&self) -> anyhow::Result<PairCounters> {
        self.maps.counters(self.cookies)
    }

    /// The verdict's state of one side's socket (bytes that arrived on it).
    pub fn state(&self, side: Side) -> anyhow::Result<SockState> {
        lock(&self.maps.states)
            .get(&self.cookies[side as usize], 0)
            .map_err(|e| map_error("reading a socket state", &e))
    }

    /// Replaces the credit of one side's socket (the direction from that side).
    pub fn set_ctrl(&self, side: Side, ctrl: SockCtrl) -> anyhow::Result<()> {
        lock(&self.maps.ctrls)
            .insert(self.cookies[side as usize], ctrl, 0)
            .map_err(|e| map_error("updating a socket's credit", &e))
    }

    /// Leaves the pair in the maps, for a successor process to take over
    /// ([`KernelPrograms::adopt_pair`]); returns its cookies.
    pub fn hand_over(mut self) -> [u64; 2] {
        self.removed = true;
        self.cookies
    }

    /// Takes the pair out of the relay and returns the final counters.
    pub fn remove(mut self) -> anyhow::Result<PairCounters> {
        self.removed = true;
        self.maps.remove_pair(self.cookies)
    }
}

impl Drop for PairGuard {
    fn drop(&mut self) {
        if !self.removed
            && let Err(err) = self.maps.remove_pair(self.cookies)
        {
            tracing::warn!(error = %format!("{err:#}"), "kernel relay: removing a pair failed");
        }
    }
}

impl RelayMaps {
    /// Both entries or neither. `BPF_NOEXIST`: a socket already in a pair is refused, and the
    /// other pair's entries are left alone.
    fn insert_states(&self, [client, upstream]: [u64; 2]) -> anyhow::Result<()> {
        let mut states = lock(&self.states);
        let entry = |peer_cookie| SockState {
            peer_cookie,
            ..SockState::default()
        };
        states
            .insert(client, entry(upstream), BPF_NOEXIST)
            .map_err(|e| map_error("adding the client socket's state", &e))?;
        if let Err(e) = states.insert(upstream, entry(client), BPF_NOEXIST) {
            let _ = states.remove(&client);
            return Err(map_error("adding the upstream socket's state", &e));
        }
        Ok(())
    }

    fn insert_ctrls(&self, cookies: [u64; 2], ctrl: SockCtrl) -> anyhow::Result<()> {
        let mut ctrls = lock(&self.ctrls);
        for cookie in cookies {
            ctrls
                .insert(cookie, ctrl, BPF_NOEXIST)
                .map_err(|e| map_error("adding a socket's credit", &e))?;
        }
        Ok(())
    }

    fn insert_sockets(&self, cookies: [u64; 2], fds: [BorrowedFd<'_>; 2]) -> anyhow::Result<()> {
        let mut sockets = lock(&self.sockets);
        for (cookie, fd) in cookies.into_iter().zip(fds) {
            sockets
                .insert(cookie, fd.as_raw_fd(), BPF_NOEXIST)
                .map_err(|e| map_error("adding a socket to the socket map", &e))?;
        }
        Ok(())
    }

    fn counters(&self, [client, upstream]: [u64; 2]) -> anyhow::Result<PairCounters> {
        let states = lock(&self.states);
        let read = |cookie: u64| -> anyhow::Result<SocketCounters> {
            let state = states
                .get(&cookie, 0)
                .map_err(|e| map_error("reading a socket state", &e))?;
            Ok(SocketCounters {
                redirected: state.redirected,
                passed: state.passed,
                repeated: state.repeated,
                broken: state.broken,
            })
        };
        Ok(PairCounters {
            from_client: read(client)?,
            from_upstream: read(upstream)?,
        })
    }

    /// Sockets first (no new verdicts for the pair), then the counters, then the states.
    /// Entries already gone (a socket the kernel dropped from the map at close, or a half-done
    /// insertion) are not errors.
    fn remove_pair(&self, cookies: [u64; 2]) -> anyhow::Result<PairCounters> {
        let mut first_error = None;
        {
            let mut sockets = lock(&self.sockets);
            for cookie in cookies {
                if let Err(e) = sockets.remove(&cookie).or_else(ignore_missing) {
                    first_error.get_or_insert(map_error("removing a socket from the socket map", &e));
                }
            }
        }
        let counters = self.counters(cookies).unwrap_or_default();
        let mut states = lock(&self.states);
        let mut ctrls = lock(&self.ctrls);
        for cookie in cookies {
            if let Err(e) = states.remove(&cookie).or_else(ignore_missing) {
                first_error.get_or_insert(map_error("removing a socket state", &e));
            }
            if let Err(e) = ctrls.remove(&cookie).or_else(ignore_missing) {
                first_error.get_or_insert(map_error("removing a socket's credit", &e));
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(counters),
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

fn ignore_missing(err: MapError) -> Result<(), MapError> {
    match &err {
        MapError::KeyNotFound | MapError::ElementNotFound => Ok(()),
        MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        _ => Err(err),
    }
}

fn map_error(what: &str, err: &MapError) -> anyhow::Error {
    match err {
        MapError::SyscallError(e) => anyhow!("{what}: {}", short_io(&e.io_error)),
        other => anyhow!("{what}: {other}"),
    }
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
