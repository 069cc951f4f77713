//! wsproxy's kernel relay: one `sk_skb` stream_verdict program (no parser) attached to a socket
//! map. Bytes received on a proxy-side socket of a relayed pair are redirected to the egress of
//! the pair's other socket, so the payload never reaches userspace.
//!
//! Safety rule: TCP has already acknowledged every byte the verdict sees, so the verdict never
//! drops a byte (only the empty skb of a lone FIN). Anything unexpected (unknown socket, missing peer, failed redirect) becomes `SK_PASS`:
//! the bytes stay readable by userspace on the socket they arrived on, in order, and are counted.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use proxy_common::{FLAG_PASS, MAX_SOCKETS, SockCtrl, SockState};

/// Socket cookie -> socket. Name must equal `proxy_common::SOCKETS_MAP`.
#[map]
static WSP_SOCKETS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// `BPF_F_NO_PREALLOC` for both hash maps. In a preallocated hash map an element replaced or
/// deleted by userspace goes back to the free list at once and can be handed out for another key
/// while a verdict still reads it through the pointer it looked up: the verdict would then take
/// another socket's credit or count into another pair. Without preallocation an element is freed
/// only after an RCU grace period, which every verdict run is inside of.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Socket cookie -> state (peer cookie, counters). Name must equal `proxy_common::STATE_MAP`.
#[map]
static WSP_STATE: HashMap<u64, SockState> = HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// Socket cookie -> userspace's credit and forwarded count. Name must equal
/// `proxy_common::CTRL_MAP`.
#[map]
static WSP_CTRL: HashMap<u64, SockCtrl> = HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// The verdict. Name must equal `proxy_common::VERDICT_PROGRAM`.
#[stream_verdict]
pub fn wsp_verdict(ctx: SkBuffContext) -> u32 {
    let cookie = socket_cookie(&ctx);
    let Some(state) = WSP_STATE.get_ptr_mut(cookie) else {
        return SK_PASS; // not a relayed socket (or already removed): userspace reads it
    };
    let len = u64::from(ctx.len());
    if len == 0 {
        // The skb that carries a lone FIN. Redirected, its empty send fails the peer with EPIPE;
        // passed, it would queue an empty message. It carries no byte, so drop it: TCP has
        // already recorded the FIN, and userspace still reads EOF.
        return SK_DROP;
    }
    // SAFETY: a non-null pointer to a live map value; userspace writes the entry before inserting
    // the socket and deletes it only after removing the socket, so it outlives this call.
    let s = unsafe { *state };
    if may_redirect(&s, cookie, len) && redirect_to(&ctx, s.peer_cookie) {
        // SAFETY: as above; the field pointers stay inside the value.
        unsafe {
            count(&raw mut (*state).redirected, len);
            count(&raw mut (*state).redirected_skbs, 1);
        }
    } else {
        // SAFETY: as above.
        count(unsafe { &raw mut (*state).passed }, len);
    }
    // With a redirect target set, SK_PASS means "redirect"; without one, "pass to userspace".
    SK_PASS
}

/// Order and credit (see `proxy_common::SockCtrl`): redirect only when no passed byte is still
/// waiting for userspace, and within the credit userspace granted. No credit entry: pass.
fn may_redirect(s: &SockState, cookie: u64, len: u64) -> bool {
    // SAFETY: the value is copied out at once; userspace replaces entries whole.
    let Some(ctrl) = (unsafe { WSP_CTRL.get(&cookie) }) else {
        return false;
    };
    s.flags & FLAG_PASS == 0
        && s.passed == ctrl.forwarded
        && s.redirected + len <= ctrl.limit_bytes
        && s.redirected_skbs < ctrl.limit_skbs
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
