//! wsproxy: a reverse WebSocket proxy. It performs the HTTP/1.1 Upgrade handshake itself (per-client
//! limits, upstream choice by client IP with failover, forwarding headers), then relays the
//! payload untouched until either side closes.
//!
//! A [`Server`] serves the listeners of its services until a shutdown future completes; the
//! binary and the tests both use it. One concern per module; `connection` follows one connection
//! through them.

pub mod access;
pub mod admin;
pub mod balance;
mod cluster;
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
pub mod routes;
mod service;
pub mod socket_options;
pub mod stream;
pub mod tls;
pub mod upgrade;
pub mod upstream;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// The part of the state a reload replaces: a new connection takes the current one when it
/// starts and keeps its service to its end, so a reload never changes a connection midway.
pub(crate) struct Runtime {
    pub config: Config,
    /// In the configuration's order; `routes` indexes them.
    pub services: Vec<Arc<service::Service>>,
    pub routes: routes::Routes,
}

/// What every connection task reads.
pub(crate) struct Shared {
    pub runtime: ArcSwap<Runtime>,
    /// The kernel relay's programs, when some service's relay mode wants them and they loaded.
    pub kernel: Option<ebpf::KernelPrograms>,
    /// What each service keeps across reloads, by name.
    states: Mutex<HashMap<String, Arc<service::State>>>,
    /// TLS session resumption, shared by every service's TLS configuration.
    resumption: tls::Resumption,
    /// Held while a new runtime is built and installed (reload, new upstream addresses), so
    /// that two installs never undo each other.
    installing: Mutex<()>,
    /// What upstream names resolve with, and their last good addresses; `resolve_now` wakes the
    /// resolution loop (a reload that brings new names).
    pub resolver: resolve::Resolver,
    pub resolved: Mutex<resolve::Resolved>,
    pub resolve_now: tokio::sync::Notify,
    pub metrics: metrics::Metrics,
    /// True while the listeners accept (what `/healthz` reports).
    pub accepting: AtomicBool,
    /// The listeners being served, once [`Server::serve_all`] runs; a reload binds and stops
    /// listeners through it.
    listeners: Mutex<Option<listener::Set>>,
    /// Where a reload reads the configuration from (none: reload only through [`Server::apply`]).
    pub config_path: Option<PathBuf>,
    /// Cancelled when a successor has taken over: every relay lets go of its pair at its next
    /// point where no byte is in userspace's hands (see `upgrade`).
    pub handover: CancellationToken,
    /// Cancelled once this process has handed over to a successor (it is stopping).
    pub upgraded: CancellationToken,
    /// Where moved pairs go while a successor takes them.
    pub successor: Mutex<Option<tokio::sync::mpsc::UnboundedSender<(upgrade::PairState, relay::Moved)>>>,
    /// SIGUSR2: start an upgrade.
    pub upgrade_requested: tokio::sync::Notify,
    /// The admin listener's socket, for a successor.
    pub admin_fd: Mutex<Option<std::os::fd::OwnedFd>>,
    /// Cancelled when every listener has stopped and every connection task has ended.
    pub drained: CancellationToken,
    /// Cancelled once every listener has been started.
    pub serving: CancellationToken,
}

impl Shared {
    /// The listening sockets being served: configured addresses and copies of the descriptors.
    fn listener_fds(&self) -> std::io::Result<(Vec<SocketAddr>, Vec<std::os::fd::OwnedFd>)> {
        match &*lock::lock(&self.listeners) {
            Some(set) => set.fds(),
            None => Ok((Vec::new(), Vec::new())),
        }
    }

    /// A predecessor's per-client limits and upstream health, by service name.
    fn restore(&self, limits: &[(String, Vec<upgrade::ClientState>)], health: &[(String, Vec<(SocketAddr, u64)>)]) {
        let states = lock::lock(&self.states);
        let now = std::time::Instant::now();
        for (service, clients) in limits {
            if let Some(s) = states.get(service) {
                s.limiter.import(clients, now);
            }
        }
        for (service, down) in health {
            if let Some(s) = states.get(service) {
                s.health.import(down, now, &self.metrics);
            }
        }
    }

