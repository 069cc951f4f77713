//! What wsproxy (userspace) and `proxy-ebpf` (the kernel relay) must agree on: map names, map
//! capacities and the layout of the per-socket state.
//!
//! Both sides are compiled separately (the eBPF side for `bpfel-unknown-none`), so every shared
//! value lives here once. The state struct is `#[repr(C)]` with `u64` fields only, so its layout
//! is identical on both targets and has no padding (the kernel copies map values byte for byte;
//! padding bytes would be uninitialised memory on one side).
#![cfg_attr(not(test), no_std)]

/// Name of the `SockHash<u64>` map: socket cookie -> socket. The verdict program is attached to
/// it, and redirects into it by the peer's cookie.
pub const SOCKETS_MAP: &str = "WSP_SOCKETS";

/// Name of the `HashMap<u64, u32>` map: socket cookie -> index of the socket's [`Slot`] in
/// [`SLOTS_MAP`]. Written by userspace only, once when a socket enters the relay and once when it
/// leaves.
pub const INDEX_MAP: &str = "WSP_INDEX";

/// Name of the `Array<Slot>` map (`BPF_F_MMAPABLE`): one [`Slot`] per relayed socket, state and
/// credit together. Userspace maps it into its memory, so reading the verdict's counters and
/// reporting forwarded bytes cost no system call.
pub const SLOTS_MAP: &str = "WSP_SLOTS";

/// Name of the ring buffer the verdict writes a socket's cookie to when userspace has work on
/// that socket: bytes passed to it after none were waiting, or bytes out of order. Userspace
/// keeps relayed sockets off its reactor's read interest (the verdict's redirects would wake it
/// for every batch) and learns of passes from here.
pub const EVENTS_MAP: &str = "WSP_EVENTS";

/// Size of [`EVENTS_MAP`] in bytes (a power of two, a multiple of the page size). A record is a
/// cookie (8 bytes) and an 8-byte header: room for 16,384 pending wake-ups.
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Name of the one-element `Array<u64>` the verdict sets to 1 when the ring buffer was full and
/// a wake-up was lost: userspace then wakes every relayed socket once.
pub const LOST_MAP: &str = "WSP_LOST";

/// Name of the `sk_skb` stream_verdict program (the Rust function name in `proxy-ebpf`).
pub const VERDICT_PROGRAM: &str = "wsp_verdict";

/// Most relayed connections at once. Each one puts two sockets (client side, upstream side) into
/// both maps.
pub const MAX_RELAYED_PAIRS: u32 = 32_768;

/// Capacity of the socket map, the index and the slots: two per relayed connection.
pub const MAX_SOCKETS: u32 = 2 * MAX_RELAYED_PAIRS;

/// `BPF_F_MMAPABLE`: the slots array can be mapped into userspace memory.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// State and credit of one proxy-side socket of a kernel-relayed pair: one element of
/// [`SLOTS_MAP`], found through [`INDEX_MAP`] by the socket's cookie.
///
/// Writers, field by field (no field has two, so nothing is lost to a concurrent write; every
/// field is an aligned `u64`, read and written whole on both sides):
/// - userspace, before the socket enters the socket map and while no verdict can run for it:
///   `owner`, `peer_cookie`, `window_bytes`, `window_skbs`, and every other field set to zero;
/// - userspace, while the pair is relayed: `forwarded` only;
/// - the verdict: the counters, `next_seq`, `peer_base` and `skb_base`.
///
/// A slot is claimed by swapping `owner` from free to the socket's cookie (atomic, so two
/// processes sharing the maps during an upgrade never take the same slot). A released slot is
/// marked [`FREED`] with the time, and claimed again only [`QUARANTINE_MS`] later: a verdict
/// that looked the slot up just before the socket left the maps may still be running, and must
/// not count into another socket's slot. The verdict also checks `owner` against the cookie it
/// runs for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    /// Cookie of the socket that holds the slot; `FREED | milliseconds` once released
    /// (`CLOCK_MONOTONIC`); 0 if never used.
    pub owner: u64,
    /// Cookie of the other proxy-side socket of the pair: bytes received here go out there.
    pub peer_cookie: u64,
    /// Most bytes in flight towards the peer (redirected or forwarded, not yet taken by its TCP).
    /// A redirect into a peer that has taken everything is allowed whatever its size; 0 means
    /// never redirect (every byte goes to userspace).
    pub window_bytes: u64,
    /// Most skbs redirected since the peer last had nothing in flight. Memory held by queued
    /// skbs is their true size, not their payload: a sender of one-byte segments would hold far
    /// more than its byte window, so skbs are bounded too.
    pub window_skbs: u64,
    /// Passed bytes userspace has written to the peer (userspace's report).
    pub forwarded: u64,
    /// Bytes the verdict redirected from this socket to the peer's egress. Userspace needs it to
    /// know when the peer's TCP has taken everything before it sends a FIN there.
    pub redirected: u64,
    /// Bytes the verdict left to userspace (`SK_PASS`) on this socket: past the in-flight window,
    /// or because the redirect failed (the peer is not, or no longer, in the socket map).
    pub passed: u64,
    /// Number of skbs the verdict redirected from this socket.
    pub redirected_skbs: u64,
    /// Sequence number just past the last byte the verdict took from this socket, in the low
    /// 32 bits, with [`SEQ_KNOWN`] set once it is known (zero at insertion). The kernel can hand
    /// the verdict an skb that starts before this (see `docs/kernel-relay.md`): its head has
    /// been relayed already.
    pub next_seq: u64,
    /// Bytes the verdict cut from the head of skbs because they had been relayed already.
    pub repeated: u64,
    /// Skbs the verdict could not make start at `next_seq` (a gap, or a repeat too long to cut).
    /// Their bytes are passed, never redirected, and userspace ends the pair without forwarding
    /// them: the stream is closed rather than delivered wrong.
    pub broken: u64,
    /// The peer's `tcp_sock.write_seq` less every byte written into the peer since insertion, in
    /// the low 32 bits, with [`SEQ_KNOWN`] set once known (zero at insertion). The peer's TCP
    /// has taken `write_seq - this` bytes of this direction (redirected and forwarded): the
    /// verdict's measure of the destination's progress.
    pub peer_base: u64,
    /// `redirected_skbs` when the peer was last seen to have taken every byte: the skbs
    /// redirected since are the ones that may still be queued for it.
    pub skb_base: u64,
    /// Pads the slot to 128 bytes: two whole cache lines, no slot shares one with another.
    pub _pad: [u64; 3],
}

