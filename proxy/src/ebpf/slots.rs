//! The relayed sockets' slots (`proxy_common::SLOTS_MAP`), mapped into this process's memory:
//! state and credit of each socket in one place, read and written without a system call.
//!
//! Every field is an aligned `u64` with one writer (see `proxy_common::Slot`), accessed here
//! as an atomic. Slots are claimed by a compare-and-swap on `owner`, so this process and a
//! predecessor or successor sharing the array during an upgrade never take the same one.

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use proxy_common::{FREED, QUARANTINE_MS, Slot};

/// The slots array, mapped shared and writable.
pub struct Slots {
    base: NonNull<Slot>,
    len: u32,
    /// Where the next claim starts looking: claims go round the array, so a released slot is
    /// reached again only after every other one (on top of its quarantine).
    cursor: AtomicU32,
}

// SAFETY: the mapping is shared memory accessed only through atomics (`field`), and it lives
// until `Slots` is dropped.
unsafe impl Send for Slots {}
// SAFETY: as above.
unsafe impl Sync for Slots {}

/// A field of a slot, by its byte offset in `Slot` (`std::mem::offset_of!`).
pub type Field = usize;

impl Slots {
    /// Maps the array behind `fd` (an `Array<Slot>` created with `BPF_F_MMAPABLE`, `len`
    /// elements).
    pub fn map(fd: BorrowedFd<'_>, len: u32) -> io::Result<Self> {
        let bytes = bytes_of(len);
        // SAFETY: a fresh shared mapping of the map's memory, of the map's size (the kernel
        // refuses a larger one); nothing else in this process refers to it.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(at.cast::<Slot>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Slots {
            base,
            len,
            cursor: AtomicU32::new(0),
        })
    }

    /// One field of slot `index`, as an atomic.
    pub fn field(&self, index: u32, field: Field) -> &AtomicU64 {
        assert!(index < self.len, "slot {index} out of {}", self.len);
        debug_assert!(field < size_of::<Slot>() && field.is_multiple_of(8));
        // SAFETY: inside the mapping (index checked above, `field` an offset of an aligned u64
        // within `Slot`); the mapping outlives `&self`; every access to the memory, here and
        // in the kernel, is a whole aligned u64.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(index as usize).cast::<u8>().add(field).cast()) }
    }

    /// Claims a free slot for the socket `cookie` and fills it for insertion: `peer` and the
    /// window, every counter zero. `None` when every slot is held or in quarantine.
    pub fn claim(&self, cookie: u64, fill: &Slot) -> Option<u32> {
        let now = monotonic_ms();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        for i in 0..self.len {
            let index = start.wrapping_add(i) % self.len;
            let owner = self.field(index, OWNER);
            let seen = owner.load(Ordering::Acquire);
            let free = seen == 0 || (seen & FREED != 0 && now.saturating_sub(seen & !FREED) >= QUARANTINE_MS);
            if free
                && owner
                    .compare_exchange(seen, cookie, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                self.cursor.store(index.wrapping_add(1), Ordering::Relaxed);
                for (at, value) in words(fill).enumerate().skip(1) {
                    self.field(index, at * 8).store(value, Ordering::Relaxed);
                }
                // The slot is filled before the socket enters the index and the socket map (system
                // calls, which order these stores before any verdict that can find the slot).
                return Some(index);
            }
        }
        None
    }

    /// Releases slot `index`, held by `cookie`: claimable again after the quarantine.
    pub fn release(&self, index: u32, cookie: u64) {
        let owner = self.field(index, OWNER);
        let _ = owner.compare_exchange(cookie, FREED | monotonic_ms(), Ordering::AcqRel, Ordering::Relaxed);
    }

    /// A copy of slot `index` as it is now (each field read once; fields the verdict is
    /// writing may be a moment apart).
    #[cfg(test)]
    pub fn read(&self, index: u32) -> Slot {
        let mut words = [0u64; size_of::<Slot>() / 8];
        for (at, w) in words.iter_mut().enumerate() {
            *w = self.field(index, at * 8).load(Ordering::Acquire);
        }
        // SAFETY: `Slot` is `#[repr(C)]` with u64 fields only, the size of `words`.
        unsafe { std::mem::transmute::<[u64; size_of::<Slot>() / 8], Slot>(words) }
    }

    /// Slots held by a socket now (neither free nor in quarantine).
    pub fn held(&self) -> usize {
        (0..self.len)
            .filter(|&i| {
                let owner = self.field(i, OWNER).load(Ordering::Relaxed);
                owner != 0 && owner & FREED == 0
            })
            .count()
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of that size; no reference into it outlives `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), bytes_of(self.len)) };
    }
}

/// Offset of `Slot::owner`.
const OWNER: Field = std::mem::offset_of!(Slot, owner);

/// The mapping's size: the array's values, rounded up to whole pages.
fn bytes_of(len: u32) -> usize {
    let page = 4096;
    (len as usize * size_of::<Slot>()).div_ceil(page) * page
}

/// The slot's fields as words, in order.
fn words(slot: &Slot) -> impl Iterator<Item = u64> {
    // SAFETY: as in `Slots::read`, the other way round.
    let words: [u64; size_of::<Slot>() / 8] = unsafe { std::mem::transmute(*slot) };
    words.into_iter()
}

/// Milliseconds of `CLOCK_MONOTONIC`: the same clock in every process of the machine, so a
/// successor honours its predecessor's quarantines.
fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: an out-pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Anonymous shared memory stands in for the map (the same accesses, no root needed).
    fn anonymous(len: u32) -> Slots {
        // SAFETY: a fresh anonymous mapping of the size `Slots::drop` unmaps.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes_of(len),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        Slots {
            base: NonNull::new(at.cast()).unwrap(),
            len,
            cursor: AtomicU32::new(0),
        }
    }

    fn fill(peer: u64) -> Slot {
        Slot {
            peer_cookie: peer,
            window_bytes: 4096,
            window_skbs: 16,
            ..Slot::default()
        }
    }

    #[test]
    fn a_claim_fills_the_slot_and_zeroes_its_counters() {
        let slots = anonymous(4);
        slots
            .field(0, std::mem::offset_of!(Slot, redirected))
            .store(99, Ordering::Relaxed);
        let i = slots.claim(7, &fill(8)).unwrap();
        assert_eq!(i, 0);
        let s = slots.read(i);
        assert_eq!(
            (s.owner, s.peer_cookie, s.window_bytes, s.window_skbs),
            (7, 8, 4096, 16)
        );
        assert_eq!(s.redirected, 0);
        assert_eq!(slots.held(), 1);
    }

    #[test]
    fn a_released_slot_waits_out_its_quarantine() {
        let slots = anonymous(2);
        let a = slots.claim(1, &fill(2)).unwrap();
        let b = slots.claim(2, &fill(1)).unwrap();
        assert_ne!(a, b);
        assert_eq!(slots.claim(3, &fill(4)), None, "every slot held");
        slots.release(a, 1);
        assert_eq!(slots.held(), 1);
        assert_eq!(slots.claim(3, &fill(4)), None, "released just now: in quarantine");
        // Released long ago: claimable.
        slots
            .field(a, OWNER)
            .store(FREED | monotonic_ms().saturating_sub(QUARANTINE_MS), Ordering::Relaxed);
        assert_eq!(slots.claim(3, &fill(4)), Some(a));
    }

    #[test]
    fn only_the_holder_releases_a_slot() {
        let slots = anonymous(1);
        let a = slots.claim(1, &fill(2)).unwrap();
        slots.release(a, 5);
        assert_eq!(slots.read(a).owner, 1);
        assert_eq!(slots.held(), 1);
    }

    #[test]
    fn claims_from_many_threads_never_share_a_slot() {
        let slots = std::sync::Arc::new(anonymous(64));
        let got: Vec<u32> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8u64)
                .map(|t| {
                    let slots = &slots;
                    s.spawn(move || {
                        (0..8u64)
                            .map(|k| slots.claim(1 + t * 8 + k, &fill(0)).unwrap())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let mut sorted = got.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 64);
        assert_eq!(slots.claim(1000, &fill(0)), None);
    }
}