    /// Carries on with a connection a predecessor handed over.
    fn resume(self: &Arc<Self>, state: upgrade::PairState, moved: relay::Moved) {
        let shared = Arc::clone(self);
        let resumed = connection::adopt(state, moved, &shared);
        match &*lock::lock(&self.listeners) {
            Some(set) => set.resume(move |stop| resumed.run(shared, stop)),
            None => tracing::error!("takeover: not serving yet; a handed-over connection is closed"),
        }
    }
    /// Builds the runtime of `config` (names expanded to their last resolved addresses, each
    /// service with its kept state, reconfigured) and puts it in force.
    fn install(&self, config: Config) {
        let _installing = lock::lock(&self.installing);
        self.install_locked(config);
    }

    /// Installs the configuration in force again, after `change` (when it returns true): under
    /// the same lock as [`Shared::install`], so that a reload meanwhile is never undone.
    fn reinstall(&self, change: impl FnOnce(&mut Config) -> bool) {
        let _installing = lock::lock(&self.installing);
        let mut config = self.runtime.load().config.clone();
        if change(&mut config) {
            self.install_locked(config);
        }
    }

    /// Reads every service's certificate and key again; installs those that changed and can be
    /// used, and keeps the previous ones of the others (saying why, naming service and file).
    fn reload_certificates(&self) {
        self.reinstall(|config| {
            let mut changed = Vec::new();
            for s in &mut config.services {
                let Some(t) = &s.tls else { continue };
                match t.reloaded() {
                    Ok(new) if new.certified.cert != t.certified.cert => {
                        changed.push(s.name.clone());
                        s.tls = Some(new);
                    }
                    Ok(_) => {}
                    Err(problems) => tracing::error!(
                        service = %s.name,
                        problems = %problems.join("; "),
                        "certificate not reloaded; the previous one stays in use"
                    ),
                }
            }
            if !changed.is_empty() {
                tracing::info!(services = %changed.join(","), "certificates reloaded from their files");
            }
            !changed.is_empty()
        });
    }

    fn install_locked(&self, mut config: Config) {
        let resolved = lock::lock(&self.resolved).clone();
        let mut states = lock::lock(&self.states);
        let mut services = Vec::with_capacity(config.services.len());
        for s in &mut config.services {
            (s.upstreams.main, s.upstreams.backup) = resolve::expand(&s.upstreams.entries, &resolved);
            let state = Arc::clone(states.entry(s.name.clone()).or_insert_with(|| service::State::new(s)));
            state.limiter.reconfigure(s.limits.clone());
            state
                .health
                .reconfigure(s.upstreams.health.clone(), &upstream_addresses(s), &self.metrics);
            let series = state.series(&s.name, &upstream_addresses(s), &self.metrics);
            match &s.tls {
                Some(t) => self.metrics.certificate_expiry(&s.name, seconds_until(t.not_after)),
                None => self.metrics.certificate_removed(&s.name),
            }
            if s.upstreams.tls.as_ref().is_some_and(|t| !t.verify) {
                tracing::warn!(service = %s.name, "upstream TLS without certificate verification (upstreams.tls.verify = false): insecure");
            }
            services.push(Arc::new(service::Service {
                balancer: balance::Balancer::new(&s.upstreams),
                tls: s.tls.as_ref().map(|t| self.resumption.server_config(t)),
                config: s.clone(),
                state,
                series,
            }));
        }
        // A removed service's state lives on in its open connections only.
        let names: std::collections::HashSet<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        states.retain(|name, _| names.contains(name.as_str()));
        let routes = routes::Routes::new(&config.services);
        self.runtime.store(Arc::new(Runtime {
            config,
            services,
            routes,
        }));
    }
}

/// A configured proxy, ready to serve listeners. Cheap to clone; tests keep it to look at its
/// state.
#[derive(Clone)]
pub struct Server {
    pub(crate) shared: Arc<Shared>,
}

impl Server {
    /// Prepares a proxy for `config`: loads the kernel relay unless every service's mode is
    /// `userspace`.
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

