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
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: Config,
    pub limiter: Arc<limits::Limiter>,
    pub balancer: balance::Balancer,
}

/// Serves `listener` with `config` until `shutdown` completes; then stops accepting, closes the
/// connections still open and returns.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let shared = Arc::new(Shared {
        limiter: limits::Limiter::new(config.limits.clone()),
        balancer: balance::Balancer::new(&config.upstreams),
        config,
    });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listen = %addr, "accepting connections");
    }
    listener::accept_loop(listener, shared, shutdown).await;
    Ok(())
}
