//! `kiln serve`: personalised images over HTTP (kiln-serve).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};

use super::Outcome;

#[derive(Args)]
pub struct ServeArgs {
    /// The configuration file (see examples/serve.toml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Listen on this address instead of the config's `listen`.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// How log lines on stderr look: `text` (coloured only when stderr is a terminal and
    /// NO_COLOR is unset or empty) or `json` (one object per line).
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// The old spelling of `--log-format json`.
    #[arg(long, hide = true)]
    pub log_json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Colour only for a person at a terminal: a redirected log gets no escape codes, and a set,
/// non-empty NO_COLOR (no-color.org) turns colour off everywhere.
fn use_colour() -> bool {
    use std::io::IsTerminal;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

pub fn run(args: ServeArgs) -> Outcome {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(use_colour());
    if args.log_json || args.log_format == LogFormat::Json {
        sub.json().init();
    } else {
        sub.init();
    }
    let config = kiln_serve::Config::load(&args.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let server = kiln_serve::start(&config, args.listen).await?;
        // Tests and scripts read this line to find the port.
        println!("listening on http://{}", server.running.addr);
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate() => {}
        }
        let grace = config.limits.shutdown_grace.0;
        tracing::info!(
            ?grace,
            "shutting down: no new connections, running downloads may finish"
        );
        // A second signal ends the wait at once.
        let dropped = tokio::select! {
            n = server.shutdown() => n,
            _ = tokio::signal::ctrl_c() => 0,
            _ = terminate() => 0,
        };
        tracing::info!(dropped, "stopped");
        anyhow::Ok(())
    })?;
    Ok(std::process::ExitCode::SUCCESS)
}

async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}
