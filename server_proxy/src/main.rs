//! The `ptth_server` binary: the key commands, or reads the configuration and key and calls
//! [`ptth_server::run`].

use std::future::IntoFuture;

use clap::Parser;
use ptth_common::cli::{self, EndpointArgs, Signal};
use ptth_common::config::ServerConfig;
use tokio_util::sync::CancellationToken;

/// PTTH server proxy: offers local TCP services through a ptth_relay, dialing out only.
#[derive(Debug, Parser)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Example server.toml:\n\n  relay_url = \"https://relay.example.com\"\n  name = \"db\"\n  key_file = \"db.key\"      # relative to this file\n\n  [ports]\n  postgres = \"127.0.0.1:5432\"\n\nFirst: ptth_server keygen --out db.key   (prints the public key for relay.toml)\nRun:   ptth_server --config server.toml\nSee docs/configuration.md for every setting."
)]
struct Args {
    #[command(flatten)]
    endpoint: EndpointArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    cli::exit_code(run(Args::parse()).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let Some(config_path) = args.endpoint.start()? else {
        return Ok(());
    };
    let config = ServerConfig::load(config_path)?;
    let key = args
        .endpoint
        .load_key(config_path, config.key_file.as_deref())?;
    let admin = cli::admin_listener(config.admin_listen)?;
    let signals = cli::signals();
    let mut server = ptth_server::run(config, key, CancellationToken::new())?;
    if let Some(admin) = admin {
        server = server.with_admin(admin);
    }
    let control = server.control();
    let reloads = cli::Reloads::default();
    cli::serve_with_signals(server.into_future(), signals, |signal| match signal {
        Signal::Drain => {
            let control = control.clone();
            tokio::spawn(async move { control.drain().await });
        }
        Signal::Reload => {
            let (control, path) = (control.clone(), config_path.to_owned());
            reloads.spawn(move || control.reload_from(&path));
        }
    })
    .await;
    Ok(())
}
