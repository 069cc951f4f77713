//! Upstream health: passive (handshake failures mark an upstream down for a cool-down period) and
//! optional active probes (a periodic TCP connect or full WebSocket handshake).
//!
//! A down upstream is skipped in every client's failover order, so its clients go to their next
//! hash choice and come back when it recovers; nobody else moves. If every candidate of a client
//! is down, all are tried anyway: a shared blip must not turn into refusing everyone for the
//! whole cool-down.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{self, Probe};
use crate::lock::lock;
use crate::metrics::Metrics;

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    down_until: Option<Instant>,
}

/// Health of every configured upstream.
pub struct Health {
    /// The service whose upstreams these are (a metric label).
    service: String,
    cfg: Mutex<config::Health>,
    states: Mutex<HashMap<SocketAddr, State>>,
}

impl Health {
    pub fn new(service: String, cfg: config::Health) -> Self {
        Self {
            service,
            cfg: Mutex::new(cfg),
            states: Mutex::new(HashMap::new()),
        }
    }

    /// New settings and upstream list (reload): upstreams that left are forgotten.
    pub fn reconfigure(&self, cfg: config::Health, upstreams: &[SocketAddr], metrics: &Metrics) {
        *lock(&self.cfg) = cfg;
        lock(&self.states).retain(|addr, _| {
            let keep = upstreams.contains(addr);
            if !keep {
                metrics.upstream_removed(&self.service, *addr);
            }
            keep
        });
        for a in upstreams {
            if self.is_up(*a, Instant::now()) {
                metrics.upstream_up(&self.service, *a, true);
            }
        }
    }

    /// Upstreams down now, and for how many more milliseconds (for a successor process).
    pub fn down(&self, now: Instant) -> Vec<(SocketAddr, u64)> {
        lock(&self.states)
            .iter()
            .filter_map(|(a, s)| {
                let until = s.down_until.filter(|u| *u > now)?;
                Some((*a, (until - now).as_millis() as u64))
            })
            .collect()
    }

    /// A predecessor's down upstreams: they stay down for what was left of their cool-down.
    pub fn import(&self, down: &[(SocketAddr, u64)], now: Instant, metrics: &Metrics) {
        let mut states = lock(&self.states);
        for &(addr, ms) in down {
            let s = states.entry(addr).or_default();
            s.down_until = Some(now + Duration::from_millis(ms));
            metrics.upstream_up(&self.service, addr, false);
        }
    }

    /// `order` without the upstreams that are down, unless that leaves none.
    pub fn filter(&self, order: Vec<SocketAddr>, now: Instant) -> Vec<SocketAddr> {
        let up: Vec<SocketAddr> = order.iter().copied().filter(|a| self.is_up(*a, now)).collect();
        if up.is_empty() { order } else { up }
    }

    pub fn is_up(&self, addr: SocketAddr, now: Instant) -> bool {
        lock(&self.states)
            .get(&addr)
            .and_then(|s| s.down_until)
            .is_none_or(|until| now >= until)
    }

    pub fn success(&self, addr: SocketAddr, metrics: &Metrics) {
        let mut states = lock(&self.states);
        let s = states.entry(addr).or_default();
        let was_down = s.down_until.is_some();
        *s = State::default();
        drop(states);
        // The gauge is 0 only while the upstream is marked down (or was, until this success):
        // otherwise it is 1 already, set when the configuration was installed.
        if was_down {
            info!(service = %self.service, upstream = %addr, "upstream is up again");
            metrics.upstream_up(&self.service, addr, true);
        }
    }

    pub fn failure(&self, addr: SocketAddr, now: Instant, metrics: &Metrics) {
        let cfg = lock(&self.cfg).clone();
        let mut states = lock(&self.states);
        let s = states.entry(addr).or_default();
        s.consecutive_failures += 1;
        if s.consecutive_failures >= cfg.max_fails && s.down_until.is_none_or(|u| now >= u) {
            s.down_until = Some(now + cfg.fail_timeout);
            let failures = s.consecutive_failures;
            drop(states);
            warn!(service = %self.service, upstream = %addr, failures, cool_down_s = cfg.fail_timeout.as_secs_f64(), "upstream marked down");
            metrics.upstream_up(&self.service, addr, false);
        }
    }
}

