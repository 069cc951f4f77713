//! wsproxy's kernel relay: one `sk_skb` stream_verdict program (no parser) attached to a socket
//! map. Bytes received on a proxy-side socket of a relayed pair are redirected to the egress of
//! the pair's other socket, so the payload never reaches userspace.
//!
//! Safety rule: TCP has already acknowledged every byte the verdict sees, so the verdict never
//! drops a new byte: it drops only the empty skb of a lone FIN and bytes it has relayed before
//! (see `fresh_bytes`). Anything unexpected (unknown socket, missing peer, failed redirect) becomes `SK_PASS`:
//! the bytes stay readable by userspace on the socket they arrived on, in order, and are counted.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::{
        bpf_get_socket_cookie, bpf_probe_read_kernel,
        generated::{bpf_map_lookup_elem, bpf_sk_release, bpf_skb_adjust_room, bpf_skc_to_tcp_sock},
    },
    macros::{map, stream_verdict},
    maps::{Array, HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};
use proxy_common::{BPF_F_MMAPABLE, EVENTS_BYTES, MAX_SOCKETS, SEQ_KNOWN, Slot};

/// Byte offset of `cb` in `struct sk_buff`, set by userspace from the kernel's BTF
/// (`proxy_common::SKB_CB_OFFSET_GLOBAL`). A read-only global, so the verifier sees a constant.
#[unsafe(no_mangle)]
static WSP_SKB_CB_OFF: u32 = 0;

/// Byte offset of `copied_seq` in `struct tcp_sock`, set like the above
/// (`proxy_common::COPIED_SEQ_OFFSET_GLOBAL`).
#[unsafe(no_mangle)]
static WSP_COPIED_SEQ_OFF: u32 = 0;

/// Byte offset of `write_seq` in `struct tcp_sock`, set like the above
/// (`proxy_common::WRITE_SEQ_OFFSET_GLOBAL`).
#[unsafe(no_mangle)]
static WSP_WRITE_SEQ_OFF: u32 = 0;

/// Most bytes one `bpf_skb_adjust_room` call may cut from an skb's head (`sk_skb_adjust_room`).
const CUT_STEP: u32 = 0xfff;
/// Calls made at most to cut one repeated head: 64 x 4,095 bytes cover 256 KiB, four times the
/// largest skb seen (one 64 KiB GSO segment on loopback).
const CUT_CALLS: u32 = 64;

/// Socket cookie -> socket. Name must equal `proxy_common::SOCKETS_MAP`.
#[map]
static WSP_SOCKETS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// `BPF_F_NO_PREALLOC` for the index. In a preallocated hash map an element deleted by
/// userspace goes back to the free list at once and can be handed out for another key while a
/// verdict still reads it through the pointer it looked up. Without preallocation an element is
/// freed only after an RCU grace period, which every verdict run is inside of.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Socket cookie -> index of its slot. Name must equal `proxy_common::INDEX_MAP`.
#[map]
static WSP_INDEX: HashMap<u64, u32> = HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// State and credit of each relayed socket, mapped into userspace's memory. Name must equal
/// `proxy_common::SLOTS_MAP`.
#[map]
static WSP_SLOTS: Array<Slot> = Array::with_max_entries(MAX_SOCKETS, BPF_F_MMAPABLE);

/// Cookies of sockets userspace has work on. Name must equal `proxy_common::EVENTS_MAP`.
#[map]
static WSP_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Set to 1 when a wake-up did not fit in the ring buffer. Name must equal
/// `proxy_common::LOST_MAP`.
#[map]
static WSP_LOST: Array<u64> = Array::with_max_entries(1, 0);

