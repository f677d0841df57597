//! kiln-serve: personalised downloads over HTTP, streamed from an immutable base plus patches.
//!
//! A request for `/os/{image}/{piece}.img` fetches the piece (uploads, a local directory or an
//! upstream URL), plans its injection into the image's slot, and streams "base + patches" with
//! Range, ETag and a chunked digest; nothing is copied and nothing is buffered whole. See
//! [`http`] for the routes and [`config`] for `serve.toml`.

#![forbid(unsafe_code)]

pub mod catalog;
pub mod config;
pub mod conn;
pub mod error;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod page;
pub mod pieces;
pub mod server;
pub mod state;
pub mod store;

use std::net::SocketAddr;

pub use config::Config;
pub use server::Running;
pub use state::AppState;

/// A started server and the state its handlers share.
pub struct Server {
    /// The accept loop.
    pub running: Running,
    /// The shared state.
    pub state: std::sync::Arc<AppState>,
}

impl Server {
    /// Graceful shutdown (see [`Running::shutdown`]) with the configured grace period;
    /// `/readyz` answers 503 from the start. Returns the number of connections dropped.
    pub async fn shutdown(self) -> u32 {
        self.state
            .ready
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let delay = self.state.limits.shutdown_delay.0;
        if !delay.is_zero() {
            tracing::info!(
                ?delay,
                "not ready; still accepting while load balancers notice"
            );
            tokio::time::sleep(delay).await;
        }
        let grace = self.state.limits.shutdown_grace.0;
        self.running.shutdown(grace).await
    }
}

/// Loads the catalog and starts serving on `listen` (or the config's address).
pub async fn start(config: &Config, listen: Option<SocketAddr>) -> anyhow::Result<Server> {
    let state = AppState::new(config).await?;
    let l = &config.limits;
    let addr = listen.unwrap_or(config.listen);
    let running = server::serve(
        http::router(state.clone()),
        addr,
        l.connections,
        l.header_timeout.0,
        l.write_timeout.0,
    )
    .await
    .map_err(|e| anyhow::anyhow!("listening on {addr}: {e}"))?;
    Ok(Server { running, state })
}
