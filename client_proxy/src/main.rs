//! The `ptth_proxy` binary: the key commands, or reads the configuration and key, binds one
//! listener per forward and calls [`ptth_proxy::run`].

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ptth_common::cli::KeyCommand;
use ptth_common::config::ProxyConfig;
use ptth_common::keys::PrivateKey;

/// PTTH client proxy: binds local ports and forwards each connection through a ptth_relay.
#[derive(Debug, Parser)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Example proxy.toml:\n\n  relay_url = \"https://relay.example.com\"\n  key_file = \"alice.key\"   # relative to this file\n\n  [[forwards]]\n  listen = \"127.0.0.1:6432\"\n  server = \"db\"\n  port = \"postgres\"\n\nFirst: ptth_proxy keygen --out alice.key   (prints the public key for relay.toml)\nRun:   ptth_proxy --config proxy.toml, then: psql -h 127.0.0.1 -p 6432\nSee docs/configuration.md for every setting."
)]
struct Args {
    /// Path to proxy.toml.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Log level or filter (e.g. `debug`); default: RUST_LOG, else info.
    #[arg(long)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<KeyCommand>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ptth_common::cli::exit_code(run(Args::parse()).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(command) = &args.command {
        println!("{}", command.run()?);
        return Ok(());
    }
    let Some(config_path) = args.config else {
        anyhow::bail!("missing --config FILE (see --help)");
    };
    ptth_common::cli::init_logging(args.log_level.as_deref()).map_err(anyhow::Error::msg)?;
    let config = ProxyConfig::load(&config_path)?;
    let key = PrivateKey::load(&config.key_file)
        .with_context(|| format!("key_file in {}", config_path.display()))?;
    let mut listeners = Vec::new();
    for fwd in &config.forwards {
        let l = tokio::net::TcpListener::bind(fwd.listen)
            .await
            .with_context(|| format!("cannot listen on {}", fwd.listen))?;
        listeners.push(l);
    }
    let shutdown = ptth_common::cli::shutdown_on_signals();
    ptth_proxy::run(listeners, config, key, shutdown)?.await;
    Ok(())
}
