//! kiln-serve: personalised downloads over HTTP, streamed from an immutable base plus patches.
//!
//! A request for `/os/{image}/{piece}.img` fetches the piece (uploads, a local directory or an
//! upstream URL), plans its injection into the image's slot, and streams "base + patches" with
//! Range, ETag and a chunked digest; nothing is copied and nothing is buffered whole. See
//! [`http`] for the routes and [`config`] for `serve.toml`.

#![forbid(unsafe_code)]

pub mod catalog;
pub mod config;
pub mod error;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod page;
pub mod pieces;
pub mod server;
pub mod state;

use std::net::SocketAddr;

pub use config::Config;
pub use server::Running;
pub use state::AppState;

/// Loads the catalog and starts serving on `listen` (or the config's address).
pub async fn start(config: &Config, listen: Option<SocketAddr>) -> anyhow::Result<Running> {
    let state = AppState::new(config).await?;
    let l = &config.limits;
    let addr = listen.unwrap_or(config.listen);
    let running = server::serve(
        http::router(state),
        addr,
        l.connections,
        l.header_timeout.0,
        l.write_timeout.0,
    )
    .await
    .map_err(|e| anyhow::anyhow!("listening on {addr}: {e}"))?;
    Ok(running)
}
