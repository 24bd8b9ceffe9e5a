//! What the three binaries share around their library's `run`: logging, shutdown signals, error
//! reports and exit codes, and for `ptth_server` and `ptth_proxy`, the key commands and where
//! the key comes from (`key_file`, `PTTH_KEY` or `--key-fd`).

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

/// The signals a program acts on, as they come (see [`Signal`]). Reloads asked for faster
/// than they are done fold into one; the drain is never lost behind them.
#[derive(Debug)]
pub struct Signals {
    /// Set once, at the first SIGTERM or SIGINT.
    drain: tokio::sync::watch::Receiver<bool>,
    /// Whether [`Signal::Drain`] has been returned.
    drained: bool,
    /// A permit per pending SIGHUP (at most one is kept).
    reload: std::sync::Arc<tokio::sync::Notify>,
}

/// Installs the signal handlers (before this returns, so that a signal sent as soon as the
/// program reports that it is ready is handled, never fatal) and returns the signals to act
/// on. A second SIGTERM or SIGINT exits the process at once, with code 130, whatever the
/// program is doing.
///
/// The task that watches the signals is the one task of a program that no task tracker holds:
/// it must outlive the program's own shutdown, to exit at once on the second signal.
pub fn signals() -> Signals {
    use tokio::signal::unix::{SignalKind, signal};
    let (drain_tx, drain) = tokio::sync::watch::channel(false);
    let reload = std::sync::Arc::new(tokio::sync::Notify::new());
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    let hup = signal(SignalKind::hangup());
    match (term, int, hup) {
        (Ok(mut term), Ok(mut int), Ok(mut hup)) => {
            let reload = reload.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                        _ = hup.recv() => {
                            reload.notify_one();
                            continue;
                        }
                    }
                    if *drain_tx.borrow() {
                        std::process::exit(130);
                    }
                    drain_tx.send_replace(true);
                }
            });
        }
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            tracing::warn!(error = %e, "cannot install signal handlers; stop with SIGKILL");
        }
    }
    Signals {
        drain,
        drained: false,
        reload,
    }
}

impl Signals {
    /// The next signal: the drain first if it has come; never resolves if the handlers could
    /// not be installed.
    pub async fn next(&mut self) -> Signal {
        loop {
            if !self.drained && *self.drain.borrow_and_update() {
                self.drained = true;
                return Signal::Drain;
            }
            tokio::select! {
                biased;
                changed = self.drain.changed(), if !self.drained => {
                    if changed.is_err() {
                        // The watcher is gone: no drain will come.
                        self.drained = true;
                    }
                }
                () = self.reload.notified() => return Signal::Reload,
            }
        }
    }
}

/// Runs a program's reloads off the tasks that serve (a reload reads a file), one at a time,
/// so that the file read last is the one left in force.
#[derive(Debug, Clone, Default)]
pub struct Reloads(std::sync::Arc<parking_lot::Mutex<()>>);

impl Reloads {
    /// Runs `reload` on a blocking thread once the reloads before it are done.
    pub fn spawn(&self, reload: impl FnOnce() + Send + 'static) {
        let one = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let _one = one.lock();
            reload();
        });
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

/// The environment variable that may hold the private key of `ptth_server` or `ptth_proxy`:
/// the text of its PKCS#8 PEM file. It is read by [`EndpointArgs::load_key`], not by `clap`, so
/// that there is no flag to put a secret on the command line and no help text to show it in.
pub const KEY_ENV: &str = "PTTH_KEY";

/// The command line that `ptth_server` and `ptth_proxy` share (flattened into each one's own
/// arguments, which add the help text): a configuration file, or a key command. Each flag can
/// also be set through the environment variable that its help names.
#[derive(Debug, clap::Args)]
pub struct EndpointArgs {
    /// Path to the configuration file.
    #[arg(long, short, env = "PTTH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log level or filter (e.g. `debug`); default: RUST_LOG, else info.
    #[arg(long, env = "PTTH_LOG")]
    pub log_level: Option<String>,
    /// Read the private key (PKCS#8 PEM) from this inherited file descriptor instead of
    /// key_file. Or PTTH_KEY may hold the PEM text itself. Give the key one way only.
    #[arg(long, env = "PTTH_KEY_FD", value_name = "FD")]
    pub key_fd: Option<u32>,
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

