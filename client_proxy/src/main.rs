//! The `ptth_proxy` binary: the key commands, or reads the configuration and key, binds one
//! listener per forward and calls [`ptth_proxy::run`].

use anyhow::Context;
use clap::Parser;
use ptth_common::cli::{self, EndpointArgs};
use ptth_common::config::ProxyConfig;

/// PTTH client proxy: binds local ports and forwards each connection through a ptth_relay.
#[derive(Debug, Parser)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Example proxy.toml:\n\n  relay_url = \"https://relay.example.com\"\n  key_file = \"alice.key\"   # relative to this file\n\n  [[forwards]]\n  listen = \"127.0.0.1:6432\"\n  server = \"db\"\n  port = \"postgres\"\n\nFirst: ptth_proxy keygen --out alice.key   (prints the public key for relay.toml)\nRun:   ptth_proxy --config proxy.toml, then: psql -h 127.0.0.1 -p 6432\nSee docs/configuration.md for every setting."
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
    let config = ProxyConfig::load(config_path)?;
    let key = args
        .endpoint
        .load_key(config_path, config.key_file.as_deref())?;
    let mut listeners = Vec::new();
    for fwd in &config.forwards {
        let l =
            cli::listen(fwd.listen).with_context(|| format!("cannot listen on {}", fwd.listen))?;
        listeners.push(l);
    }
    ptth_proxy::run(listeners, config, key, cli::shutdown_on_signals())?.await;
    Ok(())
}