    /// Like [`Server::from_file`] for a successor process: the kernel relay is the
    /// predecessor's (its maps' descriptors), not loaded again.
    pub fn from_file_taking_over(
        path: PathBuf,
        kernel: Option<Vec<std::os::fd::OwnedFd>>,
    ) -> Result<Server, StartError> {
        let config = Config::load(&path).map_err(StartError::Config)?;
        let kernel = match kernel {
            Some(fds) => Kernel::Adopt(fds),
            None => Kernel::Load,
        };
        Self::build_with(config, Some(path), resolve::system(), kernel).map_err(StartError::Other)
    }

    fn build(config: Config, config_path: Option<PathBuf>, resolver: resolve::Resolver) -> anyhow::Result<Server> {
        Self::build_with(config, config_path, resolver, Kernel::Load)
    }

    fn build_with(
        config: Config,
        config_path: Option<PathBuf>,
        resolver: resolve::Resolver,
        kernel: Kernel,
    ) -> anyhow::Result<Server> {
        let kernel = match kernel {
            Kernel::Load => load_kernel_relay(config.kernel_relay_wanted())?,
            Kernel::Adopt(fds) => {
                let k = ebpf::KernelPrograms::adopt(fds).context("adopting the predecessor's kernel relay")?;
                tracing::info!("kernel relay: the predecessor's, adopted");
                Some(k)
            }
        };
        if kernel.is_some() {
            relay::warn_of_host_limits(config.kernel_relay_windows());
        }
        let metrics = metrics::Metrics::new();
        metrics.kernel_relay(kernel.is_some());
        let shared = Shared {
            kernel,
            states: Mutex::default(),
            resumption: tls::Resumption::new()?,
            installing: Mutex::default(),
            resolver,
            resolved: Mutex::default(),
            resolve_now: tokio::sync::Notify::new(),
            metrics,
            accepting: AtomicBool::new(false),
            listeners: Mutex::default(),
            config_path,
            handover: CancellationToken::new(),
            upgraded: CancellationToken::new(),
            successor: Mutex::default(),
            upgrade_requested: tokio::sync::Notify::new(),
            admin_fd: Mutex::default(),
            drained: CancellationToken::new(),
            serving: CancellationToken::new(),
            runtime: ArcSwap::new(Arc::new(Runtime {
                config: config.clone(),
                services: Vec::new(),
                routes: routes::Routes::default(),
            })),
        };
        shared.install(config);
        Ok(Server {
            shared: Arc::new(shared),
        })
    }

    /// Serves `listener` as the configuration's one listener address (whatever address it is
    /// bound to: tests bind port 0) until `shutdown` completes; see [`Server::serve_all`].
    pub fn serve<S: Future<Output = ()>>(
        &self,
        listener: TcpListener,
        shutdown: S,
    ) -> impl Future<Output = ()> + use<S> {
        let configured = self.shared.runtime.load().config.listeners();
        if configured.len() != 1 {
            tracing::error!(
                listeners = configured.len(),
                "Server::serve is for a configuration with one listener address; the others are bound by the server"
            );
        }
        let bound = configured.first().map(|&a| (a, listener)).into_iter().collect();
        self.serve_all(bound, shutdown)
    }

