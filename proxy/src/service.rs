//! A service at run time: its configuration as new connections get it, its balancer, and the
//! state that outlives reloads (client limits, upstream health, open connections per upstream),
//! kept by service name.

use std::sync::Arc;

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
}

impl State {
    pub fn new(s: &config::Service) -> Arc<State> {
        Arc::new(State {
            limiter: limits::Limiter::new(s.limits.clone()),
            health: health::Health::new(s.name.clone(), s.upstreams.health.clone()),
            load: Arc::default(),
            cluster: cluster::Cluster::default(),
        })
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
    pub series: metrics::Series,
}

impl Service {
    pub fn name(&self) -> &str {
        &self.config.name
    }
}
