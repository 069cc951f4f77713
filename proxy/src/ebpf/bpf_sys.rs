//! The few `bpf(2)` map commands the relay issues per pair, made directly: aya's typed maps take
//! `&mut self` for an update (a lock around every insertion) and have no batch commands, which
//! put both of a pair's index entries in with one system call.

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `BPF_NOEXIST`: an insertion fails if the key is present.
pub const BPF_NOEXIST: u64 = 1;

/// `union bpf_attr` as the `BPF_MAP_*_ELEM` commands read it.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` as the `BPF_MAP_*_BATCH` commands read it.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<()> {
    // SAFETY: `attr` is the command's `#[repr(C)]` attribute layout, of the size passed; the
    // pointers inside it point to live keys and values of the map's sizes (see the callers).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, (attr as *mut A).cast::<u8>(), size_of::<A>() as u32) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets `key` to `value` in the map (`flags`: `BPF_NOEXIST` or 0). `K` and `V` must be the
/// map's key and value types (for a socket map, the value is the socket's fd as a `u32`).
pub fn update<K, V>(map: BorrowedFd<'_>, key: &K, value: &V, flags: u64) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_ref(value) as u64,
        flags,
        ..ElemAttr::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
}

/// Deletes `key` from the map; a key that is not there is no error.
pub fn delete<K>(map: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        ..ElemAttr::default()
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Sets both keys in one system call (each with `elem_flags`). Both or neither: if the second
/// fails, the first is deleted again.
pub fn update_two<K, V>(map: BorrowedFd<'_>, keys: &[K; 2], values: &[V; 2], elem_flags: u64) -> io::Result<()> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: 2,
        map_fd: map.as_raw_fd() as u32,
        elem_flags,
        ..BatchAttr::default()
    };
    let result = bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
    // On failure `count` says how many were set before the one that failed.
    if result.is_err() && attr.count == 1 {
        delete(map, &keys[0])?;
    }
    result
}

/// Deletes both keys in one system call; keys that are not there are no error.
pub fn delete_two<K>(map: BorrowedFd<'_>, keys: &[K; 2]) -> io::Result<()> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: 2,
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    match bpf(BPF_MAP_DELETE_BATCH, &mut attr) {
        Ok(()) => Ok(()),
        // The batch stops at the first key that is missing: delete the rest one by one.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => keys[attr.count.min(2) as usize..]
            .iter()
            .try_for_each(|k| delete(map, k)),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_layouts_match_the_kernel() {
        // include/uapi/linux/bpf.h: the ELEM commands read 32 bytes, the BATCH ones 56.
        assert_eq!(size_of::<ElemAttr>(), 32);
        assert_eq!(std::mem::offset_of!(ElemAttr, key), 8);
        assert_eq!(size_of::<BatchAttr>(), 56);
        assert_eq!(std::mem::offset_of!(BatchAttr, count), 32);
        assert_eq!(std::mem::offset_of!(BatchAttr, map_fd), 36);
        assert_eq!(std::mem::offset_of!(BatchAttr, elem_flags), 40);
    }
}
