//! What the binary-driving tests share.

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, ExitStatus};
use std::time::Duration;

/// Waits for `child` to exit, at most `limit`, on a pidfd (readable once the process has
/// exited): a readiness signal instead of polling its status. `None` when it is still running.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    if let Some(status) = child.try_wait().unwrap() {
        return Some(status);
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor just returned by the kernel, owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut pfd = libc::pollfd {
        fd: fd as i32,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&raw mut pfd, 1, limit.as_millis().min(i32::MAX as u128) as i32) };
    drop(pidfd);
    if ready > 0 { child.try_wait().unwrap() } else { None }
}