    /// Serves every listener address of the configuration until `shutdown` completes: those in
    /// `bound` (configured address, listener already bound: the daemon binds before it drops its
    /// privileges) and the others, which it binds itself. A reload then binds new addresses and
    /// stops removed ones. At the end every listener stops accepting, open connections get
    /// `listen.drain_timeout` to finish, the rest are closed, and the future returns.
    ///
    /// The proxy counts as accepting (`/healthz`) from this call on, before the returned future
    /// is first polled, so that an admin listener started next never reports it as down.
    pub fn serve_all<S: Future<Output = ()>>(
        &self,
        bound: HashMap<SocketAddr, TcpListener>,
        shutdown: S,
    ) -> impl Future<Output = ()> + use<S> {
        self.shared.accepting.store(true, Ordering::SeqCst);
        let shared = Arc::clone(&self.shared);
        async move {
            // Names are resolved before the first accept: meanwhile connections wait in the
            // listen queue rather than find no upstream.
            resolve_upstreams(&shared).await;
            let probes = CancellationToken::new();
            tokio::spawn(health::probe_loop(Arc::clone(&shared), probes.clone()));
            tokio::spawn(resolve_loop(Arc::clone(&shared), probes.clone()));
            tokio::spawn(certificate_loop(Arc::clone(&shared), probes.clone()));
            let set = listener::Set::new(&shared);
            let mut bound = bound;
            for addr in shared.runtime.load().config.listeners() {
                let l = match bound.remove(&addr) {
                    Some(l) => l,
                    None => match listener::bind(addr) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(listen = %addr, error = %e, "cannot listen; the services on it are not served there");
                            continue;
                        }
                    },
                };
                set.start(addr, l, &shared);
            }
            *lock::lock(&shared.listeners) = Some(set.clone());
            shared.serving.cancel();
            shutdown.await;
            // Every listener stops accepting now; the drain follows.
            shared.accepting.store(false, Ordering::SeqCst);
            lock::lock(&shared.listeners).take();
            set.stop_all(shared.runtime.load().config.drain_timeout).await;
            shared.drained.cancel();
            probes.cancel();
        }
    }

    /// Serves the admin endpoints (`/metrics`, `/healthz`, `/reload`, `/services`) on `listener`
    /// (TCP or a Unix socket, see [`admin::bind`]) until `shutdown` completes, with the `[admin]`
    /// settings of the configuration (the defaults when it has none).
    pub async fn serve_admin(&self, listener: impl Into<admin::Listener>, shutdown: impl Future<Output = ()>) {
        admin::serve(listener.into(), self.clone(), shutdown).await;
    }

    /// Starts an upgrade (SIGUSR2): see [`upgrade`].
    pub fn request_upgrade(&self) {
        self.shared.upgrade_requested.notify_one();
    }

    /// True once this process has handed over to a successor.
    pub fn upgraded(&self) -> bool {
        self.shared.upgraded.is_cancelled()
    }

    /// Cancelled once this process has handed over to a successor.
    pub fn upgraded_signal(&self) -> CancellationToken {
        self.shared.upgraded.clone()
    }

    /// Completes once [`Server::serve_all`] has started every listener.
    pub async fn serving(&self) {
        self.shared.serving.cancelled().await;
    }

    /// The admin listener's socket, kept for a successor.
    pub fn keep_admin_socket(&self, fd: std::os::fd::OwnedFd) {
        *lock::lock(&self.shared.admin_fd) = Some(fd);
    }

    /// The admin listener's settings in the configuration now in force.
    pub(crate) fn admin_config(&self) -> Option<config::Admin> {
        self.shared.runtime.load().config.admin.clone()
    }

    pub(crate) fn admin_refused(&self, reason: metrics::AdminRefusal) {
        self.shared.metrics.admin_refused(reason);
    }

    /// The services in force and the state of their upstreams, as the admin listener's
    /// `GET /services` shows them: per service its listeners, hosts, open connections and
    /// balancing; per upstream its address (names expanded), list, weight, health and open
    /// connections (counted under least-connections only).
    pub fn services_json(&self) -> serde_json::Value {
        let rt = self.shared.runtime.load_full();
        let now = std::time::Instant::now();
        let services: Vec<serde_json::Value> = rt
            .services
            .iter()
            .map(|s| {
                let c = &s.config;
                let upstream = |u: &config::UpstreamServer, backup: bool| {
                    serde_json::json!({
                        "address": u.address.to_string(),
                        "backup": backup,
                        "weight": u.weight,
                        "up": s.state.health.is_up(u.address, now),
                        "open": s.state.load.open(u.address),
                    })
                };
                let upstreams: Vec<serde_json::Value> = c
                    .upstreams
                    .main
                    .iter()
                    .map(|u| upstream(u, false))
                    .chain(c.upstreams.backup.iter().map(|u| upstream(u, true)))
                    .collect();
                serde_json::json!({
                    "name": c.name,
                    "listen": c.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    "hosts": c.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                    "open": s.state.limiter.open(),
                    "balance": c.upstreams.balance.as_str(),
                    "relay": format!("{:?}", c.relay.mode).to_lowercase(),
                    "upstreams": upstreams,
                })
            })
            .collect();
        serde_json::json!({ "services": services })
    }

    /// The configuration new connections get (upstream names expanded to the addresses they
    /// resolved to).
    pub fn config(&self) -> Config {
        self.shared.runtime.load().config.clone()
    }

    /// Applies a new configuration to new connections; open connections keep theirs. Services
    /// are added, changed and removed; listener addresses no service uses any more stop
    /// accepting (their connections get `listen.drain_timeout`), new ones are bound first: one
    /// that cannot be bound refuses the whole change. Settings that only a restart can change
    /// are kept as they are, each named in the returned notes.
    pub fn apply(&self, new: Config) -> Result<Vec<String>, config::ConfigError> {
        let s = &self.shared;
        let old = s.runtime.load_full();
        let mut notes = Vec::new();
        let mut new = new;
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
        if new.kernel_relay_wanted().0 && s.kernel.is_none() {
            notes.push("relay.mode: the kernel relay is not loaded; it can only be loaded at start".to_string());
        }
        // A window past what the host lets the relay give: said at start-up for the windows
        // then, and here for the reload's (one it raised, above all).
        if s.kernel.is_some()
            && let Some(m) = relay::host_limit_message(relay::SendLimits::host(), new.kernel_relay_windows())
        {
            notes.push(m);
        }
        let set = lock::lock(&s.listeners).clone();
        let added = match &set {
            Some(set) => set.bind_new(&new.listeners()).map_err(|problems| {
                s.metrics.reload(false);
                config::ConfigError {
                    source_name: "(reload)".into(),
                    problems,
                }
            })?,
            None => Vec::new(),
        };
        s.install(new);
        if let Some(set) = set {
            set.reconcile(added, &self.shared);
        }
        s.resolve_now.notify_one();
        s.metrics.reload(true);
        Ok(notes)
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
            Ok(c) => self.apply(c),
            Err(e) => {
                self.shared.metrics.reload(false);
                Err(e)
            }
        }
    }

    /// True while the listeners accept connections.
    pub fn accepting(&self) -> bool {
        self.shared.accepting.load(Ordering::SeqCst)
    }

    /// The addresses listened on now (after binding: a configured port 0 shows the port the
    /// kernel chose).
    pub fn listening(&self) -> Vec<(SocketAddr, SocketAddr)> {
        lock::lock(&self.shared.listeners)
            .as_ref()
            .map(|s| s.addresses())
            .unwrap_or_default()
    }

    /// The Prometheus text exposition of the proxy's metrics.
    pub fn metrics_text(&self) -> String {
        if let Some(k) = &self.shared.kernel {
            // Read when asked: entries left behind by a pair would show here.
            let (sockets, index, slots) = k.map_entry_counts();
            self.shared.metrics.kernel_map_entries([sockets, index, slots]);
            self.shared.metrics.kernel_parked(k.watch().parked());
        }
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

    /// Entries in the kernel relay's socket map and index, and slots held; `None` without the
    /// kernel relay. All zero when no connection is relayed in the kernel.
    pub fn kernel_map_entries(&self) -> Option<(usize, usize, usize)> {
        self.shared.kernel.as_ref().map(|k| k.map_entry_counts())
    }

    /// Kernel-relayed connections parked now (`relay.park_after`); `None` without the kernel
    /// relay.
    pub fn kernel_parked(&self) -> Option<usize> {
        self.shared.kernel.as_ref().map(|k| k.watch().parked())
    }
}