    /// Loads the private key from the one source given: `key_file` (from the configuration
    /// file `config`, resolved), the PEM text in [`KEY_ENV`], or the file descriptor of
    /// `--key-fd`. None, or more than one, is an error that names them. No error ever holds
    /// the key's text.
    ///
    /// `PTTH_KEY` stays in the process's environment: removing it needs `unsafe` (edition
    /// 2024), which this workspace forbids.
    pub fn load_key(
        &self,
        config: &Path,
        key_file: Option<&Path>,
    ) -> Result<PrivateKey, KeySourceError> {
        load_key(config, key_file, std::env::var_os(KEY_ENV), self.key_fd)
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

/// Where the private key of `ptth_server` or `ptth_proxy` comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `key_file` in a configuration file.
    File {
        /// The configuration file.
        config: PathBuf,
        /// The key file it names, resolved.
        key_file: PathBuf,
    },
    /// The PEM text in [`KEY_ENV`].
    Env,
    /// The PEM text read from an inherited file descriptor (`--key-fd`, `PTTH_KEY_FD`).
    Fd(u32),
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File { config, .. } => write!(f, "key_file in {}", config.display()),
            Self::Env => f.write_str(KEY_ENV),
            Self::Fd(fd) => write!(f, "file descriptor {fd} (--key-fd or PTTH_KEY_FD)"),
        }
    }
}

/// Why [`EndpointArgs::load_key`] found no key. None of these ever holds the key's text.
#[derive(Debug, thiserror::Error)]
pub enum KeySourceError {
    /// No source was given.
    #[error(
        "no private key: set key_file in {}, or give the key in {KEY_ENV} or --key-fd \
         (PTTH_KEY_FD)",
        config.display()
    )]
    Missing {
        /// The configuration file without `key_file`.
        config: PathBuf,
    },
    /// More than one source was given.
    #[error("the private key is given more than once, in {}: give only one", and_list(.0))]
    Ambiguous(Vec<KeySource>),
    /// The source could not be read, or did not hold a key.
    #[error("{from}")]
    Load {
        /// The source.
        from: KeySource,
        /// Why it failed.
        #[source]
        error: KeyError,
    },
    /// [`KEY_ENV`] does not hold the text of a key.
    #[error("{KEY_ENV}: not a PKCS#8 PEM ed25519 private key ({0})")]
    Env(String),
}

