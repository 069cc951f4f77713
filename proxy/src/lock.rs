//! One way to take a mutex. Every lock in the proxy guards a few field writes that a panic
//! cannot leave half done, so a poisoned lock is still usable: taking it never panics.

use std::sync::{Mutex, MutexGuard, PoisonError};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