/// Where the kernel relay comes from.
enum Kernel {
    /// Loaded by this process (unless every service relays in userspace).
    Load,
    /// A predecessor's, from its maps' descriptors.
    Adopt(Vec<std::os::fd::OwnedFd>),
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
/// the runtime is rebuilt from it (from the configuration in force then, so that a reload
/// meanwhile is not undone).
async fn resolve_upstreams(shared: &Shared) {
    let names = {
        let rt = shared.runtime.load();
        let mut names: Vec<resolve::Name> = rt
            .config
            .services
            .iter()
            .flat_map(|s| resolve::names(&s.upstreams.entries))
            .collect();
        names.sort();
        names.dedup();
        names
    };
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
    let candidates: usize = now.values().map(Vec::len).sum();
    *lock::lock(&shared.resolved) = now;
    shared.reinstall(|_| true);
    tracing::info!(candidates, "upstream names resolved to new addresses");
}

/// Resolves the upstream names every `upstreams.resolve_interval` (the shortest any service
/// sets), and at once after a reload.
async fn resolve_loop(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let interval = shared
            .runtime
            .load()
            .config
            .services
            .iter()
            .map(|s| s.upstreams.resolve_interval)
            .min()
            .unwrap_or(std::time::Duration::from_secs(30));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = shared.resolve_now.notified() => {}
        }
        resolve_upstreams(&shared).await;
    }
}