/// `a`, `a and b`, `a, b and c`.
fn and_list(items: &[KeySource]) -> String {
    let names: Vec<String> = items.iter().map(ToString::to_string).collect();
    match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// [`EndpointArgs::load_key`], with the value of [`KEY_ENV`] (`env_key`) given rather than
/// read, so that tests need not change the environment. An empty `PTTH_KEY` counts as unset,
/// as `PTTH_KEY=` is how an orchestrator often passes an unset value.
fn load_key(
    config: &Path,
    key_file: Option<&Path>,
    env_key: Option<std::ffi::OsString>,
    key_fd: Option<u32>,
) -> Result<PrivateKey, KeySourceError> {
    let env_key = env_key.filter(|v| !v.is_empty());
    let mut given = Vec::new();
    if let Some(key_file) = key_file {
        given.push(KeySource::File {
            config: config.to_owned(),
            key_file: key_file.to_owned(),
        });
    }
    if env_key.is_some() {
        given.push(KeySource::Env);
    }
    if let Some(fd) = key_fd {
        given.push(KeySource::Fd(fd));
    }
    let from = match given.as_slice() {
        [] => {
            return Err(KeySourceError::Missing {
                config: config.to_owned(),
            });
        }
        [one] => one.clone(),
        _ => return Err(KeySourceError::Ambiguous(given)),
    };
    let loaded = match &from {
        KeySource::File { key_file, .. } => PrivateKey::load(key_file),
        KeySource::Fd(fd) => PrivateKey::read_fd(*fd),
        KeySource::Env => {
            let text = env_key
                .as_deref()
                .and_then(std::ffi::OsStr::to_str)
                .ok_or_else(|| KeySourceError::Env("not UTF-8".into()))?;
            return PrivateKey::from_pem(text).map_err(KeySourceError::Env);
        }
    };
    loaded.map_err(|error| KeySourceError::Load { from, error })
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

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStringExt;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A fresh key: the key, its PEM text, and a file holding it (mode 0600) in `dir`.
    fn key_in(dir: &Path) -> (PrivateKey, String, PathBuf) {
        let key = PrivateKey::generate().expect("generate");
        let path = dir.join("k.pem");
        key.write_new(&path).expect("write");
        let pem = std::fs::read_to_string(&path).expect("read");
        (key, pem, path)
    }

    /// The base64 lines of a PEM text: what must never be shown.
    fn secret_lines(pem: &str) -> Vec<&str> {
        let lines: Vec<&str> = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!lines.is_empty(), "{pem}");
        lines
    }

    /// Display (with causes) and Debug of `err` show none of the lines of `pem`.
    fn shows_no_secret(err: &KeySourceError, pem: &str) {
        let mut shown = format!("{err:?}");
        let mut cause: Option<&dyn std::error::Error> = Some(err);
        while let Some(e) = cause {
            shown.push_str(&e.to_string());
            cause = e.source();
        }
        for line in secret_lines(pem) {
            assert!(!shown.contains(line), "{shown} shows {line}");
        }
    }

    #[test]
    fn the_key_comes_from_the_one_source_given() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (key, pem, path) = key_in(dir.path());
        let config = Path::new("/etc/ptth/server.toml");
        let public = |k: PrivateKey| k.public();

        let from_file = load_key(config, Some(&path), None, None).expect("key_file");
        assert_eq!(public(from_file), key.public());
        let from_env = load_key(config, None, Some(pem.clone().into()), None).expect("PTTH_KEY");
        assert_eq!(public(from_env), key.public());
        let file = std::fs::File::open(&path).expect("open");
        let fd = u32::try_from(file.as_raw_fd()).expect("fd");
        let from_fd = load_key(config, None, None, Some(fd)).expect("fd");
        assert_eq!(public(from_fd), key.public());
        // An empty PTTH_KEY counts as unset.
        let from_file = load_key(config, Some(&path), Some("".into()), None).expect("empty env");
        assert_eq!(public(from_file), key.public());
    }

    #[test]
    fn no_source_or_more_than_one_is_refused_by_name() {
        let config = Path::new("/etc/ptth/server.toml");
        let file = Some(Path::new("/etc/ptth/db.key"));
        let pem = || Some(std::ffi::OsString::from("-----BEGIN PRIVATE KEY-----\n"));
        let msg = |r: Result<PrivateKey, KeySourceError>| r.expect_err("refused").to_string();
        assert_eq!(
            msg(load_key(config, None, None, None)),
            "no private key: set key_file in /etc/ptth/server.toml, or give the key in PTTH_KEY \
             or --key-fd (PTTH_KEY_FD)"
        );
        assert_eq!(
            msg(load_key(config, None, Some("".into()), None)),
            msg(load_key(config, None, None, None)),
            "an empty PTTH_KEY counts as unset"
        );
        assert_eq!(
            msg(load_key(config, file, pem(), None)),
            "the private key is given more than once, in key_file in /etc/ptth/server.toml and \
             PTTH_KEY: give only one"
        );
        assert_eq!(
            msg(load_key(config, None, pem(), Some(3))),
            "the private key is given more than once, in PTTH_KEY and file descriptor 3 \
             (--key-fd or PTTH_KEY_FD): give only one"
        );
        assert_eq!(
            msg(load_key(config, file, pem(), Some(3))),
            "the private key is given more than once, in key_file in /etc/ptth/server.toml, \
             PTTH_KEY and file descriptor 3 (--key-fd or PTTH_KEY_FD): give only one"
        );
    }

    #[test]
    fn a_bad_key_in_the_environment_is_refused_without_showing_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, pem, _) = key_in(dir.path());
        let config = Path::new("s.toml");
        // Cut short, with another label, or as the bare base64 without the PEM lines.
        let body = secret_lines(&pem).concat();
        let half = &pem[..pem.len() / 2];
        let relabelled = pem.replace("PRIVATE KEY", "EC PRIVATE KEY");
        for bad in [half, relabelled.as_str(), body.as_str()] {
            let err = load_key(config, None, Some(bad.into()), None).expect_err(bad);
            assert!(
                err.to_string()
                    .starts_with("PTTH_KEY: not a PKCS#8 PEM ed25519 private key ("),
                "{err}"
            );
            shows_no_secret(&err, &pem);
        }
        let not_utf8 = std::ffi::OsString::from_vec(vec![0xff, 0xfe]);
        let err = load_key(config, None, Some(not_utf8), None).expect_err("not UTF-8");
        assert_eq!(
            err.to_string(),
            "PTTH_KEY: not a PKCS#8 PEM ed25519 private key (not UTF-8)"
        );
    }

    #[test]
    fn a_key_file_or_descriptor_that_fails_is_named_without_showing_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, pem, path) = key_in(dir.path());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load_key(Path::new("s.toml"), Some(&path), None, None).expect_err("0644");
        assert_eq!(err.to_string(), "key_file in s.toml");
        shows_no_secret(&err, &pem);

        // A descriptor that is not open.
        let err = load_key(Path::new("s.toml"), None, None, Some(999_999)).expect_err("closed");
        assert_eq!(
            err.to_string(),
            "file descriptor 999999 (--key-fd or PTTH_KEY_FD)"
        );
        let cause = std::error::Error::source(&err).expect("cause").to_string();
        assert_eq!(
            cause,
            "/proc/self/fd/999999: No such file or directory (os error 2)"
        );
    }
}
