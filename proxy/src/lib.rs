//! wsproxy: a reverse WebSocket proxy. It performs the HTTP/1.1 Upgrade handshake itself (per-client
//! limits, upstream choice by client IP with failover, forwarding headers), then relays the
//! payload untouched until either side closes.
//!
//! [`run`] serves one listener until a shutdown future completes; the binary and the tests both
//! call it. One concern per module; `connection` follows one connection through them.

pub mod access;
pub mod admin;
pub mod balance;
pub mod config;
mod connection;
pub mod descriptors;
pub mod ebpf;
pub mod echo;
pub mod handshake;
pub mod head;
pub mod headers;
pub mod health;
pub mod limits;
pub mod listener;
mod lock;
// Bounded logging of client-caused events; public so that every module (the relay too) can use it.
pub mod log_limit;
pub mod metrics;
pub mod outcome;
mod plain_http;
pub mod privileges;
pub mod proxy_protocol;
pub mod relay;
pub mod resolve;
pub mod upstream;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// The part of the state a reload replaces: new connections take the current one when they
/// start and keep it to their end, so a reload never changes a connection midway.
pub(crate) struct Runtime {
    pub config: Config,
    pub balancer: balance::Balancer,
}

impl Runtime {
    fn new(config: Config) -> Arc<Runtime> {
        Arc::new(Runtime {
            balancer: balance::Balancer::new(&config.upstreams),
            config,
        })
    }
}

/// What every connection task reads.
pub(crate) struct Shared {
    pub runtime: ArcSwap<Runtime>,
    /// The kernel relay's programs, when the configured mode wants them and they loaded.
    pub kernel: Option<ebpf::KernelPrograms>,
    /// Reconfigured in place on reload, so that clients keep their limit state.
    pub limiter: Arc<limits::Limiter>,
    pub health: health::Health,
    /// Open connections per upstream (least-connections); outlives reloads.
    pub load: Arc<balance::Load>,
    /// What upstream names resolve with, and their last good addresses; `resolve_now` wakes the
    /// resolution loop (a reload that brings new names).
    pub resolver: resolve::Resolver,
    pub resolved: std::sync::Mutex<resolve::Resolved>,
    pub resolve_now: tokio::sync::Notify,
    pub metrics: metrics::Metrics,
    /// True while the listener accepts (what `/healthz` reports).
    pub accepting: AtomicBool,
    /// Where a reload reads the configuration from (none: reload only through [`Server::apply`]).
    pub config_path: Option<PathBuf>,
}