/// The verdict. Name must equal `proxy_common::VERDICT_PROGRAM`.
#[stream_verdict]
pub fn wsp_verdict(ctx: SkBuffContext) -> u32 {
    let cookie = socket_cookie(&ctx);
    let Some(state) = slot_of(cookie) else {
        return SK_PASS; // not a relayed socket (or already removed): userspace reads it
    };
    let len = u64::from(ctx.len());
    if len == 0 {
        // The skb that carries a lone FIN. Redirected, its empty send fails the peer with EPIPE;
        // passed, it would queue an empty message. It carries no byte, so drop it: TCP has
        // already recorded the FIN, and userspace still reads EOF.
        return SK_DROP;
    }
    // SAFETY (for every access to `*state` below): a non-null pointer into the slots array,
    // whose memory lives as long as the map; the slot is this socket's (`slot_of`) and is not
    // claimed for another before its quarantine has passed, long after this call.
    let len = match fresh_bytes(&ctx, unsafe { &mut *state }, len) {
        Fresh::All => len,
        Fresh::Cut(rest) => rest,
        // Every byte of it was relayed already: TCP has them, the peer has them.
        Fresh::None => return SK_DROP,
        Fresh::Broken => {
            // Passed, never redirected (userspace does not forward it, so `passed` stays ahead of
            // `forwarded` and nothing is redirected after it); userspace ends the pair.
            unsafe {
                count(&raw mut (*state).broken, 1);
                count(&raw mut (*state).passed, len);
            }
            wake(cookie);
            return SK_PASS;
        }
    };
    // SAFETY: as above.
    if may_redirect(unsafe { &mut *state }, len) && redirect_to(&ctx, unsafe { (*state).peer_cookie }) {
        // SAFETY: as above; the field pointers stay inside the value.
        unsafe {
            count(&raw mut (*state).redirected, len);
            count(&raw mut (*state).redirected_skbs, 1);
        }
    } else {
        // SAFETY: as above.
        let idle = unsafe { (*state).passed } == reported_forwarded(unsafe { &*state });
        // SAFETY: as above.
        count(unsafe { &raw mut (*state).passed }, len);
        if idle {
            // Userspace had nothing waiting from this socket: tell it. (While it has, it reads
            // on until it has caught up, and finds these bytes too.)
            wake(cookie);
        }
    }
    // With a redirect target set, SK_PASS means "redirect"; without one, "pass to userspace".
    SK_PASS
}

/// How much of an skb is new to the relay.
enum Fresh {
    /// All of it: it starts where the last one ended.
    All,
    /// Its head had been relayed already and was cut; this many bytes are left.
    Cut(u64),
    /// None of it.
    None,
    /// It cannot be made to start where the last one ended: a gap, a repeat too long to cut, or
    /// sequence numbers that cannot be read.
    Broken,
}

/// Makes the skb start at the first byte not yet relayed from this socket.
///
/// Why: `tcp_read_skb` hands the verdict whole skbs and ignores `copied_seq`, while TCP queues a
/// segment whole when it starts before `rcv_nxt` but also carries new bytes (`tcp_data_queue`,
/// "Partial packet"; `tcp_ofo_queue`): a normal reader skips the old head by sequence number,
/// the verdict would relay it a second time (see `docs/kernel-relay.md`). The verdict therefore
/// keeps the sequence number it has taken bytes up to and cuts what lies before it.
fn fresh_bytes(ctx: &SkBuffContext, state: &mut Slot, len: u64) -> Fresh {
    let Some((seq, end_seq)) = skb_seqs(ctx) else {
        return Fresh::Broken;
    };
    let expected = if state.next_seq & SEQ_KNOWN != 0 {
        state.next_seq as u32
    } else {
        // The first skb since insertion: userspace has read everything before `copied_seq`
        // (it settled the socket before inserting it).
        match copied_seq(ctx) {
            Some(c) => c,
            None => return Fresh::Broken,
        }
    };
    // `end_seq` counts a FIN too; after the FIN nothing follows.
    if (end_seq.wrapping_sub(expected) as i32) > 0 {
        state.next_seq = SEQ_KNOWN | u64::from(end_seq);
    } else {
        state.next_seq = SEQ_KNOWN | u64::from(expected);
    }
    let ahead = expected.wrapping_sub(seq) as i32;
    if ahead == 0 {
        return Fresh::All;
    }
    if ahead < 0 {
        return Fresh::Broken; // bytes between `expected` and `seq` never reached the verdict
    }
    // Cut even an skb that is old through and through before it is dropped: the kernel
    // advances `copied_seq` by the length of a dropped or redirected skb (`tcp_eat_skb`), and
    // old bytes counted there would put it ahead of `rcv_nxt`, which stops the socket's
    // data-ready calls (`tcp_epollin_ready`) until as many new bytes have arrived.
    let old = (ahead as u64).min(len);
    if !cut_head(ctx, old as u32) {
        return Fresh::Broken;
    }
    count(&raw mut state.repeated, old);
    if old == len { Fresh::None } else { Fresh::Cut(len - old) }
}

