//! Helpers for the binaries: logging setup and shutdown signals.

use tokio_util::sync::CancellationToken;

/// Sets up `tracing` output on stderr. `level` (from `--log-level`) wins; otherwise `RUST_LOG`
/// is honoured; otherwise `info`.
pub fn init_logging(level: Option<&str>) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("invalid log level {l:?}: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| e.to_string())
}

/// A token cancelled on the first SIGINT or SIGTERM. A second signal exits at once.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down (send the signal again to exit at once)");
        t.cancel();
        wait_for_signal().await;
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `keygen --out FILE`: writes a new private key (PKCS#8 PEM, mode 0600, never overwriting)
/// and returns the public key in base64 for the caller to print.
pub fn keygen(out: &std::path::Path) -> Result<String, crate::keys::KeyError> {
    let key = crate::keys::PrivateKey::generate()?;
    key.write_new(out)?;
    Ok(key.public().to_base64())
}
