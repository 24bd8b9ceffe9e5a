//! What the three binaries share around their library's `run`: logging, shutdown signals, error
//! reports and exit codes, and the key commands of `ptth_server` and `ptth_proxy`.

use std::path::{Path, PathBuf};

use crate::keys::{KeyError, PrivateKey};

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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| e.to_string())
}

/// A TCP listener on `addr` with a long accept queue (4,096, or the kernel's `somaxconn` if
/// that is less), so that a burst of new connections waits in the kernel instead of having its
/// SYNs dropped and retried a second later.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// The admin listener on `admin_listen`, if set.
pub fn admin_listener(
    admin_listen: Option<std::net::SocketAddr>,
) -> Result<Option<tokio::net::TcpListener>, AdminListenError> {
    admin_listen
        .map(|address| listen(address).map_err(|source| AdminListenError { address, source }))
        .transpose()
}

/// The admin listener's address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address} (admin_listen)")]
pub struct AdminListenError {
    address: std::net::SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Raises this process's soft limit on open files to its hard limit, as far as the OS allows
/// (every tunnel holds sockets), and logs the change.
pub fn raise_open_files_limit() {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft);
    match (before, rlimit::increase_nofile_limit(u64::MAX)) {
        (Ok(before), Ok(now)) if now > before => {
            tracing::info!(from = before, to = now, "raised the open files limit")
        }
        (_, Err(e)) | (Err(e), _) => {
            tracing::warn!(error = %e, "cannot raise the open files limit")
        }
        _ => {}
    }
}

/// What a signal asks of a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGHUP: read the configuration file again and apply what may change while running.
    Reload,
    /// The first SIGTERM or SIGINT: take no new work, give open tunnels `drain_grace` to end,
    /// then exit. (A second one exits at once, code 130.)
    Drain,
}

/// The signals a program acts on, as they come (see [`Signal`]).
#[derive(Debug)]
pub struct Signals(tokio::sync::mpsc::Receiver<Signal>);

/// Installs the signal handlers (before this returns, so that a signal sent as soon as the
/// program reports that it is ready is handled, never fatal) and returns the signals to act
/// on. A second SIGTERM or SIGINT exits the process at once, with code 130, whatever the
/// program is doing.
///
/// The task that watches the signals is the one task of a program that no task tracker holds:
/// it must outlive the program's own shutdown, to exit at once on the second signal.
pub fn signals() -> Signals {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    let hup = signal(SignalKind::hangup());
    match (term, int, hup) {
        (Ok(mut term), Ok(mut int), Ok(mut hup)) => {
            tokio::spawn(async move {
                let mut draining = false;
                loop {
                    let signal = tokio::select! {
                        _ = term.recv() => Signal::Drain,
                        _ = int.recv() => Signal::Drain,
                        _ = hup.recv() => Signal::Reload,
                    };
                    if signal == Signal::Drain {
                        if draining {
                            std::process::exit(130);
                        }
                        draining = true;
                    }
                    // Reloads asked for faster than they are done fold into one.
                    let _ = tx.try_send(signal);
                }
            });
        }
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            tracing::warn!(error = %e, "cannot install signal handlers; stop with SIGKILL");
        }
    }
    Signals(rx)
}

impl Signals {
    /// The next signal; never resolves if the handlers could not be installed.
    pub async fn next(&mut self) -> Signal {
        match self.0.recv().await {
            Some(signal) => signal,
            None => std::future::pending().await,
        }
    }
}

/// Awaits `serving` (a program's future) while acting on `signals`: `on_signal` is called for
/// each (it should start a drain without waiting for it, or reload). Returns when `serving`
/// ends.
pub async fn serve_with_signals<F>(
    serving: F,
    mut signals: Signals,
    mut on_signal: impl FnMut(Signal),
) where
    F: std::future::Future<Output = ()>,
{
    tokio::pin!(serving);
    loop {
        tokio::select! {
            () = &mut serving => return,
            signal = signals.next() => {
                if signal == Signal::Drain {
                    tracing::info!("draining (send the signal again to exit at once)");
                }
                on_signal(signal);
            }
        }
    }
}

