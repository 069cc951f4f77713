//! One read of a relayed socket, shared by the relays: into unzeroed room, and telling a read
//! that took everything queued (shorter than its room) from one that may have left more, or
//! everything the peer will ever send (the peer's FIN already seen).

use std::io;
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// What one [`read`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// The buffer's whole room: more may be queued.
    Full,
    /// Less than the room: everything the socket had queued.
    Drained,
    /// Less than the room, with the peer's FIN seen before the read: everything the peer sent.
    /// The next read would find the end; the caller can pass the FIN on with these bytes.
    Last,
    /// Nothing queued (the socket was not ready after all).
    Nothing,
    /// The peer's FIN.
    End,
}

/// One read into `buf`'s room, replacing what it held. The room is not zeroed first (the kernel
/// writes what it returns): a relayed message costs no 64 KiB memset. A TCP read gives all that
/// is queued, up to the room, so a shorter read leaves the socket empty: its readiness is then
/// cleared, as tokio's own reads do, sparing the read that would only find nothing. (A FIN that
/// arrived meanwhile stays visible: tokio keeps the closed state when it clears readiness.)
///
/// `fin_seen`: the source's readiness, taken before this read, showed the peer's FIN. TCP takes
/// a FIN in only after every byte before it, so a short read then took all that will ever come
/// ([`Read::Last`]), and the read that would only find the end is spared too.
pub fn read(from: &TcpStream, buf: &mut Vec<u8>, fin_seen: bool) -> io::Result<Read> {
    buf.clear();
    let mut got = 0;
    let r = from.try_io(Interest::READABLE, || {
        let room = buf.spare_capacity_mut();
        // SAFETY: `recv` writes at most `room.len()` bytes into memory `buf` owns.
        let n = unsafe { libc::recv(from.as_raw_fd(), room.as_mut_ptr().cast(), room.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        got = n as usize;
        if got > 0 && got < room.len() {
            // Cleared by `try_io` (with the readiness it saw before this read, so an arrival
            // after the read still wakes the relay).
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    // SAFETY: the kernel wrote the first `got` bytes.
    unsafe { buf.set_len(got) };
    match r {
        Ok(()) if got == 0 => Ok(Read::End),
        Ok(()) => Ok(Read::Full),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(match got {
            0 => Read::Nothing,
            _ if fin_seen => Read::Last,
            _ => Read::Drained,
        }),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// Waits (bounded) until `s` is readable, as the relay does.
    async fn readable(s: &TcpStream) {
        tokio::time::timeout(Duration::from_secs(10), s.readable())
            .await
            .expect("readable within 10 s")
            .unwrap();
    }

    #[tokio::test]
    async fn a_short_read_takes_all_that_is_queued_and_an_arrival_after_it_still_wakes() {
        let (mut a, b) = super::super::loopback_pair().await;
        let mut buf = Vec::with_capacity(64 * 1024);
        a.write_all(&[1; 100]).await.unwrap();
        readable(&b).await;
        assert_eq!(read(&b, &mut buf, false).unwrap(), Read::Drained);
        assert_eq!(buf, [1; 100]);
        // Readiness was cleared without a read: the next one is not attempted.
        assert_eq!(read(&b, &mut buf, false).unwrap(), Read::Nothing);
        assert!(buf.is_empty());
        a.write_all(&[2; 50]).await.unwrap();
        readable(&b).await;
        assert_eq!(read(&b, &mut buf, false).unwrap(), Read::Drained);
        assert_eq!(buf, [2; 50]);
        // Bytes and the FIN together: the bytes, then the end.
        a.write_all(&[3; 10]).await.unwrap();
        a.shutdown().await.unwrap();
        drop(a);
        let mut got = Vec::new();
        let end = loop {
            readable(&b).await;
            match read(&b, &mut buf, false).unwrap() {
                Read::Nothing => continue,
                Read::End => break true,
                Read::Full | Read::Drained | Read::Last => got.extend_from_slice(&buf),
            }
        };
        assert!(end && got == [3; 10], "{got:?}");
    }

    /// Bytes and the FIN in one segment, so that the FIN is in the first readiness `b` sees.
    fn send_with_fin(a: &TcpStream, bytes: &[u8]) {
        // SAFETY: a valid socket; `send` reads at most `bytes.len()` bytes of `bytes`.
        let n = unsafe { libc::send(a.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_MORE) };
        assert_eq!(n, bytes.len() as isize);
        nix::sys::socket::shutdown(a.as_raw_fd(), nix::sys::socket::Shutdown::Write).unwrap();
    }

    #[tokio::test]
    async fn a_short_read_after_the_fin_was_seen_is_the_last_a_full_one_is_not() {
        let (a, b) = super::super::loopback_pair().await;
        send_with_fin(&a, &[4; 10]);
        // Until b's readiness shows the FIN (polled, bounded: the first wake-up may come before
        // the kernel took the FIN in).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ready = tokio::time::timeout_at(deadline, b.ready(Interest::READABLE))
                .await
                .expect("the FIN seen within 10 s")
                .unwrap();
            if ready.is_read_closed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // A room smaller than what is queued: more may follow, FIN or not.
        let mut small = Vec::with_capacity(4);
        assert_eq!(read(&b, &mut small, true).unwrap(), Read::Full);
        assert_eq!(small, [4; 4]);
        let mut buf = Vec::with_capacity(64 * 1024);
        assert_eq!(read(&b, &mut buf, true).unwrap(), Read::Last);
        assert_eq!(buf, [4; 6]);
        // What the caller then skips: the read that finds the end.
        readable(&b).await;
        assert_eq!(read(&b, &mut buf, true).unwrap(), Read::End);
    }

    #[tokio::test]
    async fn a_read_that_fills_the_room_says_more_may_be_queued() {
        let (mut a, b) = super::super::loopback_pair().await;
        // A small room, so that what is queued surely exceeds it.
        let data: Vec<u8> = (0..5000).map(|i| (i % 253) as u8).collect();
        a.write_all(&data).await.unwrap();
        let mut got = Vec::new();
        let mut buf = Vec::with_capacity(1000);
        let mut full = 0;
        while got.len() < data.len() {
            readable(&b).await;
            match read(&b, &mut buf, false).unwrap() {
                Read::Full => full += 1,
                Read::Drained | Read::Last | Read::Nothing => {}
                Read::End => panic!("an end before the data"),
            }
            got.extend_from_slice(&buf);
        }
        assert!(got == data && full >= 1, "{full} full reads");
    }
}
