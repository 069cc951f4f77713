//! wsproxy: a reverse WebSocket proxy. It performs the HTTP/1.1 Upgrade handshake itself (per-client
//! limits, upstream choice by client IP with failover, forwarding headers), then relays the
//! payload untouched until either side closes.
//!
//! [`run`] serves one listener until a shutdown future completes; the binary and the tests both
//! call it. One concern per module; `connection` follows one connection through them.

pub mod balance;
pub mod config;
mod connection;
pub mod ebpf;
pub mod echo;
pub mod handshake;
pub mod head;
pub mod headers;
pub mod limits;
pub mod listener;
pub mod relay;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;

/// What every connection task reads.
pub(crate) struct Shared {
    pub config: Config,
    /// The kernel relay's programs, when the configured mode wants them and they loaded.
    pub kernel: Option<ebpf::KernelPrograms>,
    pub limiter: Arc<limits::Limiter>,
    pub balancer: balance::Balancer,
    pub totals: relay::Totals,
}

/// A configured proxy, ready to serve listeners. Tests keep it to look at its state.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// Prepares a proxy for `config`: loads the kernel relay unless the mode is `userspace`.
    pub fn new(config: Config) -> anyhow::Result<Server> {
        let kernel = load_kernel_relay(config.relay.mode)?;
        let shared = Shared {
            kernel,
            limiter: limits::Limiter::new(config.limits.clone()),
            balancer: balance::Balancer::new(&config.upstreams),
            totals: relay::Totals::default(),
            config,
        };
        Ok(Server { shared: Arc::new(shared) })
    }

    /// Serves `listener` until `shutdown` completes; then stops accepting, closes the
    /// connections still open and returns.
    pub async fn serve(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(listen = %addr, "accepting connections");
        }
        listener::accept_loop(listener, Arc::clone(&self.shared), shutdown).await;
    }

    /// True when the kernel relay is loaded and will carry connections.
    pub fn kernel_relay(&self) -> bool {
        self.shared.kernel.is_some()
    }

    /// Relay totals so far.
    pub fn totals(&self) -> relay::TotalsSnapshot {
        self.shared.totals.snapshot()
    }

    /// Entries in the kernel relay's (socket, state, credit) maps; `None` without the kernel
    /// relay. All zero when no connection is relayed in the kernel.
    pub fn kernel_map_entries(&self) -> Option<(usize, usize, usize)> {
        self.shared.kernel.as_ref().map(|k| k.map_entry_counts())
    }
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
