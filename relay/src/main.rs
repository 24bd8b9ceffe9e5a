//! The `ptth_relay` binary: reads the configuration, binds the listener and calls
//! [`ptth_relay::run`].

use std::future::IntoFuture;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ptth_common::cli::Signal;
use ptth_common::config::RelayConfig;
use ptth_relay::RelayError;
use tokio_util::sync::CancellationToken;

/// PTTH relay: pairs ptth_proxy clients with ptth_server servers over streaming HTTP.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example relay.toml:\n\n  listen = \"127.0.0.1:4000\"\n\n  [[servers]]\n  name = \"db\"\n  public_key = \"<base64 from `ptth_server keygen`>\"\n\n  [[clients]]\n  name = \"alice\"\n  public_key = \"<base64 from `ptth_proxy keygen`>\"\n  allow = [\"db/postgres\", \"web/*\"]\n\nRun: ptth_relay --config relay.toml\nSee docs/configuration.md for every setting."
)]
struct Args {
    /// Path to relay.toml.
    #[arg(long, short, env = "PTTH_CONFIG")]
    config: PathBuf,
    /// Log level or filter (e.g. `debug`, `ptth_relay=debug`); default: RUST_LOG, else info.
    #[arg(long, env = "PTTH_LOG")]
    log_level: Option<String>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ptth_common::cli::exit_code(run(Args::parse()).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    ptth_common::cli::init_logging(args.log_level.as_deref()).map_err(anyhow::Error::msg)?;
    ptth_common::cli::raise_open_files_limit();
    let config = RelayConfig::load(&args.config)?;
    let listener = ptth_common::cli::listen(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin = ptth_common::cli::admin_listener(config.admin_listen)?;
    let signals = ptth_common::cli::signals();
    let shutdown = CancellationToken::new();
    let mut relay = ptth_relay::run(listener, config, shutdown).map_err(|e| match e {
        RelayError::Tls(_) => {
            anyhow::Error::new(e).context(format!("TLS settings in {}", args.config.display()))
        }
        e => e.into(),
    })?;
    if let Some(admin) = admin {
        relay = relay.with_admin(admin);
    }
    let control = relay.control();
    let reloads = ptth_common::cli::Reloads::default();
    ptth_common::cli::serve_with_signals(relay.into_future(), signals, |signal| match signal {
        Signal::Drain => {
            let control = control.clone();
            tokio::spawn(async move { control.drain().await });
        }
        Signal::Reload => {
            let (control, path) = (control.clone(), args.config.clone());
            reloads.spawn(move || control.reload_from(&path));
        }
    })
    .await;
    Ok(())
}
