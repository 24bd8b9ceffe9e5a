//! The `ptth_server` binary: the key commands, or reads the configuration and key and calls
//! [`ptth_server::run`].

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ptth_common::cli::KeyCommand;
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
    let config = ServerConfig::load(&config_path)?;
    let key = PrivateKey::load(&config.key_file)
        .with_context(|| format!("key_file in {}", config_path.display()))?;
    let shutdown = ptth_common::cli::shutdown_on_signals();
    ptth_server::run(config, key, shutdown)?.await;
    Ok(())
}
