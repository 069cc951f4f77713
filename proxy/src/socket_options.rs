//! TCP socket options of a connection's sockets: TCP keepalive, so that a peer that vanished is
//! noticed and its resources freed, and no Nagle delay on the small frames of interactive
//! WebSockets. Accepted sockets inherit both from their listening socket, so a listener carries
//! them when all its services agree ([`listener`]) and a connection sets its own only otherwise
//! ([`client`]); the upstream side sets them on each socket ([`keepalive`]; the upstream module
//! sets `nodelay` before it writes the request).
//!
//! Each is best effort: a socket without these options still works.

use std::os::fd::AsFd;

use nix::sys::socket::{setsockopt, sockopt};

use crate::config::Keepalive;
use crate::routes;

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

/// A listening socket's options, inherited by every socket it accepts from then on: no Nagle
/// delay, and the keepalive its services share (`None`: they differ, each connection sets its
/// own, and the listener has none to pass on).
pub fn listener(s: &impl AsFd, shared: Option<&Keepalive>) {
    let _ = setsockopt(&s.as_fd(), sockopt::TcpNoDelay, &true);
    match shared {
        Some(k) if k.enabled => keepalive(s, k),
        _ => {
            let _ = setsockopt(&s.as_fd(), sockopt::KeepAlive, &false);
        }
    }
}

/// An accepted client socket: its service's keepalive, unless it inherited exactly that from
/// `listener`. (A connection whose TCP handshake completed just before a reload changed the
/// settings may keep the previous ones: as an open connection keeps its configuration.)
pub fn client(s: &impl AsFd, listener: &routes::Listener, k: &Keepalive) {
    if listener.keepalive.as_ref() != Some(k) {
        keepalive(s, k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::getsockopt;
    use std::time::Duration;

    fn k(idle: u64) -> Keepalive {
        Keepalive {
            enabled: true,
            idle: Duration::from_secs(idle),
            interval: Duration::from_secs(7),
            count: 3,
        }
    }

    #[test]
    fn accepted_sockets_inherit_the_listeners_nodelay_and_keepalive() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener(&l, Some(&k(42)));
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        assert!(getsockopt(&a, sockopt::TcpNoDelay).unwrap());
        assert!(getsockopt(&a, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&a, sockopt::TcpKeepIdle).unwrap(), 42);
        assert_eq!(getsockopt(&a, sockopt::TcpKeepInterval).unwrap(), 7);
        assert_eq!(getsockopt(&a, sockopt::TcpKeepCount).unwrap(), 3);
        // Services that disagree: the listener passes no keepalive on.
        listener(&l, None);
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        assert!(getsockopt(&b, sockopt::TcpNoDelay).unwrap());
        assert!(!getsockopt(&b, sockopt::KeepAlive).unwrap());
    }
}
