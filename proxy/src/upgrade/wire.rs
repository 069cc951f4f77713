//! The hand-over protocol's messages and their transport: a `SOCK_SEQPACKET` Unix socket (one
//! message per packet, boundaries kept), each a JSON document with the descriptors it carries
//! attached (`SCM_RIGHTS`). Versioned: a peer of another version is refused with a reason.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, accept4, bind,
    connect, listen, recvmsg, sendmsg, socket,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use crate::relay::kernel::Handed;

/// The protocol's version: a successor of another version is refused, and the running process
/// keeps everything.
pub const VERSION: u32 = 1;

/// Largest message: a packet of limiter entries is cut below it.
pub const MAX_MESSAGE: usize = 256 * 1024;
/// Most descriptors one message carries (a listener set, the kernel maps, a pair).
const MAX_FDS: usize = 64;

/// Everything said on the socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// `wsproxy upgrade` to the running process: start an upgrade.
    Trigger,
    /// The running process to `wsproxy upgrade`: how it went.
    Outcome { ok: bool, message: String },
    /// A successor introduces itself.
    Hello { version: u32, kernel_object: u64, pid: u32 },
    /// The running process will not hand over to it, and says why.
    Refused { reason: String },
    /// Listening sockets (descriptors in `listen` order), and the admin listener's last when
    /// `admin` says so.
    Listeners { listen: Vec<SocketAddr>, admin: bool },
    /// The kernel relay's maps (descriptors in the order the kernel relay exports them).
    Kernel,
    /// One service's per-client limit state.
    Limits { service: String, clients: Vec<ClientState> },
    /// One service's upstreams that are down, and for how much longer.
    Health {
        service: String,
        down: Vec<(SocketAddr, u64)>,
    },
    /// The successor accepts on the listeners: the running process stops accepting and moves
    /// its connections.
    Ready,
    /// A relayed connection (descriptors: client, upstream).
    Pair(PairState),
    /// Nothing more comes: every connection that could move has moved, and the kernel relay's
    /// ring buffer is the successor's from now on.
    Done,
}

/// A client's token bucket, as the limiter keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientState {
    /// The client key (an IPv4 address, or an IPv6 prefix).
    pub key: std::net::IpAddr,
    pub tokens: f64,
    /// Milliseconds since the bucket was last refilled.
    pub age_ms: u64,
}

/// A relayed connection on its way to the successor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairState {
    pub service: String,
    /// The client's address (its limits follow it).
    pub client: SocketAddr,
    pub upstream: SocketAddr,
    pub request_id: String,
    /// Milliseconds since the connection was accepted.
    pub age_ms: u64,
    /// Milliseconds left of its maximum lifetime, when it has one.
    pub lifetime_left_ms: Option<u64>,
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    /// Where the kernel relay stands, when it carries the pair.
    pub kernel: Option<Handed>,
}

/// One end of a hand-over connection.
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
}

/// A listening hand-over socket.
pub struct Listener {
    fd: AsyncFd<OwnedFd>,
}

/// `fd` on the reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the descriptor, which stays open while registered.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

fn seqpacket() -> io::Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

impl Listener {
    /// Listens at `path` (mode 0600; a stale socket file is replaced).
    pub fn bind(path: &Path) -> io::Result<Listener> {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let fd = seqpacket()?;
        // The file is created with the process's umask; narrowed before anyone can connect.
        bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listen(&fd, Backlog::new(8).map_err(io::Error::from)?)?;
        Ok(Listener { fd: register(fd)? })
    }

    pub async fn accept(&self) -> io::Result<Channel> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                accept4(fd.as_raw_fd(), SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC).map_err(io::Error::from)
            }) {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                Ok(Ok(raw)) => return Channel::new(unsafe { OwnedFd::from_raw_fd(raw) }),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

impl Channel {
    fn new(fd: OwnedFd) -> io::Result<Channel> {
        Ok(Channel { fd: register(fd)? })
    }

    /// Connects to the running process's hand-over socket at `path`.
    pub async fn connect(path: &Path) -> io::Result<Channel> {
        let fd = seqpacket()?;
        match connect(fd.as_raw_fd(), &UnixAddr::new(path)?) {
            Ok(()) => {}
            Err(nix::errno::Errno::EINPROGRESS | nix::errno::Errno::EAGAIN) => {}
            Err(e) => return Err(e.into()),
        }
        let channel = Channel::new(fd)?;
        channel.fd.writable().await?.retain_ready();
        Ok(channel)
    }

    /// Sends `message` with `fds` attached.
    pub async fn send(&self, message: &Message, fds: &[impl AsFd]) -> io::Result<()> {
        let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(io::Error::other(format!("message of {} bytes", bytes.len())));
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_fd().as_raw_fd()).collect();
        loop {
            let mut guard = self.fd.writable().await?;
            let sent = guard.try_io(|fd| {
                let iov = [io::IoSlice::new(&bytes)];
                let cmsg = [ControlMessage::ScmRights(&raw)];
                let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
                sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).map_err(io::Error::from)
            });
            match sent {
                Ok(r) => return r.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }

    /// The next message and its descriptors; `None` when the peer closed.
    pub async fn recv(&self) -> io::Result<Option<(Message, Vec<OwnedFd>)>> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let mut guard = self.fd.readable().await?;
            let got = guard.try_io(|fd| {
                let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
                let mut iov = [io::IoSliceMut::new(&mut buf)];
                let msg = recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
                    .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(received) = c {
                        // SAFETY: descriptors the kernel just installed for this process.
                        fds.extend(received.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                    }
                }
                if msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
                    return Err(io::Error::other("a hand-over message was cut short"));
                }
                Ok((msg.bytes, fds))
            });
            let (n, fds) = match got {
                Ok(r) => r?,
                Err(_would_block) => continue,
            };
            if n == 0 {
                return Ok(None);
            }
            let message = serde_json::from_slice(&buf[..n]).map_err(io::Error::other)?;
            return Ok(Some((message, fds)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_and_descriptors_cross_in_order() {
        let path = std::env::temp_dir().join(format!("wsproxy-wire-{}.sock", std::process::id()));
        let listener = Listener::bind(&path).unwrap();
        let client = tokio::spawn({
            let path = path.clone();
            async move {
                let c = Channel::connect(&path).await.unwrap();
                let file = std::fs::File::open("/dev/null").unwrap();
                c.send(&Message::Ready, &[file.as_fd()]).await.unwrap();
                c.send(&Message::Done, &[] as &[OwnedFd]).await.unwrap();
            }
        });
        let server = listener.accept().await.unwrap();
        let (m, fds) = server.recv().await.unwrap().unwrap();
        assert!(matches!(m, Message::Ready));
        assert_eq!(fds.len(), 1);
        let (m, fds) = server.recv().await.unwrap().unwrap();
        assert!(matches!(m, Message::Done) && fds.is_empty());
        client.await.unwrap();
        assert!(server.recv().await.unwrap().is_none(), "closed");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let _ = std::fs::remove_file(&path);
    }
}
