//! The `ptth_server` binary: see the library for the proxy itself.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ptth_common::config::ServerConfig;
use ptth_common::keys::PrivateKey;

/// PTTH server proxy: offers local TCP services through a ptth_relay, dialing out only.
#[derive(Debug, Parser)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Example server.toml:\n\n  relay_url = \"https://relay.example.com\"\n  name = \"db\"\n  key_file = \"db.key\"      # relative to this file\n\n  [ports]\n  postgres = \"127.0.0.1:5432\"\n\nFirst: ptth_server keygen --out db.key   (prints the public key for relay.toml)\nRun:   ptth_server --config server.toml\nSee docs/configuration.md for every setting."
)]
struct Args {
    /// Path to server.toml.
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
    let config = ServerConfig::load(&config_path)?;
    let key = PrivateKey::load(&config.key_file)
        .with_context(|| format!("key_file in {}", config_path.display()))?;
    let shutdown = ptth_common::cli::shutdown_on_signals();
    ptth_server::run(config, key, shutdown).await?;
    Ok(())
}