/// Set in [`Slot::owner`] when the slot was released; the low bits hold when.
pub const FREED: u64 = 1 << 63;

/// Milliseconds a released slot waits before it is claimed again. A verdict runs within one RCU
/// read-side section (microseconds), so this is far beyond the longest it can still be running
/// for a socket that has left the maps.
pub const QUARANTINE_MS: u64 = 1000;

/// Set in [`Slot::next_seq`] once the low 32 bits hold a sequence number.
pub const SEQ_KNOWN: u64 = 1 << 32;

/// Names of the verdict's read-only globals that userspace sets at load time from the running
/// kernel's BTF: byte offsets of `struct sk_buff`'s `cb` and of `struct tcp_sock`'s
/// `copied_seq`. The verdict reads the skb's sequence numbers (the first two `u32`s of the
/// `cb`, `struct tcp_skb_cb`) and, for the first skb of a socket, how far userspace had read.
pub const SKB_CB_OFFSET_GLOBAL: &str = "WSP_SKB_CB_OFF";
pub const COPIED_SEQ_OFFSET_GLOBAL: &str = "WSP_COPIED_SEQ_OFF";
/// Byte offset of `struct tcp_sock`'s `write_seq`: how far the peer's TCP has taken bytes into
/// its send queue, the progress the verdict's in-flight bound is measured against.
pub const WRITE_SEQ_OFFSET_GLOBAL: &str = "WSP_WRITE_SEQ_OFF";

// SAFETY: `Slot` is `#[repr(C)]`, `Copy`, has only `u64` fields (no padding, checked by the
// tests below) and every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Slot {}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, offset_of, size_of};

    use super::*;

    #[test]
    fn a_slot_is_two_cache_lines_without_padding() {
        assert_eq!(size_of::<Slot>(), size_of::<[u64; 16]>());
        assert_eq!(size_of::<Slot>(), 128);
        assert_eq!(align_of::<Slot>(), align_of::<u64>());
        assert_eq!(offset_of!(Slot, owner), 0);
        assert_eq!(offset_of!(Slot, forwarded), 32);
        assert_eq!(offset_of!(Slot, redirected), 40);
        assert_eq!(offset_of!(Slot, skb_base), 96);
        // The mapped array is page-aligned; whole slots fit a page, so none straddles two.
        assert_eq!(4096 % size_of::<Slot>(), 0);
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        // The kernel keeps 15 bytes of a map or program name; shorter names show up whole in
        // `bpftool map` / `bpftool prog`, so operators see the names used here.
        for name in [SOCKETS_MAP, INDEX_MAP, SLOTS_MAP, EVENTS_MAP, LOST_MAP, VERDICT_PROGRAM] {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
        }
    }
}
