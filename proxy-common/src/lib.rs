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

/// Name of the `HashMap<u64, SockState>` map: socket cookie -> [`SockState`].
pub const STATE_MAP: &str = "WSP_STATE";

/// Name of the `HashMap<u64, SockCtrl>` map: socket cookie -> [`SockCtrl`] (written by userspace
/// only).
pub const CTRL_MAP: &str = "WSP_CTRL";

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

/// Capacity of both maps: two entries per relayed connection.
pub const MAX_SOCKETS: u32 = 2 * MAX_RELAYED_PAIRS;

/// State of one proxy-side socket of a kernel-relayed pair, keyed by the socket's cookie.
///
/// Writers: userspace writes the whole entry once, at insertion (counters zero), and removes it
/// when the pair ends. After that only the verdict writes, and only the counters and `next_seq`.
/// Userspace must not rewrite an entry while the pair is live: a map update replaces the value,
/// which would lose counts the verdict adds at the same moment. Anything userspace must change
/// during the relay (credit grants) belongs in a map of its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// Cookie of the other proxy-side socket of the pair: bytes received here go out there.
    pub peer_cookie: u64,
    /// Bytes the verdict redirected from this socket to the peer's egress. Userspace needs it to
    /// know when the peer's TCP has taken everything before it sends a FIN there.
    pub redirected: u64,
    /// Bytes the verdict left to userspace (`SK_PASS`) on this socket: past the in-flight window
    /// ([`SockCtrl`]), or because the redirect failed (the peer is not, or no longer, in the socket map).
    pub passed: u64,
    /// Number of skbs the verdict redirected from this socket. Memory held by queued skbs is
    /// their true size, not their payload: a sender of one-byte segments would hold far more
    /// than its byte credit, so skbs are bounded too.
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
}

/// Set in [`SockState::next_seq`] once the low 32 bits hold a sequence number.
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

/// Userspace's side of the bound on bytes in flight from one socket, keyed by its cookie.
///
/// The verdict redirects an skb only while (a) every byte it ever passed to userspace has been
/// forwarded (`SockState::passed == forwarded`: otherwise a redirected byte could overtake a
/// passed one), and (b) the bytes not yet taken by the peer's TCP (redirected plus forwarded,
/// less the peer's progress: see `SockState::peer_base`) stay within `window_bytes` and the skbs
/// redirected since the peer last caught up stay below `window_skbs`. The verdict renews this
/// credit itself as the peer's TCP takes bytes, so a destination that keeps up never sees a
/// pass. Otherwise it passes the skb: the bytes wait in this socket's receive queue and the
/// sender is held back by its own TCP window. Userspace forwards passed bytes once the peer's TCP
/// has taken every redirected byte. Only userspace writes this map (whole values), so there is
/// no lost update.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockCtrl {
    /// Passed bytes userspace has written to the peer.
    pub forwarded: u64,
    /// Most bytes in flight towards the peer (redirected or forwarded, not yet taken by its TCP).
    /// A redirect into a peer that has taken everything is allowed whatever its size; 0 means
    /// never redirect (every byte goes to userspace).
    pub window_bytes: u64,
    /// Most skbs redirected since the peer last had nothing in flight. Memory held by queued
    /// skbs is their true size, not their payload: a sender of one-byte segments would hold far
    /// more than its byte window, so skbs are bounded too.
    pub window_skbs: u64,
}

// SAFETY: `SockState` is `#[repr(C)]`, `Copy`, has only `u64` fields (no padding, checked by the
// tests below) and every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SockState {}

// SAFETY: as for `SockState`: `#[repr(C)]`, `Copy`, `u64` fields only, every bit pattern valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SockCtrl {}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, offset_of, size_of};

    use super::*;

    #[test]
    fn sock_state_has_no_padding() {
        assert_eq!(size_of::<SockState>(), size_of::<[u64; 9]>());
        assert_eq!(size_of::<SockCtrl>(), 3 * size_of::<u64>());
        assert_eq!(align_of::<SockCtrl>(), align_of::<u64>());
        assert_eq!(align_of::<SockState>(), align_of::<u64>());
        assert_eq!(offset_of!(SockState, peer_cookie), 0);
        assert_eq!(offset_of!(SockState, redirected), 8);
        assert_eq!(offset_of!(SockState, passed), 16);
        assert_eq!(offset_of!(SockState, redirected_skbs), 24);
        assert_eq!(offset_of!(SockState, next_seq), 32);
        assert_eq!(offset_of!(SockState, broken), 48);
        assert_eq!(offset_of!(SockState, skb_base), 64);
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        // The kernel keeps 15 bytes of a map or program name; shorter names show up whole in
        // `bpftool map` / `bpftool prog`, so operators see the names used here.
        for name in [SOCKETS_MAP, STATE_MAP, CTRL_MAP, EVENTS_MAP, LOST_MAP, VERDICT_PROGRAM] {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
        }
    }
}
