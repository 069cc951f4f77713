//! What the relays read of a proxy-side TCP socket's state, in one place: `TCP_INFO`, the send
//! queue (`SIOCOUTQ`), the pending error, and the states after a FIN or a reset.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// `TCP_CLOSE` of the kernel's TCP state machine (include/net/tcp_states.h), as in `tcpi_state`.
const TCP_CLOSE: u8 = 7;
const TIME_WAIT: u8 = 6;
const CLOSE_WAIT: u8 = 8;
const LAST_ACK: u8 = 9;
const CLOSING: u8 = 11;

/// The socket's `TCP_INFO`.
pub fn tcp_info(s: &impl AsFd) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid fd and an out-buffer of the length passed.
    let rc = unsafe {
        libc::getsockopt(
            s.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// Bytes in the socket's send queue not yet acknowledged (`SIOCOUTQ`).
pub fn unacked(s: &impl AsFd) -> io::Result<u64> {
    let mut outq: libc::c_int = 0;
    // SAFETY: a valid socket fd and an out-pointer to a c_int, as SIOCOUTQ expects.
    if unsafe { libc::ioctl(s.as_fd().as_raw_fd(), libc::TIOCOUTQ, &raw mut outq) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(outq.max(0) as u64)
}

/// Bytes the peer has acknowledged since the connection started (`tcpi_bytes_acked`), and
/// bytes in the send queue not yet acknowledged.
pub fn acked_and_unacked(s: &impl AsFd) -> io::Result<(u64, u64)> {
    Ok((tcp_info(s)?.tcpi_bytes_acked, unacked(s)?))
}

/// Bytes this socket's TCP has taken for sending since it was created: acknowledged bytes plus
/// bytes still in its send queue.
pub fn taken(s: &impl AsFd) -> io::Result<u64> {
    let (acked, queued) = acked_and_unacked(s)?;
    Ok(acked + queued)
}

/// The socket's pending error (SO_ERROR), such as ECONNRESET after a reset. Reading it clears
/// it.
pub fn pending_error(s: &impl AsFd) -> Option<io::Error> {
    match nix::sys::socket::getsockopt(&s.as_fd(), nix::sys::socket::sockopt::SocketError) {
        Ok(0) => None,
        Ok(errno) => Some(io::Error::from_raw_os_error(errno)),
        Err(e) => Some(e.into()),
    }
}

/// True once the peer's FIN has arrived (TCP states after it), or the state cannot be read.
pub fn fin_received(s: &impl AsFd) -> bool {
    tcp_info(s).map_or(true, |i| {
        matches!(i.tcpi_state, TIME_WAIT | TCP_CLOSE | CLOSE_WAIT | LAST_ACK | CLOSING)
    })
}

/// True once the connection is gone (reset, or fully closed), or the state cannot be read.
pub fn is_closed(s: &impl AsFd) -> bool {
    tcp_info(s).map_or(true, |i| i.tcpi_state == TCP_CLOSE)
}
