//! A service at run time: its configuration as new connections get it, its balancer, and the
//! state that outlives reloads (client limits, upstream health, open connections per upstream),
//! kept by service name.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::lock::lock;
use crate::{balance, cluster, config, health, limits, metrics};

/// What a service keeps across reloads, while its name stays in the configuration.
pub(crate) struct State {
    /// Reconfigured in place on reload, so that clients keep their limit state.
    pub limiter: Arc<limits::Limiter>,
    pub health: health::Health,
    /// Open connections per upstream (least-connections).
    pub load: Arc<balance::Load>,
    /// The client of the limits the service shares with its fleet (`[cluster]`): the store
    /// connection and this node's leases, kept across reloads (a reload that changes the
    /// store's URL moves new connections to the new store; open ones keep their leases).
    pub cluster: cluster::Cluster,
    /// The series its connections count into, kept across reloads (looked up again, a
    /// thousand services' series cost a reload more than the rest of it).
    series: Mutex<Option<Arc<metrics::Series>>>,
}

impl State {
    pub fn new(s: &config::Service) -> Arc<State> {
        Arc::new(State {
            limiter: limits::Limiter::new(s.limits.clone()),
            health: health::Health::new(s.name.clone(), s.upstreams.health.clone()),
            load: Arc::default(),
            cluster: cluster::Cluster::default(),
            series: Mutex::default(),
        })
    }

    /// The series for a configuration whose upstream addresses are `upstreams`: the kept ones,
    /// made again around the new addresses if they changed.
    pub fn series(&self, name: &str, upstreams: &[SocketAddr], metrics: &metrics::Metrics) -> Arc<metrics::Series> {
        let mut kept = lock(&self.series);
        let series = match &*kept {
            Some(s) if s.upstreams().eq(upstreams.iter().copied()) => return Arc::clone(s),
            Some(s) => s.for_upstreams(upstreams),
            None => metrics.service_added(name, upstreams),
        };
        Arc::clone(kept.insert(Arc::new(series)))
    }
}

/// One service of the configuration in force; a connection keeps the one it started with.
pub(crate) struct Service {
    pub config: config::Service,
    pub balancer: balance::Balancer,
    pub state: Arc<State>,
    /// Its TLS server configuration, when its listeners terminate TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The series its connections count into.
    pub series: Arc<metrics::Series>,
}

impl Service {
    pub fn name(&self) -> &str {
        &self.config.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(upstreams: &str) -> config::Service {
        let text = format!("[listen]\naddress = \"127.0.0.1:1\"\n[upstreams]\nmain = [{upstreams}]\n");
        let mut c = config::Config::parse(&text, "test").unwrap();
        c.services.remove(0)
    }

    #[test]
    fn series_are_kept_while_the_upstream_addresses_stay() {
        let metrics = metrics::Metrics::new();
        let a: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:3".parse().unwrap();
        let state = State::new(&service("{ address = \"127.0.0.1:2\" }"));
        let first = state.series("s", &[a], &metrics);
        assert!(
            Arc::ptr_eq(&first, &state.series("s", &[a], &metrics)),
            "same addresses: kept"
        );
        let second = state.series("s", &[a, b], &metrics);
        assert!(!Arc::ptr_eq(&first, &second), "an address more: made again");
        assert_eq!(second.upstreams().collect::<Vec<_>>(), [a, b]);
        assert!(
            !Arc::ptr_eq(&second, &state.series("s", &[b, a], &metrics)),
            "another order"
        );
    }
}