/// A configured proxy, ready to serve listeners. Cheap to clone; tests keep it to look at its
/// state.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// Prepares a proxy for `config`: loads the kernel relay unless the mode is `userspace`.
    pub fn new(config: Config) -> anyhow::Result<Server> {
        Self::build(config, None, resolve::system())
    }

    /// Like [`Server::new`], upstream names resolved by `resolver` instead of the system's
    /// resolver (tests that control what a name resolves to).
    pub fn with_resolver(config: Config, resolver: resolve::Resolver) -> anyhow::Result<Server> {
        Self::build(config, None, resolver)
    }

    /// Like [`Server::new`], with the file that [`Server::reload`] reads again.
    pub fn from_file(path: PathBuf) -> Result<Server, StartError> {
        let config = Config::load(&path).map_err(StartError::Config)?;
        Self::build(config, Some(path), resolve::system()).map_err(StartError::Other)
    }

    fn build(config: Config, config_path: Option<PathBuf>, resolver: resolve::Resolver) -> anyhow::Result<Server> {
        let kernel = load_kernel_relay(config.relay.mode)?;
        let metrics = metrics::Metrics::new();
        metrics.kernel_relay(kernel.is_some());
        let health = health::Health::new(config.upstreams.health.clone());
        health.reconfigure(config.upstreams.health.clone(), &upstream_addresses(&config), &metrics);
        let shared = Shared {
            kernel,
            limiter: limits::Limiter::new(config.limits.clone()),
            health,
            load: Arc::default(),
            resolver,
            resolved: std::sync::Mutex::default(),
            resolve_now: tokio::sync::Notify::new(),
            metrics,
            accepting: AtomicBool::new(false),
            config_path,
            runtime: ArcSwap::new(Runtime::new(config)),
        };
        Ok(Server {
            shared: Arc::new(shared),
        })
    }

    /// Serves `listener` until `shutdown` completes; then stops accepting, lets open connections
    /// finish for `listen.drain_timeout`, closes the rest and returns.
    ///
    /// The proxy counts as accepting (`/healthz`) from this call on, before the returned future
    /// is first polled, so that an admin listener started next never reports it as down.
    pub fn serve<S: Future<Output = ()>>(
        &self,
        listener: TcpListener,
        shutdown: S,
    ) -> impl Future<Output = ()> + use<S> {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(listen = %addr, "accepting connections");
        }
        self.shared.accepting.store(true, Ordering::SeqCst);
        let shared = Arc::clone(&self.shared);
        async move {
            // Names are resolved before the first accept: meanwhile connections wait in the
            // listen queue rather than find no upstream.
            resolve_upstreams(&shared).await;
            let probes = CancellationToken::new();
            tokio::spawn(health::probe_loop(Arc::clone(&shared), probes.clone()));
            tokio::spawn(resolve_loop(Arc::clone(&shared), probes.clone()));
            listener::accept_loop(listener, shared, shutdown).await;
            probes.cancel();
        }
    }

    /// Serves the admin endpoints (`/metrics`, `/healthz`, `/reload`) on `listener` (TCP or a
    /// Unix socket, see [`admin::bind`]) until `shutdown` completes, with the `[admin]` settings
    /// of the configuration (the defaults when it has none).
    pub async fn serve_admin(&self, listener: impl Into<admin::Listener>, shutdown: impl Future<Output = ()>) {
        admin::serve(listener.into(), self.clone(), shutdown).await;
    }

    /// The admin listener's settings in the configuration now in force.
    pub(crate) fn admin_config(&self) -> Option<config::Admin> {
        self.shared.runtime.load().config.admin.clone()
    }

    pub(crate) fn admin_refused(&self, reason: metrics::AdminRefusal) {
        self.shared.metrics.admin_refused(reason);
    }

    /// The configuration new connections get.
    pub fn config(&self) -> Config {
        self.shared.runtime.load().config.clone()
    }

    /// Applies a new configuration to new connections; open connections keep theirs. Settings
    /// that only a restart can change are kept as they are, each named in the returned notes.
    pub fn apply(&self, new: Config) -> Vec<String> {
        let old = self.shared.runtime.load_full();
        let mut notes = Vec::new();
        let mut new = new;
        if new.listen != old.config.listen {
            notes.push(format!("listen.address: stays {} until a restart", old.config.listen));
            new.listen = old.config.listen;
        }
        if new.max_connections != old.config.max_connections {
            notes.push(format!(
                "listen.max_connections: stays {} until a restart",
                old.config.max_connections
            ));
            new.max_connections = old.config.max_connections;
        }
        match (&old.config.admin, &mut new.admin) {
            // The token and the idle timeout apply to new requests and connections.
            (Some(o), Some(n)) => {
                if n.address != o.address {
                    notes.push(format!("admin.address: stays {} until a restart", o.address));
                    n.address = o.address.clone();
                }
                if n.max_connections != o.max_connections {
                    notes.push(format!(
                        "admin.max_connections: stays {} until a restart",
                        o.max_connections
                    ));
                    n.max_connections = o.max_connections;
                }
            }
            (None, None) => {}
            (o, n) => {
                notes.push("admin.address: stays as it is until a restart".to_string());
                *n = o.clone();
            }
        }
        if new.relay.mode != config::RelayMode::Userspace && self.shared.kernel.is_none() {
            notes.push("relay.mode: the kernel relay is not loaded; it can only be loaded at start".to_string());
        }
        let s = &self.shared;
        s.limiter.reconfigure(new.limits.clone());
        s.health
            .reconfigure(new.upstreams.health.clone(), &upstream_addresses(&new), &s.metrics);
        // Names keep the addresses they resolved to; new names resolve right after.
        let resolved = lock::lock(&s.resolved).clone();
        (new.upstreams.main, new.upstreams.backup) = resolve::expand(&new.upstreams.entries, &resolved);
        s.runtime.store(Runtime::new(new));
        s.resolve_now.notify_one();
        s.metrics.reload(true);
        notes
    }

    /// Reads the configuration file again and applies it ([`Server::apply`]). An invalid file
    /// changes nothing: the errors come back, all of them.
    pub fn reload(&self) -> Result<Vec<String>, config::ConfigError> {
        let Some(path) = &self.shared.config_path else {
            return Err(config::ConfigError {
                source_name: "(none)".into(),
                problems: vec!["this proxy was not started from a file".into()],
            });
        };
        match Config::load(path) {
            Ok(c) => Ok(self.apply(c)),
            Err(e) => {
                self.shared.metrics.reload(false);
                Err(e)
            }
        }
    }

    /// True while the listener accepts connections.
    pub fn accepting(&self) -> bool {
        self.shared.accepting.load(Ordering::SeqCst)
    }

    /// The Prometheus text exposition of the proxy's metrics.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.encode()
    }

    /// True when the kernel relay is loaded and will carry connections.
    pub fn kernel_relay(&self) -> bool {
        self.shared.kernel.is_some()
    }

    /// Relay totals so far.
    pub fn totals(&self) -> relay::TotalsSnapshot {
        self.shared.metrics.totals()
    }

    /// Entries in the kernel relay's (socket, state, credit) maps; `None` without the kernel
    /// relay. All zero when no connection is relayed in the kernel.
    pub fn kernel_map_entries(&self) -> Option<(usize, usize, usize)> {
        self.shared.kernel.as_ref().map(|k| k.map_entry_counts())
    }
}

