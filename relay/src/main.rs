//! The `ptth_relay` binary: see the library for the server itself.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ptth_common::config::RelayConfig;

/// PTTH relay: pairs ptth_proxy clients with ptth_server servers over streaming HTTP.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example relay.toml:\n\n  listen = \"127.0.0.1:4000\"\n\n  [[servers]]\n  name = \"db\"\n  public_key = \"<base64 from `ptth_server keygen`>\"\n\n  [[clients]]\n  name = \"alice\"\n  public_key = \"<base64 from `ptth_proxy keygen`>\"\n  allow = [\"db/postgres\", \"web/*\"]\n\nRun: ptth_relay --config relay.toml\nSee docs/configuration.md for every setting."
)]
struct Args {
    /// Path to relay.toml.
    #[arg(long, short)]
    config: PathBuf,
    /// Log level or filter (e.g. `debug`, `ptth_relay=debug`); default: RUST_LOG, else info.
    #[arg(long)]
    log_level: Option<String>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => ptth_common::cli::report(e.as_ref()),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    ptth_common::cli::init_logging(args.log_level.as_deref()).map_err(anyhow::Error::msg)?;
    let config = RelayConfig::load(&args.config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let shutdown = ptth_common::cli::shutdown_on_signals();
    let relay = ptth_relay::Relay::new(config, shutdown)
        .with_context(|| format!("TLS settings in {}", args.config.display()))?;
    relay.serve(listener).await?;
    Ok(())
}
