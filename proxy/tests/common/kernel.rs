//! What the tests that drive the eBPF programs directly share: loading them (or saying why not),
//! loopback socket pairs, and reading what came through.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use wsproxy::ebpf::{KernelPrograms, Window};

/// Credit that never runs out: for tests about redirection, not the bound.
pub const UNLIMITED: Window = Window {
    bytes: u64::MAX,
    skbs: u64::MAX,
};

/// Longest wait for any expected byte; loopback delivers in microseconds.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// Loads the programs, or says why the test cannot run here (a failure when CI=true).
pub fn load_or_skip() -> Option<KernelPrograms> {
    match KernelPrograms::load() {
        Ok(programs) => Some(programs),
        Err(err) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("kernel relay unavailable in CI: {err:#}")
        }
        Err(err) => {
            // Straight to the stderr handle: libtest swallows `eprintln!` of passing tests.
            let _ = writeln!(std::io::stderr(), "SKIPPED: kernel relay unavailable: {err:#}");
            None
        }
    }
}

/// A connected loopback pair: (the side that connected, the side that accepted), with
/// [`DEADLINE`] as read timeout and Nagle off.
pub fn loopback_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let connected = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (accepted, _) = listener.accept().expect("accept");
    for stream in [&connected, &accepted] {
        stream.set_read_timeout(Some(DEADLINE)).expect("read timeout");
        stream.set_nodelay(true).expect("nodelay");
    }
    (connected, accepted)
}

/// Reads exactly `expected.len()` bytes (or fails after [`DEADLINE`]) and compares them.
pub fn expect_bytes(stream: &mut TcpStream, expected: &[u8], what: &str) {
    let mut got = vec![0; expected.len()];
    stream
        .read_exact(&mut got)
        .unwrap_or_else(|e| panic!("{what}: {e} (received {:?} so far)", String::from_utf8_lossy(&got)));
    assert!(
        got == expected,
        "{what}: got {:?}, expected {:?}",
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(expected)
    );
}

/// Nothing is queued for reading on `stream` right now.
pub fn assert_nothing_to_read(stream: &mut TcpStream, what: &str) {
    stream.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0; 64];
    match stream.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("{what}: expected nothing to read, got {other:?}"),
    }
    stream.set_nonblocking(false).expect("blocking");
}
