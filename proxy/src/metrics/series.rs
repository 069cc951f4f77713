//! One service's series, looked up once and kept.
//!
//! Why: every handshake and every relay's end counts into a handful of series labelled with the
//! service (and the upstream). Looked up per event, each count built its label set (the service
//! name copied, the upstream address formatted), hashed it and took the family's lock: about ten
//! allocations and three address formats per handshake. A series handle is the series itself
//! (the family keeps a clone of the same counter), so counting through a kept handle is one
//! atomic add. A service's series are never removed from their families, so a kept handle stays
//! the exported one. An upstream's attempts series is made at its first attempt, as before (a
//! backup never tried has none), and kept from then on.

use std::net::SocketAddr;
use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::{BytesLabels, ENDS, EndLabels, HandshakeOutcome, MODES, Metrics, RelayLabels, UpstreamLabels};
use crate::outcome::{End, Mode};

/// The series a service's connections count into (see [`Metrics::service_added`]).
pub struct Series {
    name: String,
    /// By [`mode_index`].
    open: [Gauge; 2],
    /// By [`mode_index`], then [`end_index`].
    ended: [[Counter; ENDS.len()]; 2],
    /// By [`mode_index`], then client to upstream, upstream to client.
    bytes: [[Counter; 2]; 2],
    /// `wsproxy_handshakes_total{outcome="upgraded"}`: the outcome of nearly every handshake.
    upgraded: Counter,
    /// `wsproxy_upstream_attempts_total` of each upstream address of the configuration, from
    /// its first attempt on.
    attempts: Vec<(SocketAddr, OnceLock<Counter>)>,
}

impl Series {
    pub(super) fn new(m: &Metrics, name: &str, upstreams: &[SocketAddr]) -> Self {
        let open = MODES.map(|mode| {
            m.open
                .get_or_create(&RelayLabels {
                    service: name.to_owned(),
                    relay: mode.as_str(),
                })
                .clone()
        });
        let ended = MODES.map(|mode| {
            ENDS.map(|end| {
                m.ended
                    .get_or_create(&EndLabels {
                        service: name.to_owned(),
                        relay: mode.as_str(),
                        end: end.as_str(),
                    })
                    .clone()
            })
        });
        let bytes = MODES.map(|mode| {
            ["client_to_upstream", "upstream_to_client"].map(|direction| {
                m.bytes
                    .get_or_create(&BytesLabels {
                        service: name.to_owned(),
                        relay: mode.as_str(),
                        direction,
                    })
                    .clone()
            })
        });
        let upgraded = m
            .handshakes
            .get_or_create(&HandshakeOutcome::Upgraded.labels(name))
            .clone();
        let attempts = upstreams.iter().map(|&a| (a, OnceLock::new())).collect();
        Self {
            name: name.to_owned(),
            open,
            ended,
            bytes,
            upgraded,
            attempts,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The upstream addresses whose attempts are kept, in the configuration's order.
    pub fn upstreams(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.attempts.iter().map(|(a, _)| *a)
    }

    /// The same service's series for another list of upstream addresses (a reload changed
    /// them): the service's own handles shared, the attempts of addresses still listed kept.
    pub fn for_upstreams(&self, upstreams: &[SocketAddr]) -> Self {
        let attempts = upstreams
            .iter()
            .map(|&a| {
                let kept = self.attempts.iter().find(|(k, _)| *k == a).map(|(_, c)| c.clone());
                (a, kept.unwrap_or_default())
            })
            .collect();
        Self {
            name: self.name.clone(),
            open: self.open.clone(),
            ended: self.ended.clone(),
            bytes: self.bytes.clone(),
            upgraded: self.upgraded.clone(),
            attempts,
        }
    }

    pub(super) fn open(&self, mode: Mode) -> &Gauge {
        &self.open[mode_index(mode)]
    }

    pub(super) fn ended(&self, mode: Mode, end: End) -> &Counter {
        &self.ended[mode_index(mode)][end_index(end)]
    }

    /// Client to upstream, upstream to client.
    pub(super) fn bytes(&self, mode: Mode) -> &[Counter; 2] {
        &self.bytes[mode_index(mode)]
    }

    pub(super) fn upgraded(&self) -> &Counter {
        &self.upgraded
    }

    /// Counts an attempt at `upstream`: through its kept counter if it is one of the
    /// configuration's addresses (made in `m` at its first attempt), else looked up in `m`.
    pub(super) fn count_attempt(&self, m: &Metrics, upstream: SocketAddr) {
        let look_up = || {
            m.upstream_attempts.get_or_create(&UpstreamLabels {
                service: self.name.clone(),
                upstream: upstream.to_string(),
            })
        };
        match self.attempts.iter().find(|(a, _)| *a == upstream) {
            Some((_, kept)) => kept.get_or_init(|| look_up().clone()).inc(),
            None => look_up().inc(),
        };
    }
}

/// Where `mode` is in [`MODES`].
fn mode_index(mode: Mode) -> usize {
    match mode {
        Mode::Kernel => 0,
        Mode::Userspace => 1,
    }
}

/// Where `end`'s label is in [`ENDS`].
fn end_index(end: End) -> usize {
    match end {
        End::Closed => 0,
        End::ClientError(_) => 1,
        End::UpstreamError(_) => 2,
        End::DrainTimeout => 3,
        End::IdleTimeout => 4,
        End::SendTimeout => 5,
        End::Shutdown => 6,
        End::MaxLifetime => 7,
        End::Internal => 8,
        End::StreamFault => 9,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_follow_the_label_lists() {
        for (i, mode) in MODES.into_iter().enumerate() {
            assert_eq!(mode_index(mode), i);
        }
        for (i, end) in ENDS.into_iter().enumerate() {
            assert_eq!(end_index(end), i, "{}", end.as_str());
        }
    }
}
