//! TCP socket options of a connection's sockets: TCP keepalive, so that a peer that vanished is
//! noticed and its resources freed, and no Nagle delay on the small frames of interactive
//! WebSockets.
//!
//! Accepted sockets inherit both from their listening socket (the kernel copies them when it
//! creates the connection's socket), so a listener carries them when all its services agree
//! ([`listener`]) and a connection sets only what it did not inherit ([`client`]): nothing, in
//! the usual case. What a connection inherited is what its accept loop knows ([`Inherited`]);
//! the upstream side sets them on each socket ([`connecting`] before its connect, [`keepalive`]
//! once it answered 101).
//!
//! Each is best effort: a socket without these options still works.

use std::os::fd::AsFd;

use nix::sys::socket::{setsockopt, sockopt};

use crate::config::Keepalive;

/// What an accepted socket got from its listening socket.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Inherited {
    /// Not known: it may have been queued before the listener's options were set or changed.
    #[default]
    Unknown,
    /// TCP_NODELAY, and this keepalive (`None`: keepalive off).
    Options(Option<Keepalive>),
}

/// An upstream socket, before its connect: TCP_NODELAY, and the handshake's last ACK held back
/// for the first write. The proxy always writes first, right after the connect (the request, or
/// a TLS ClientHello), so that ACK rides on those bytes: one segment less per connection, and the
/// upstream accepts a connection that already holds its request. (With TCP_QUICKACK off before
/// the connect the kernel delays that one ACK, by at most 200 ms, and acknowledges at once again
/// from the SYN-ACK on.)
pub fn connecting(s: &impl AsFd) {
    let fd = s.as_fd();
    let _ = setsockopt(&fd, sockopt::TcpNoDelay, &true);
    let off: libc::c_int = 0;
    // SAFETY: a valid socket; the kernel reads one c_int from `off`.
    let _ = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&off as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// `k` on `s`, if enabled (a new socket has keepalive off).
pub fn keepalive(s: &impl AsFd, k: &Keepalive) {
    if !k.enabled {
        return;
    }
    let fd = s.as_fd();
    let _ = setsockopt(&fd, sockopt::KeepAlive, &true);
    let _ = setsockopt(&fd, sockopt::TcpKeepIdle, &(k.idle.as_secs() as u32));
    let _ = setsockopt(&fd, sockopt::TcpKeepInterval, &(k.interval.as_secs() as u32));
    let _ = setsockopt(&fd, sockopt::TcpKeepCount, &k.count);
}

/// Exactly `k` on `s`: on with its settings, or off (`None`).
fn exactly(s: &impl AsFd, k: Option<&Keepalive>) {
    match k {
        Some(k) => keepalive(s, k),
        None => {
            let _ = setsockopt(&s.as_fd(), sockopt::KeepAlive, &false);
        }
    }
}

/// An enabled keepalive, or none.
fn on(k: Option<&Keepalive>) -> Option<&Keepalive> {
    k.filter(|k| k.enabled)
}

/// The options of a listening socket whose services share `shared` (`None`: they differ, and
/// the listener passes no keepalive on); returns what its sockets accepted from now on inherit.
pub fn listener(s: &impl AsFd, shared: Option<&Keepalive>) -> Inherited {
    let _ = setsockopt(&s.as_fd(), sockopt::TcpNoDelay, &true);
    exactly(s, on(shared));
    Inherited::Options(on(shared).cloned())
}

/// An accepted client socket that `inherited` what its listener passed on: whatever of
/// TCP_NODELAY and its service's keepalive `k` that does not give it.
pub fn client(s: &impl AsFd, inherited: &Inherited, k: &Keepalive) {
    let wanted = on(Some(k));
    match inherited {
        Inherited::Options(got) if got.as_ref() == wanted => {}
        Inherited::Options(_) => exactly(s, wanted),
        Inherited::Unknown => {
            let _ = setsockopt(&s.as_fd(), sockopt::TcpNoDelay, &true);
            exactly(s, wanted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::getsockopt;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    fn k(idle: u64) -> Keepalive {
        Keepalive {
            enabled: true,
            idle: Duration::from_secs(idle),
            interval: Duration::from_secs(7),
            count: 3,
        }
    }

    fn off() -> Keepalive {
        Keepalive { enabled: false, ..k(1) }
    }

    /// (keepalive on, idle, nodelay) of a socket.
    fn opts(s: &TcpStream) -> (bool, u32, bool) {
        (
            getsockopt(s, sockopt::KeepAlive).unwrap(),
            getsockopt(s, sockopt::TcpKeepIdle).unwrap(),
            getsockopt(s, sockopt::TcpNoDelay).unwrap(),
        )
    }

    fn accept(l: &TcpListener) -> TcpStream {
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        l.accept().unwrap().0
    }

    #[tokio::test]
    async fn an_upstream_connection_sends_the_handshakes_last_ack_with_its_first_bytes() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = crate::upstream::connect(l.local_addr().unwrap()).await.unwrap();
        let segs_out = |s: &tokio::net::TcpStream| crate::relay::tcp_probe::tcp_info(s).unwrap().tcpi_segs_out;
        assert!(getsockopt(&c, sockopt::TcpNoDelay).unwrap());
        // Connected (the SYN-ACK came), yet only the SYN went out.
        assert_eq!(segs_out(&c), 1);
        c.try_write(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        // The bytes carried the ACK: one segment for both.
        assert_eq!(segs_out(&c), 2);
        let (mut a, _) = l.accept().unwrap();
        let mut got = [0u8; 18];
        std::io::Read::read_exact(&mut a, &mut got).unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn accepted_sockets_inherit_the_listeners_nodelay_and_keepalive() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(listener(&l, Some(&k(42))), Inherited::Options(Some(k(42))));
        let a = accept(&l);
        assert_eq!(opts(&a), (true, 42, true));
        assert_eq!(getsockopt(&a, sockopt::TcpKeepInterval).unwrap(), 7);
        assert_eq!(getsockopt(&a, sockopt::TcpKeepCount).unwrap(), 3);
        // Services that disagree, or agree on none: the listener passes no keepalive on.
        assert_eq!(listener(&l, None), Inherited::Options(None));
        assert_eq!(opts(&accept(&l)), (false, 42, true));
        assert_eq!(listener(&l, Some(&off())), Inherited::Options(None));
    }

    #[test]
    fn a_client_sets_what_it_did_not_inherit() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        // Queued before the listener had options: it sets everything itself.
        let early = accept(&l);
        client(&early, &Inherited::Unknown, &k(30));
        assert_eq!(opts(&early), (true, 30, true));
        // Inherited another service's keepalive: its own, or none.
        let got = listener(&l, Some(&k(42)));
        let (a, b, c) = (accept(&l), accept(&l), accept(&l));
        client(&a, &got, &k(42));
        client(&b, &got, &k(30));
        client(&c, &got, &off());
        assert_eq!(
            [opts(&a), opts(&b), opts(&c)],
            [(true, 42, true), (true, 30, true), (false, 42, true)]
        );
        // Inherited none; its service wants one.
        let got = listener(&l, None);
        let d = accept(&l);
        client(&d, &got, &k(30));
        assert_eq!(opts(&d), (true, 30, true));
    }
}
