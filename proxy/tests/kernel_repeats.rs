//! The kernel's repeated bytes under the verdict (issue 10, point 1), made on purpose.
//!
//! TCP queues a segment whole when it starts before `rcv_nxt` but also carries new bytes
//! (`tcp_data_queue`, "Partial packet"), and `tcp_read_skb` hands it to the verdict whole. A
//! normal reader skips the old head by sequence number; a verdict that did not would relay it a
//! second time, and the kernel would then count the old head into `copied_seq` too, leaving it
//! ahead of `rcv_nxt` so that later bytes wait (see `docs/kernel-relay.md`).
//!
//! Such segments come from retransmissions, rarely and by chance. Here one is made on purpose:
//! the client's connection is rebuilt with `TCP_REPAIR` (as checkpoint/restore tools do) with its
//! send sequence number set back by `OLD` bytes, so that its next write goes out as one segment
//! that starts `OLD` bytes before what the proxy socket has received. The old bytes are written
//! as `X`s: a relay that passes any of them on is caught at once.
//!
//! Runs in a network namespace of its own, with TCP timestamps off there, so the rebuilt
//! connection needs no timestamp state. Needs root (CAP_BPF, CAP_NET_ADMIN); without it, it
//! fails when CI=true and is skipped with a message otherwise.

use std::{
    io::Write as _,
    mem::size_of,
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, RawFd},
    time::Duration,
};

use wsproxy::relay::tcp_probe::tcp_info;

mod common;

use common::kernel::{DEADLINE, UNLIMITED, assert_nothing_to_read, expect_bytes, load_or_skip, loopback_pair};
use wsproxy_tests::relay_kit::poll_every_blocking;

/// Bytes the rebuilt connection sends again.
const OLD: usize = 300;

// include/uapi/linux/tcp.h
const TCP_NO_QUEUE: i32 = 0;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;

#[repr(C)]
#[derive(Default)]
struct TcpRepairWindow {
    snd_wl1: u32,
    snd_wnd: u32,
    max_window: u32,
    rcv_wnd: u32,
    rcv_wup: u32,
}

#[repr(C)]
struct TcpRepairOpt {
    opt_code: u32,
    opt_val: u32,
}

fn check(what: &str, rc: libc::c_int) {
    assert!(rc == 0, "{what}: {}", std::io::Error::last_os_error());
}

fn set<T>(fd: RawFd, level: i32, name: i32, value: &T, what: &str) {
    // SAFETY: `value` is a live `T` of the size given.
    let rc = unsafe { libc::setsockopt(fd, level, name, (value as *const T).cast(), size_of::<T>() as u32) };
    check(what, rc);
}

fn set_slice<T>(fd: RawFd, level: i32, name: i32, value: &[T], what: &str) {
    // SAFETY: the slice is live and its byte length is given.
    let rc = unsafe { libc::setsockopt(fd, level, name, value.as_ptr().cast(), size_of_val(value) as u32) };
    check(what, rc);
}

fn get<T: Default>(fd: RawFd, level: i32, name: i32, what: &str) -> T {
    let mut value = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a live `T` and `len` its size.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &mut len) };
    check(what, rc);
    value
}

/// Moves this thread into a new network namespace with loopback up and TCP timestamps off.
fn private_netns() {
    // SAFETY: affects only the calling thread, which creates every socket of the test.
    check("unshare(CLONE_NEWNET)", unsafe { libc::unshare(libc::CLONE_NEWNET) });
    // Loopback up: SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP.
    // SAFETY: a plain socket call; closed below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(s >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: an all-zero ifreq is valid; the name "lo" fits.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    ifr.ifr_name[..2].copy_from_slice(&[b'l' as libc::c_char, b'o' as libc::c_char]);
    // SAFETY: `ifr` is a live ifreq, as both requests expect.
    check("SIOCGIFFLAGS lo", unsafe {
        libc::ioctl(s, libc::SIOCGIFFLAGS, &raw mut ifr)
    });
    // SAFETY: the flags member of the union, just filled in by the kernel.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: `ifr` is a live ifreq, as the request expects.
    check("SIOCSIFFLAGS lo", unsafe {
        libc::ioctl(s, libc::SIOCSIFFLAGS, &raw mut ifr)
    });
    // SAFETY: `s` is ours.
    unsafe { libc::close(s) };
    // /proc/sys/net is the opening thread's namespace.
    std::fs::write("/proc/sys/net/ipv4/tcp_timestamps", "0").expect("tcp_timestamps = 0");
}

/// Waits until every byte `s` sent has been acknowledged.
fn wait_acked(s: &TcpStream) {
    // No event reports an acknowledgement: polled, within the deadline.
    let acked = poll_every_blocking(DEADLINE, Duration::from_millis(1), || {
        (tcp_info(s).expect("TCP_INFO").tcpi_unacked == 0).then_some(())
    });
    assert!(acked.is_some(), "the client's bytes were not acknowledged");
}

