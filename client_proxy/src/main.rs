//! The `ptth_proxy` binary: the key commands, or reads the configuration and key, binds one
//! listener per forward and calls [`ptth_proxy::run`].

use std::future::IntoFuture;

use anyhow::Context;
use clap::Parser;
use ptth_common::cli::{self, EndpointArgs, Signal};
use ptth_common::config::ProxyConfig;
use tokio_util::sync::CancellationToken;

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
    let admin = cli::admin_listener(config.admin_listen)?;
    let signals = cli::signals();
    let mut proxy = ptth_proxy::run(listeners, config, key, CancellationToken::new())?;
    if let Some(admin) = admin {
        proxy = proxy.with_admin(admin);
    }
    let control = proxy.control();
    cli::serve_with_signals(proxy.into_future(), signals, |signal| match signal {
        Signal::Drain => {
            let control = control.clone();
            tokio::spawn(async move { control.drain().await });
        }
        Signal::Reload => {
            tracing::info!(
                "ptth_proxy reloads nothing on SIGHUP: restart it to apply a changed configuration"
            );
        }
    })
    .await;
    Ok(())
}
