//! The `ptth_proxy` binary: see the library for the proxy itself.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
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
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a new private key (PKCS#8 PEM, mode 0600) and print its public key (base64).
    Keygen {
        /// The key file to create; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key (base64, as relay.toml wants it) of an existing private key file.
    Pubkey {
        /// The private key file (PKCS#8 PEM).
        #[arg(long)]
        key: PathBuf,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => ptth_common::cli::report(e.as_ref()),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    match &args.command {
        Some(Command::Keygen { out }) => {
            println!("{}", ptth_common::cli::keygen(out)?);
            return Ok(());
        }
        Some(Command::Pubkey { key }) => {
            println!("{}", PrivateKey::load(key)?.public());
            return Ok(());
        }
        None => {}
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
        let l = tokio::net::TcpListener::bind(*fwd.listen.get_ref())
            .await
            .with_context(|| format!("cannot listen on {}", fwd.listen.get_ref()))?;
        listeners.push((l, fwd.clone()));
    }
    let shutdown = ptth_common::cli::shutdown_on_signals();
    ptth_proxy::run(listeners, config, key, shutdown).await?;
    Ok(())
}