/// Rebuilds `old`'s connection (same addresses, same receive state) with its send sequence
/// number `back` bytes behind: its next write starts with bytes the peer already has.
fn rewound(old: TcpStream, back: u32) -> TcpStream {
    let fd = old.as_raw_fd();
    let (local, peer): (SocketAddr, SocketAddr) = (old.local_addr().unwrap(), old.peer_addr().unwrap());
    let info = tcp_info(&old).expect("TCP_INFO");
    set(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, &1i32, "TCP_REPAIR on");
    set(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR_QUEUE,
        &TCP_SEND_QUEUE,
        "send queue",
    );
    let snd: u32 = get(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, "send sequence");
    set(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR_QUEUE,
        &TCP_RECV_QUEUE,
        "receive queue",
    );
    let rcv: u32 = get(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, "receive sequence");
    let window: TcpRepairWindow = get(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, "window");
    // Closed in repair mode: no FIN, no reset; the peer never learns.
    drop(old);

    // SAFETY: a plain socket call; the fd is owned by the TcpStream below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    set(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, &1i32, "TCP_REPAIR on (new)");
    set(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &1i32, "SO_REUSEADDR");
    set(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR_QUEUE,
        &TCP_SEND_QUEUE,
        "send queue (new)",
    );
    set(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_QUEUE_SEQ,
        &snd.wrapping_sub(back),
        "send sequence (new)",
    );
    set(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR_QUEUE,
        &TCP_RECV_QUEUE,
        "receive queue (new)",
    );
    set(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_QUEUE_SEQ,
        &rcv,
        "receive sequence (new)",
    );
    let sin = |a: SocketAddr| {
        let SocketAddr::V4(a) = a else {
            unreachable!("IPv4 loopback")
        };
        libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        }
    };
    let (l, p) = (sin(local), sin(peer));
    let len = size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: valid sockaddr_in values and their size.
    check("bind (new)", unsafe { libc::bind(fd, (&raw const l).cast(), len) });
    // In repair mode connect sends nothing: the socket is established at once.
    // SAFETY: valid sockaddr_in values and their size.
    check("connect (new)", unsafe {
        libc::connect(fd, (&raw const p).cast(), len)
    });
    let opts = [
        TcpRepairOpt {
            opt_code: TCPOPT_MAXSEG,
            opt_val: 1400,
        },
        TcpRepairOpt {
            opt_code: TCPOPT_WINDOW,
            // `tcpi_snd_wscale:4, tcpi_rcv_wscale:4`, low bits first.
            opt_val: u32::from(info.tcpi_snd_rcv_wscale & 0xf) | (u32::from(info.tcpi_snd_rcv_wscale >> 4) << 16),
        },
    ];
    set_slice(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_OPTIONS, &opts, "options (new)");
    set(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, &window, "window (new)");
    set(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR_QUEUE,
        &TCP_NO_QUEUE,
        "no queue (new)",
    );
    set(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, &0i32, "TCP_REPAIR off (new)");
    stream.set_nodelay(true).expect("nodelay");
    stream.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    stream
}

#[test]
fn a_segment_that_starts_with_relayed_bytes_is_cut_to_its_new_bytes() {
    // Its own thread: the namespace change stays with it.
    std::thread::spawn(|| scenario(Path::Redirected))
        .join()
        .expect("the test body panicked");
}

#[test]
fn a_segment_that_starts_with_passed_bytes_is_cut_to_its_new_bytes() {
    std::thread::spawn(|| scenario(Path::Passed))
        .join()
        .expect("the test body panicked");
}

/// Where the verdict sends the client's bytes.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    /// To the upstream side's egress (unlimited credit).
    Redirected,
    /// To userspace on the client-side socket (no credit).
    Passed,
}

fn scenario(path: Path) {
    let Some(programs) = load_or_skip() else { return };
    private_netns();
    let (client, mut proxy_client_side) = loopback_pair();
    let (mut upstream, proxy_upstream_side) = loopback_pair();
    let credit = match path {
        Path::Redirected => UNLIMITED,
        Path::Passed => wsproxy::ebpf::Window { bytes: 0, skbs: 0 },
    };
    let pair = programs
        .insert_pair(&proxy_client_side, &proxy_upstream_side, credit)
        .expect("insert pair");
    // What the verdict let through: at the upstream, or to userspace on the proxy socket.
    let out = match path {
        Path::Redirected => &mut upstream,
        Path::Passed => &mut proxy_client_side,
    };

    let first: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut client = client;
    client.write_all(&first).expect("client write");
    expect_bytes(out, &first, "the first bytes come through");
    wait_acked(&client);

    let mut client = rewound(client, OLD as u32);
    let mut segment = vec![b'X'; OLD];
    segment.extend_from_slice(b"fresh bytes after the repeat");
    client.write_all(&segment).expect("write the overlapping segment");
    expect_bytes(out, b"fresh bytes after the repeat", "only the new bytes come through");

    // Bytes fewer than the repeat: they would wait for more if the kernel had counted the
    // repeat as read.
    client.write_all(b"tail").expect("client write");
    expect_bytes(out, b"tail", "later bytes follow at once");
    assert_nothing_to_read(out, "after the tail");

    // A segment with nothing new in it: TCP drops it itself ("A retransmit"), the verdict never
    // sees it.
    wait_acked(&client);
    let mut client = rewound(client, OLD as u32);
    client.write_all(&[b'X'; OLD]).expect("write the repeated segment");
    client.write_all(b"end").expect("client write");
    expect_bytes(out, b"end", "the bytes after an all-old segment follow at once");
    assert_nothing_to_read(out, "after the end");

    let state = pair.side(wsproxy::ebpf::Side::Client);
    assert_eq!(
        state.repeated, OLD as u64,
        "the verdict cut the one partial repeat: {state:?}"
    );
    assert_eq!(state.broken, 0, "{state:?}");
    let counters = pair.remove().expect("remove");
    let relayed = (first.len() + 28 + 4 + 3) as u64;
    let seen = match path {
        Path::Redirected => counters.from_client.redirected,
        Path::Passed => counters.from_client.passed,
    };
    assert_eq!(seen, relayed, "{counters:?}");
    assert_eq!(programs.map_entry_counts(), (0, 0, 0));
}