/// The exit code of a binary whose `main` ended with `result`: success, or 1 after the error
/// is [reported](report).
pub fn exit_code<E>(result: Result<(), E>) -> std::process::ExitCode
where
    E: AsRef<dyn std::error::Error + 'static>,
{
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => report(e.as_ref()),
    }
}

/// Prints `error` and its causes on stderr, as Rust prints an error returned from `main` but
/// never with a backtrace (users often have `RUST_BACKTRACE` set), and returns exit code 1.
fn report(error: &(dyn std::error::Error + 'static)) -> std::process::ExitCode {
    let mut text = format!("Error: {error}");
    let causes: Vec<String> = std::iter::successors(error.source(), |e| e.source())
        .map(|e| e.to_string())
        .collect();
    match causes.as_slice() {
        [] => {}
        [one] => text.push_str(&format!("\n\nCaused by:\n    {one}")),
        many => {
            text.push_str("\n\nCaused by:");
            for (i, c) in many.iter().enumerate() {
                text.push_str(&format!("\n    {i}: {c}"));
            }
        }
    }
    eprintln!("{text}");
    std::process::ExitCode::FAILURE
}

/// The command line that `ptth_server` and `ptth_proxy` share (flattened into each one's own
/// arguments, which add the help text): a configuration file, or a key command.
#[derive(Debug, clap::Args)]
pub struct EndpointArgs {
    /// Path to the configuration file.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Log level or filter (e.g. `debug`); default: RUST_LOG, else info.
    #[arg(long)]
    pub log_level: Option<String>,
    /// A key command instead of running.
    #[command(subcommand)]
    pub command: Option<KeyCommand>,
}

impl EndpointArgs {
    /// Runs the key command if one was given, printing its line, and returns `None`. Otherwise
    /// sets up logging, raises the open files limit and returns the configuration file to run
    /// with.
    pub fn start(&self) -> Result<Option<&Path>, ArgsError> {
        if let Some(command) = &self.command {
            println!("{}", command.run()?);
            return Ok(None);
        }
        let config = self.config.as_deref().ok_or(ArgsError::MissingConfig)?;
        init_logging(self.log_level.as_deref()).map_err(ArgsError::Logging)?;
        raise_open_files_limit();
        Ok(Some(config))
    }
}

/// Why [`EndpointArgs::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// The key command failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Neither a key command nor `--config`.
    #[error("missing --config FILE (see --help)")]
    MissingConfig,
    /// The log filter is invalid.
    #[error("{0}")]
    Logging(String),
}

/// A `key_file` that could not be loaded, named with the configuration file that set it.
#[derive(Debug, thiserror::Error)]
#[error("key_file in {}", config.display())]
pub struct KeyFileError {
    config: PathBuf,
    #[source]
    source: KeyError,
}

/// Loads `key_file`, which the configuration file `config` names.
pub fn load_key(config: &Path, key_file: &Path) -> Result<PrivateKey, KeyFileError> {
    PrivateKey::load(key_file).map_err(|source| KeyFileError {
        config: config.to_owned(),
        source,
    })
}

/// The key subcommands of `ptth_server` and `ptth_proxy`.
#[derive(Debug, clap::Subcommand)]
pub enum KeyCommand {
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

impl KeyCommand {
    /// Runs the command and returns the line to print: the public key in base64.
    pub fn run(&self) -> Result<String, KeyError> {
        match self {
            Self::Keygen { out } => keygen(out),
            Self::Pubkey { key } => Ok(PrivateKey::load(key)?.public().to_base64()),
        }
    }
}

/// `keygen --out FILE`: writes a new private key (PKCS#8 PEM, mode 0600, never overwriting)
/// and returns the public key in base64 for the caller to print.
pub fn keygen(out: &std::path::Path) -> Result<String, KeyError> {
    let key = PrivateKey::generate()?;
    key.write_new(out)?;
    Ok(key.public().to_base64())
}