/// Cuts `n` bytes from the skb's head, at most [`CUT_STEP`] per call.
fn cut_head(ctx: &SkBuffContext, mut n: u32) -> bool {
    for _ in 0..CUT_CALLS {
        if n == 0 {
            return true;
        }
        let step = if n < CUT_STEP { n } else { CUT_STEP };
        // SAFETY: the helper changes only the skb the kernel handed to this program.
        if unsafe { bpf_skb_adjust_room(ctx.skb.skb, -(step as i32), 0, 0) } != 0 {
            return false;
        }
        n -= step;
    }
    n == 0
}

/// `TCP_SKB_CB(skb)->seq` and `->end_seq`: the first two `u32`s of the skb's `cb`.
fn skb_seqs(ctx: &SkBuffContext) -> Option<(u32, u32)> {
    // SAFETY: a read-only global the loader set.
    let off = unsafe { core::ptr::read_volatile(&WSP_SKB_CB_OFF) };
    if off == 0 {
        return None;
    }
    // The context is the kernel's `struct sk_buff` itself; the helper reads kernel memory
    // safely (an error, never a fault).
    let cb = (ctx.skb.skb as *const u8).wrapping_add(off as usize) as *const [u32; 2];
    // SAFETY: see above.
    unsafe { bpf_probe_read_kernel(cb) }.ok().map(|[s, e]| (s, e))
}

/// `tcp_sk(skb->sk)->copied_seq`: how far this socket's bytes had been read.
fn copied_seq(ctx: &SkBuffContext) -> Option<u32> {
    // SAFETY: a read-only global the loader set.
    let off = unsafe { core::ptr::read_volatile(&WSP_COPIED_SEQ_OFF) };
    if off == 0 {
        return None;
    }
    // SAFETY: the context's `sk` field, read as the verifier allows (a socket or null).
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: the helper checks the socket's type and returns null unless it is a TCP socket.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
    if tp.is_null() {
        return None;
    }
    let at = (tp as *const u8).wrapping_add(off as usize) as *const u32;
    // SAFETY: as in `skb_seqs`.
    unsafe { bpf_probe_read_kernel(at) }.ok()
}

/// Order and credit (see `proxy_common::Slot`): redirect only when no passed byte can still be
/// in userspace's hands, and while the bytes the peer's TCP has not taken yet stay within the
/// window. The window renews itself as the peer takes bytes: userspace is needed only when the
/// peer falls behind. A window of 0, or a peer whose progress cannot be read: pass.
fn may_redirect(s: &mut Slot, len: u64) -> bool {
    if s.window_bytes == 0 {
        return false;
    }
    let forwarded = reported_forwarded(s);
    let Some(write_seq) = peer_write_seq(s.peer_cookie) else {
        return false;
    };
    if s.peer_base & SEQ_KNOWN == 0 {
        if s.passed != forwarded {
            // Userspace may have written some passed bytes into the peer without reporting
            // them yet: the peer's progress cannot be told apart from them now.
            return false;
        }
        // Nothing redirected yet, and every byte written into the peer since insertion was
        // forwarded by userspace and reported in `forwarded`.
        s.peer_base = SEQ_KNOWN | u64::from(write_seq.wrapping_sub(forwarded as u32));
    }
    let taken = write_seq.wrapping_sub(s.peer_base as u32);
    // Bytes owed to the peer (redirected, and passed for userspace to forward) less the bytes
    // its TCP has taken; modulo 2^32 like the sequence numbers, and far below 2^31 since the
    // window bounds it.
    let owed = s.redirected.wrapping_add(s.passed) as u32;
    let in_flight = u64::from(owed.wrapping_sub(taken));
    if in_flight == 0 {
        // The peer has taken every byte: every passed byte was written by userspace (so a
        // redirected byte cannot overtake one), and no redirected skb is queued any more.
        // This is how a pair leaves the pass path without waiting for userspace's report.
        s.skb_base = s.redirected_skbs;
        return true;
    }
    // A passed byte that userspace has not reported written may still be in its hands.
    s.passed == forwarded && in_flight + len <= s.window_bytes && s.redirected_skbs - s.skb_base < s.window_skbs
}