/// How often certificate and key files are looked at for a change.
const CERTIFICATE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);
/// How often a certificate close to its notAfter is logged again.
const EXPIRY_REMINDER: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Watches the certificate and key files of the services with TLS: a change (time, size or
/// inode: a rename into place too) reloads them; and keeps the expiry gauges current, warning
/// of a certificate under its service's `tls.expiry_warning` (at the first look, after a
/// reload, then daily).
async fn certificate_loop(shared: Arc<Shared>, stop: CancellationToken) {
    use std::os::unix::fs::MetadataExt;
    let stamp = |p: &std::path::Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.mtime(), m.mtime_nsec(), m.len(), m.ino()))
    };
    let mut seen = HashMap::new();
    let mut warned: HashMap<(String, std::time::SystemTime), std::time::Instant> = HashMap::new();
    loop {
        let rt = shared.runtime.load_full();
        let mut changed = false;
        for s in &rt.config.services {
            let Some(t) = &s.tls else { continue };
            for path in [&t.certificate, &t.key] {
                let now = stamp(path);
                if seen.insert(path.clone(), now).is_some_and(|before| before != now) {
                    changed = true;
                }
            }
            let left = seconds_until(t.not_after);
            shared.metrics.certificate_expiry(&s.name, left);
            if left < t.expiry_warning.as_secs() as i64 {
                let key = (s.name.clone(), t.not_after);
                if warned.get(&key).is_none_or(|at| at.elapsed() >= EXPIRY_REMINDER) {
                    tracing::warn!(
                        service = %s.name, certificate = %t.certificate.display(), seconds_left = left,
                        "certificate expires soon (or has expired): renew it"
                    );
                    warned.insert(key, std::time::Instant::now());
                }
            }
        }
        drop(rt);
        if changed {
            shared.reload_certificates();
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(CERTIFICATE_CHECK) => {}
        }
    }
}

/// Seconds from now until `t` (negative once past).
fn seconds_until(t: std::time::SystemTime) -> i64 {
    match t.duration_since(std::time::SystemTime::now()) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn upstream_addresses(s: &config::Service) -> Vec<SocketAddr> {
    s.upstreams
        .main
        .iter()
        .chain(&s.upstreams.backup)
        .map(|s| s.address)
        .collect()
}

/// Serves `listener` with `config` until `shutdown` completes; then stops accepting, closes the
/// connections still open and returns.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Server::new(config)?.serve(listener, shutdown).await;
    Ok(())
}

/// Loads the kernel relay unless every service asks for the userspace relay only, and logs the
/// one line operators look for. When a service's mode is `kernel`, a relay that cannot load is
/// fatal; in `auto` mode the userspace relay carries every connection instead.
fn load_kernel_relay((wanted, required): (bool, bool)) -> anyhow::Result<Option<ebpf::KernelPrograms>> {
    if !wanted {
        tracing::info!("kernel relay: not used (relay.mode = \"userspace\")");
        return Ok(None);
    }
    match ebpf::KernelPrograms::load() {
        Ok(k) => {
            tracing::info!("kernel relay: available");
            Ok(Some(k))
        }
        Err(e) if required => {
            tracing::error!("kernel relay: unavailable ({e:#})");
            anyhow::bail!("kernel relay unavailable and relay.mode = \"kernel\": {e:#}")
        }
        Err(e) => {
            tracing::warn!("kernel relay: unavailable ({e:#})");
            Ok(None)
        }
    }
}