/// Why a [`Server`] could not start: the configuration (exit code 2), or anything else.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(config::ConfigError),
    #[error("{0:#}")]
    Other(anyhow::Error),
}

/// Resolves every upstream name of the configuration in force once; when an answer changed,
/// the configuration's candidates are rebuilt from it (on the configuration in force then, so
/// that a reload meanwhile is not undone).
async fn resolve_upstreams(shared: &Shared) {
    let names = resolve::names(&shared.runtime.load().config.upstreams.entries);
    if names.is_empty() {
        return;
    }
    let last = lock::lock(&shared.resolved).clone();
    let (now, failed) = resolve::refresh(&names, &last, &shared.resolver).await;
    let failed_before = |name: &resolve::Name| shared.metrics.resolve_failing(&format!("{}:{}", name.0, name.1));
    for (name, error) in &failed {
        let shown = format!("{}:{}", name.0, name.1);
        if !failed_before(name) {
            let kept = now.get(name).map_or(0, Vec::len);
            tracing::warn!(name = %shown, %error, kept, "upstream name did not resolve; keeping its last addresses");
        }
        shared.metrics.resolve_failed(&shown);
    }
    for name in names.iter().filter(|n| !failed.iter().any(|(f, _)| f == *n)) {
        let shown = format!("{}:{}", name.0, name.1);
        if failed_before(name) {
            tracing::info!(name = %shown, "upstream name resolves again");
        }
        shared.metrics.resolve_ok(&shown);
    }
    if now == last {
        return;
    }
    *lock::lock(&shared.resolved) = now.clone();
    shared.runtime.rcu(|current| {
        let mut c = current.config.clone();
        (c.upstreams.main, c.upstreams.backup) = resolve::expand(&c.upstreams.entries, &now);
        Runtime::new(c)
    });
    let c = shared.runtime.load();
    shared.health.reconfigure(
        c.config.upstreams.health.clone(),
        &upstream_addresses(&c.config),
        &shared.metrics,
    );
    tracing::info!(
        candidates = c.config.upstreams.main.len() + c.config.upstreams.backup.len(),
        "upstream names resolved to new addresses"
    );
}

/// Resolves the upstream names every `upstreams.resolve_interval`, and at once after a reload.
async fn resolve_loop(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let interval = shared.runtime.load().config.upstreams.resolve_interval;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = shared.resolve_now.notified() => {}
        }
        resolve_upstreams(&shared).await;
    }
}

fn upstream_addresses(c: &Config) -> Vec<std::net::SocketAddr> {
    c.upstreams
        .main
        .iter()
        .chain(&c.upstreams.backup)
        .map(|s| s.address)
        .collect()
}

/// Serves `listener` with `config` until `shutdown` completes; then stops accepting, closes the
/// connections still open and returns.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Server::new(config)?.serve(listener, shutdown).await;
    Ok(())
}

/// Loads the kernel relay unless the configuration asks for the userspace relay only, and logs
/// the one line operators look for. In `kernel` mode a relay that cannot load is fatal; in
/// `auto` mode the userspace relay carries every connection instead.
fn load_kernel_relay(mode: config::RelayMode) -> anyhow::Result<Option<ebpf::KernelPrograms>> {
    if mode == config::RelayMode::Userspace {
        tracing::info!("kernel relay: not used (relay.mode = \"userspace\")");
        return Ok(None);
    }
    match ebpf::KernelPrograms::load() {
        Ok(k) => {
            tracing::info!("kernel relay: available");
            Ok(Some(k))
        }
        Err(e) if mode == config::RelayMode::Kernel => {
            tracing::error!("kernel relay: unavailable ({e:#})");
            anyhow::bail!("kernel relay unavailable and relay.mode = \"kernel\": {e:#}")
        }
        Err(e) => {
            tracing::warn!("kernel relay: unavailable ({e:#})");
            Ok(None)
        }
    }
}