/// The peer's `tcp_sock.write_seq`: how far its TCP has taken bytes into its send queue. `None`
/// if the peer is not in the socket map (not yet, or no longer) or the field cannot be read.
fn peer_write_seq(mut peer: u64) -> Option<u32> {
    // SAFETY: a read-only global the loader set.
    let off = unsafe { core::ptr::read_volatile(&WSP_WRITE_SEQ_OFF) };
    if off == 0 {
        return None;
    }
    // aya-ebpf has no lookup for a socket map: the raw helper returns the socket with a
    // reference taken, which must be released on every path.
    // SAFETY: the map is the program's own socket hash (a `SockHash` is its map definition),
    // the key a u64 as the map's key size says.
    let sk = unsafe { bpf_map_lookup_elem((&raw const WSP_SOCKETS).cast_mut().cast(), (&raw mut peer).cast()) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: the helper checks the socket's type and returns null unless it is a TCP socket.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) };
    let seq = if tp.is_null() {
        None
    } else {
        let at = (tp as *const u8).wrapping_add(off as usize) as *const u32;
        // SAFETY: as in `skb_seqs`.
        unsafe { bpf_probe_read_kernel(at) }.ok()
    };
    // SAFETY: `sk` came from the lookup above and is released exactly once.
    unsafe { bpf_sk_release(sk) };
    seq
}

/// Passed bytes userspace has reported forwarded from this socket. Userspace writes the field
/// while the verdict runs: read it once, as it is now.
fn reported_forwarded(s: &Slot) -> u64 {
    // SAFETY: an aligned u64 inside the slot; a volatile read keeps the compiler from reading
    // it twice and seeing two values.
    unsafe { core::ptr::read_volatile(&raw const s.forwarded) }
}

/// The slot of a relayed socket: `None` if the socket is not (or no longer) relayed, or if the
/// slot the index names is not held by this socket.
fn slot_of(cookie: u64) -> Option<*mut Slot> {
    // SAFETY: the value is copied out at once.
    let index = unsafe { WSP_INDEX.get(&cookie) }.copied()?;
    let slot = WSP_SLOTS.get_ptr_mut(index)?;
    // SAFETY: a pointer into the array, valid while the program runs. Userspace claims and
    // releases a slot by writing `owner` whole.
    let owner = unsafe { core::ptr::read_volatile(&raw const (*slot).owner) };
    (owner == cookie).then_some(slot)
}

/// Tells userspace it has work on this socket; if the ring buffer is full, raises the lost flag
/// instead, on which userspace looks at every socket.
fn wake(cookie: u64) {
    if WSP_EVENTS.output::<u64>(&cookie, 0).is_err()
        && let Some(flag) = WSP_LOST.get_ptr_mut(0)
    {
        // SAFETY: a pointer into the array's only element, valid while the program runs.
        unsafe { *flag = 1 };
    }
}

/// Cookie of the socket the bytes arrived on (0 if the skb has no socket: never a map key).
fn socket_cookie(ctx: &SkBuffContext) -> u64 {
    // SAFETY: the helper only reads the skb the kernel handed to this program.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Sets the skb's redirect target to the egress of the socket stored under `peer` (flags 0: not
/// BPF_F_INGRESS). The helper returns SK_PASS when the target is set and SK_DROP when the peer is
/// not in the map; that SK_DROP is only a result here, never the verdict.
fn redirect_to(ctx: &SkBuffContext, mut peer: u64) -> bool {
    WSP_SOCKETS.redirect_skb(ctx, &mut peer, 0) == i64::from(SK_PASS)
}

/// Adds `len` to one of this socket's counters.
///
/// A plain add is enough: only this socket's verdict writes its counters, and the kernel runs one
/// socket's verdicts one at a time (from the socket's data-ready callback, under the socket
/// lock). Userspace only reads them. (core has no atomic read-modify-write for the BPF target.)
fn count(counter: *mut u64, len: u64) {
    // SAFETY: `counter` points to an aligned u64 inside a live map value (see `wsp_verdict`).
    unsafe { *counter = (*counter).wrapping_add(len) };
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects a program with a reachable panic, so this is never called.
    loop {}
}

/// Kernel license of the object. No GPL-only helper is used; the string follows aya's template.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Host build (`cargo check --workspace`): nothing to run; the object is built for the BPF target.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
