//! Dropping privileges once start-up is done.
//!
//! Loading the kernel relay needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (its verdict reads
//! kernel memory: each skb's TCP sequence numbers), and binding a port below 1024
//! needs CAP_NET_BIND_SERVICE; serving needs none of them (map updates go through file
//! descriptors the proxy already holds). So after both, the daemon gives up every capability,
//! before its worker threads exist (capabilities are per thread and inherited at creation).

use caps::CapSet;

/// Capabilities held before and after [`drop_all`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub before: Vec<String>,
}

/// Clears the effective, permitted, inheritable and ambient sets of the calling thread, and the
/// bounding set as far as allowed, so nothing can regain them. Call it while the process has a
/// single thread.
pub fn drop_all() -> Result<Dropped, caps::errors::CapsError> {
    let mut before: Vec<String> = caps::read(None, CapSet::Effective)?
        .iter()
        .map(|c| c.to_string())
        .collect();
    before.sort();
    // The bounding set needs CAP_SETPCAP to shrink; without it there is nothing to protect.
    if caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP)? {
        caps::clear(None, CapSet::Bounding)?;
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    caps::clear(None, CapSet::Effective)?;
    caps::clear(None, CapSet::Permitted)?;
    Ok(Dropped { before })
}