/// Runs the active probes of every service's upstreams until `stop` is cancelled. Each probe
/// counts like a handshake: a failure towards marking down, a success marks up.
pub(crate) async fn probe_loop(shared: Arc<crate::Shared>, stop: CancellationToken) {
    // Due time of each service's next round, by name; a service without probes waits for a
    // reload that turns them on.
    let mut due: HashMap<String, Instant> = HashMap::new();
    loop {
        let rt = shared.runtime.load_full();
        let now = Instant::now();
        let mut next = now + Duration::from_secs(1);
        for s in &rt.services {
            let up = &s.config.upstreams;
            let Some(interval) = up.health.probe_interval else {
                continue;
            };
            let at = *due.entry(s.name().to_string()).or_insert(now);
            if at > now {
                next = next.min(at);
                continue;
            }
            let targets = up.main.iter().chain(&up.backup).map(|u| u.address);
            for addr in targets {
                let ok = tokio::select! {
                    _ = stop.cancelled() => return,
                    ok = probe(addr, up.health.probe, up) => ok,
                };
                if ok {
                    s.state.health.success(addr, &shared.metrics);
                } else {
                    s.state.health.failure(addr, Instant::now(), &shared.metrics);
                }
            }
            let at = Instant::now() + interval;
            due.insert(s.name().to_string(), at);
            next = next.min(at);
        }
        due.retain(|name, _| rt.services.iter().any(|s| s.name() == name));
        drop(rt);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next.into()) => {}
        }
    }
}

/// One probe: a TCP connect, or a full WebSocket handshake checked like a client's (after a
/// PROXY protocol LOCAL header when the upstreams expect one).
async fn probe(addr: SocketAddr, kind: Probe, up: &crate::config::Upstreams) -> bool {
    match kind {
        Probe::Tcp => {
            matches!(
                tokio::time::timeout(up.timeout, tokio::net::TcpStream::connect(addr)).await,
                Ok(Ok(_))
            )
        }
        Probe::Websocket => {
            // 16 bytes once decoded ("wsproxy probe 16"), as RFC 6455 requires of a key.
            const KEY: &str = "d3Nwcm94eSBwcm9iZSAxNg==";
            let mut request = if up.send_proxy_protocol {
                crate::proxy_protocol::v2_local()
            } else {
                Vec::new()
            };
            request.extend_from_slice(
                format!(
                    "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: wsproxy-probe\r\n\r\n"
                )
                .as_bytes(),
            );
            let tls = crate::upstream::tls_for(up, addr);
            crate::upstream::handshake(addr, tls, &request, KEY, up.timeout, 16 * 1024, false)
                .await
                .is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn health(max_fails: u32) -> Health {
        Health::new(
            "s".into(),
            config::Health {
                max_fails,
                fail_timeout: Duration::from_secs(10),
                ..Default::default()
            },
        )
    }

    #[test]
    fn down_after_max_fails_and_back_after_cool_down() {
        let (h, m, t0) = (health(2), Metrics::new(), Instant::now());
        h.failure(addr(1), t0, &m);
        assert!(h.is_up(addr(1), t0), "one failure is below max_fails");
        h.failure(addr(1), t0, &m);
        assert!(!h.is_up(addr(1), t0));
        assert_eq!(h.filter(vec![addr(1), addr(2)], t0), vec![addr(2)]);
        assert!(h.is_up(addr(1), t0 + Duration::from_secs(10)), "the cool-down is over");
        assert!(
            m.encode()
                .contains("wsproxy_upstream_up{service=\"s\",upstream=\"127.0.0.1:1\"} 0")
        );
    }

    #[test]
    fn success_resets_and_all_down_tries_all() {
        let (h, m, t0) = (health(1), Metrics::new(), Instant::now());
        h.failure(addr(1), t0, &m);
        h.failure(addr(2), t0, &m);
        assert_eq!(h.filter(vec![addr(2), addr(1)], t0), vec![addr(2), addr(1)]);
        h.success(addr(1), &m);
        assert!(h.is_up(addr(1), t0));
        assert_eq!(h.filter(vec![addr(2), addr(1)], t0), vec![addr(1)]);
    }
}
