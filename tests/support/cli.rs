//! Helpers shared by the command-line tests of the `ptth_relay`, `ptth_server` and `ptth_proxy`
//! binaries (`relay/tests/cli.rs`, `server_proxy/tests/cli.rs`, `client_proxy/tests/cli.rs`).
//!
//! Not a test target of its own: each of those files includes it with
//!
//! ```ignore
//! #[path = "../../tests/support/cli.rs"]
//! mod support;
//! ```
//!
//! so it is compiled once per test crate, and `env!("CARGO_PKG_*")` here names the crate that
//! includes it. Helpers take the path of the binary under test (`env!("CARGO_BIN_EXE_...")`).
//! Items that not every including crate uses carry `#[allow(dead_code)]`.
//!
//! Every test runs the real binary on files in a fresh temporary folder; every wait is bounded
//! by [`LIMIT`].

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ptth_common::keys::PrivateKey;

/// Upper bound on every wait for a child process or one of its log lines.
pub const LIMIT: Duration = Duration::from_secs(10);

/// The environment variables the binaries read their settings from.
pub const SETTINGS_ENV: &[&str] = &["PTTH_CONFIG", "PTTH_LOG", "PTTH_KEY", "PTTH_KEY_FD"];

/// The binary `bin` with deterministic output: no backtraces on errors, no colours, no
/// inherited log filter or `PTTH_*` setting, and a working folder that is not the test's
/// (relative paths must resolve against the configuration file, not the working folder).
pub fn command(bin: &str) -> Command {
    let mut cmd = Command::new(bin);
    for var in SETTINGS_ENV {
        cmd.env_remove(var);
    }
    cmd.env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .current_dir("/")
        .stdin(Stdio::null());
    cmd
}

/// [`command`] with `--config config`.
pub fn config_command(bin: &str, config: &Path) -> Command {
    let mut cmd = command(bin);
    cmd.arg("--config").arg(config);
    cmd
}

/// Sends `signal` (a name such as `TERM`) to `pid` with kill(1).
fn kill(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd` to completion, killing it and failing if that takes longer than [`LIMIT`].
pub fn run(cmd: Command) -> Output {
    try_run(cmd).expect("spawn")
}

/// [`run`], but a program that cannot be started is an error rather than a failure.
pub fn try_run(mut cmd: Command) -> std::io::Result<Output> {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(out) => Ok(out.expect("wait for child")),
        Err(_) => {
            kill(pid, "KILL");
            panic!("{cmd:?} did not exit within {LIMIT:?}");
        }
    }
}

/// Runs `bin --config config` to completion.
pub fn run_config(bin: &str, config: &Path) -> Output {
    run(config_command(bin, config))
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).expect("stderr is UTF-8")
}

/// Asserts a failed run with nothing on stdout and returns its stderr.
pub fn failure(out: &Output) -> String {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected a failure, got {:?}; stderr:\n{err}",
        out.status
    );
    assert_eq!(stdout(out), "", "nothing on stdout when failing");
    err
}

/// Writes `text` to the file `name` in `dir` and returns its path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// `http://127.0.0.1:PORT` where nothing listens: the port was bound and released.
#[allow(dead_code)]
pub fn unreachable_relay_url() -> String {
    // Bound but never listening, for the whole test process: connections to it are refused,
    // and no other test can be given the port meanwhile.
    static CLOSED: std::sync::OnceLock<(socket2::Socket, u16)> = std::sync::OnceLock::new();
    let (_, port) = CLOSED.get_or_init(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
        s.bind(&any.into()).expect("bind");
        let port = s
            .local_addr()
            .expect("local addr")
            .as_socket()
            .expect("inet")
            .port();
        (s, port)
    });
    format!("http://127.0.0.1:{port}")
}

#[allow(dead_code)]
fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[allow(dead_code)]
fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// A long-running child whose stderr lines are read by a thread and handed over a channel.
pub struct Running {
    child: Option<Child>,
    pid: u32,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    pub fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let pid = child.id();
        let pipe = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child: Some(child),
            pid,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads stderr until a line contains `needle` (within [`LIMIT`]) and returns that line.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "no {needle:?} within {LIMIT:?}; stderr so far:\n{}",
                        self.log()
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("stderr ended before {needle:?}; stderr:\n{}", self.log())
                }
            }
        }
    }

    fn signal(&self, signal: &str) {
        assert!(kill(self.pid, signal), "kill -{signal} {}", self.pid);
    }

    /// Waits (within [`LIMIT`]) for the exit, then for the rest of stderr.
    fn wait_exit(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("child not yet waited for");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = match rx.recv_timeout(LIMIT) {
            Ok(status) => status.expect("wait for child"),
            Err(_) => {
                kill(self.pid, "KILL");
                panic!("no exit within {LIMIT:?}; stderr:\n{}", self.log());
            }
        };
        let deadline = Instant::now() + LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("stderr still open after exit; stderr:\n{}", self.log())
                }
            }
        }
        (status, self.log())
    }

    /// Sends `signal` at once and expects exit 0, a log line containing `shutdown` and no
    /// `ERROR`. Call it right after the ready line was seen. Returns the whole stderr.
    pub fn exits_cleanly_on(self, signal: &str, shutdown: &str) -> String {
        // The ready line is the contract: once it is logged, SIGTERM and SIGINT must shut down
        // cleanly, so the signal is sent at once, with no grace period.
        self.signal(signal);
        let (status, log) = self.wait_exit();
        assert_eq!(
            status.code(),
            Some(0),
            "{status} after SIG{signal} (if killed by the signal: no handler was installed yet \
             when the ready line was logged); stderr:\n{log}"
        );
        assert!(log.contains(shutdown), "{log}");
        assert!(!log.contains("ERROR"), "{log}");
        log
    }

    fn log(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A failed test must not leave the binary running.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// Tests shared by several binaries: each test file calls these from its own `#[test]`s.

/// Runs on the config `text` (written as `name`) and asserts the first line of the error
/// names the file and `line`, and that the error mentions `detail`.
pub fn config_error(bin: &str, name: &str, text: &str, line: &str, detail: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_file(dir.path(), name, text);
    let err = failure(&run_config(bin, &config));
    let first = err.lines().next().expect("an error line");
    assert!(
        first.starts_with(&format!("Error: {}: ", config.display())),
        "{err}"
    );
    assert!(first.contains(line), "want {line:?}:\n{err}");
    assert!(err.contains(detail), "want {detail:?}:\n{err}");
}

pub fn missing_config_file_is_named(bin: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("absent.toml");
    let err = failure(&run_config(bin, &config));
    assert_eq!(
        err,
        format!(
            "Error: {}: No such file or directory (os error 2)\n",
            config.display()
        )
    );
}

/// `write_config` writes a valid config in the folder it is given and returns its path.
pub fn invalid_log_filter_is_explained(bin: &str, write_config: impl FnOnce(&Path) -> PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let mut cmd = config_command(bin, &config);
    cmd.args(["--log-level", "bogus=["]);
    let err = failure(&run(cmd));
    assert!(
        err.starts_with("Error: invalid log level \"bogus=[\": "),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// `write_config` writes a config in the folder it is given that listens on the address it is
/// given (already taken), and returns its path.
#[allow(dead_code)]
pub fn listen_address_in_use_is_named(
    bin: &str,
    write_config: impl FnOnce(&Path, SocketAddr) -> PathBuf,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("local addr");
    let config = write_config(dir.path(), addr);
    let err = failure(&run_config(bin, &config));
    assert_eq!(
        err,
        format!(
            "Error: cannot listen on {addr}\n\nCaused by:\n    Address already in use (os error 98)\n"
        )
    );
    drop(taken);
}

/// `--help` succeeds, prints nothing on stderr, and its stdout contains every one of `wants`.
pub fn help_contains(bin: &str, wants: &[&str]) {
    let mut cmd = command(bin);
    cmd.arg("--help");
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    let help = stdout(&out);
    for want in wants {
        assert!(help.contains(want), "{want:?} missing from:\n{help}");
    }
}

/// `--version` prints the including crate's name and version.
pub fn version_prints_name_and_version(bin: &str) {
    let mut cmd = command(bin);
    cmd.arg("--version");
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    assert_eq!(
        stdout(&out),
        format!("{} {}\n", env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
    );
}

/// A binary that authenticates to the relay with a private key file: `ptth_server` and
/// `ptth_proxy` share `keygen`, `key_file` handling and `--config` checks, tested by the methods.
#[allow(dead_code)]
pub struct Keyed {
    /// The binary under test.
    pub bin: &'static str,
    /// The file name of the key the tests create next to the config.
    pub key: &'static str,
    /// Writes a valid config in the folder with the given relative `key_file` (none: no
    /// `key_file` line); returns its path.
    pub write_config: fn(&Path, Option<&str>) -> PathBuf,
    /// Starts the command (the binary with its configuration), checks its ready line, then
    /// calls [`Running::exits_cleanly_on`] with the signal, and returns the whole stderr.
    pub starts_and_exits_cleanly_on: fn(Command, &str) -> String,
}

#[allow(dead_code)]
impl Keyed {
    pub fn keygen(&self, out: &Path) -> Output {
        let mut cmd = command(self.bin);
        cmd.arg("keygen").arg("--out").arg(out);
        run(cmd)
    }

    pub fn keygen_prints_the_public_key_and_writes_a_private_pem(&self) {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join(self.key);
        let out = self.keygen(&key);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stderr(&out), "");

        let pem = std::fs::read_to_string(&key).expect("read key");
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        assert!(pem.ends_with("-----END PRIVATE KEY-----\n"), "{pem}");
        assert_eq!(mode(&key), 0o600);

        // Exactly one line: the standard base64 of the 32 bytes of the matching public key.
        let public = PrivateKey::load(&key)
            .expect("load key")
            .public()
            .to_base64();
        assert_eq!(public.len(), 44);
        assert_eq!(stdout(&out), format!("{public}\n"));

        // `pubkey` prints the same line from the key file, for keygen and openssl keys alike.
        let mut cmd = command(self.bin);
        cmd.arg("pubkey").arg("--key").arg(&key);
        let again = run(cmd);
        assert!(again.status.success(), "{}", stderr(&again));
        assert_eq!(stdout(&again), format!("{public}\n"));
        // The form written is PKCS#8 v1, which OpenSSL reads too.
        let o = std::process::Command::new("openssl")
            .arg("pkey")
            .arg("-in")
            .arg(&key)
            .arg("-noout")
            .output()
            .expect("run openssl (the test setup, .ci/run, installs it)");
        assert!(
            o.status.success(),
            "openssl cannot read the key: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    pub fn keygen_never_overwrites(&self) {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join(self.key);
        assert!(self.keygen(&key).status.success());
        let before = std::fs::read(&key).expect("read key");

        let err = failure(&self.keygen(&key));
        // Only the first line: the cause after it repeats the OS error.
        assert_eq!(
            err.lines().next(),
            Some(format!("Error: {}: File exists (os error 17)", key.display()).as_str()),
            "{err}"
        );
        assert_eq!(std::fs::read(&key).expect("read key"), before);
        assert_eq!(mode(&key), 0o600);
    }

    pub fn keygen_needs_out(&self) {
        let mut cmd = command(self.bin);
        cmd.arg("keygen");
        let err = failure(&run(cmd));
        assert!(err.contains("--out <OUT>"), "{err}");
    }

    pub fn openssl_key_is_accepted_and_sigterm_exits_cleanly(&self) {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("openssl.key");
        let mut openssl = Command::new("openssl");
        openssl
            .args(["genpkey", "-algorithm", "ed25519", "-out"])
            .arg(&key)
            .stdin(Stdio::null());
        let out = try_run(openssl).expect("run openssl (the test setup, .ci/run, installs it)");
        assert!(out.status.success(), "openssl: {}", stderr(&out));
        set_mode(&key, 0o600);
        let config = (self.write_config)(dir.path(), Some("openssl.key"));
        (self.starts_and_exits_cleanly_on)(config_command(self.bin, &config), "TERM");
    }

    pub fn keygen_key_is_accepted_and_sigint_exits_cleanly(&self) {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(self.keygen(&dir.path().join(self.key)).status.success());
        let config = (self.write_config)(dir.path(), Some(self.key));
        (self.starts_and_exits_cleanly_on)(config_command(self.bin, &config), "INT");
    }

    pub fn group_readable_key_is_refused(&self) {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join(self.key);
        assert!(self.keygen(&key).status.success());
        set_mode(&key, 0o640);
        let config = (self.write_config)(dir.path(), Some(self.key));
        let err = failure(&run_config(self.bin, &config));
        assert_eq!(
            err,
            format!(
                "Error: key_file in {0}\n\nCaused by:\n    {1}: key file is accessible by group or others (mode 640); run `chmod 600 {1}`\n",
                config.display(),
                key.display()
            )
        );
    }

    pub fn missing_key_file_is_refused(&self) {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = (self.write_config)(dir.path(), Some("absent.key"));
        let err = failure(&run_config(self.bin, &config));
        let want = format!("Error: key_file in {}\n\nCaused by:\n", config.display());
        assert!(err.starts_with(&want), "{err}");
        let cause = format!(
            "{}: No such file or directory (os error 2)\n",
            dir.path().join("absent.key").display()
        );
        assert!(err.contains(&cause), "{err}");
    }

    pub fn key_file_that_is_not_a_key_is_refused(&self) {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join(self.key);
        std::fs::write(&key, "not a key\n").expect("write");
        set_mode(&key, 0o600);
        let config = (self.write_config)(dir.path(), Some(self.key));
        let err = failure(&run_config(self.bin, &config));
        let want = format!(
            "Error: key_file in {}\n\nCaused by:\n    {}: not a PKCS#8 PEM ed25519 private key (",
            config.display(),
            key.display()
        );
        assert!(err.starts_with(&want), "{err}");
    }

    pub fn missing_config_flag_is_explained(&self) {
        let err = failure(&run(command(self.bin)));
        assert_eq!(err, "Error: missing --config FILE (see --help)\n");
    }

    pub fn invalid_log_filter_is_explained(&self) {
        invalid_log_filter_is_explained(self.bin, |dir| (self.write_config)(dir, Some(self.key)));
    }

    /// A fresh key file `self.key` in `dir` (mode 0600) and its PEM text.
    fn key_pem(&self, dir: &Path) -> String {
        let key = dir.join(self.key);
        assert!(self.keygen(&key).status.success());
        std::fs::read_to_string(&key).expect("read key")
    }

    /// `PTTH_CONFIG` stands for `--config`, and `PTTH_LOG` for `--log-level`, which wins.
    pub fn config_and_log_level_come_from_the_environment(&self) {
        let dir = tempfile::tempdir().expect("tempdir");
        self.key_pem(dir.path());
        let config = (self.write_config)(dir.path(), Some(self.key));
        let mut cmd = command(self.bin);
        cmd.env("PTTH_CONFIG", &config);
        (self.starts_and_exits_cleanly_on)(cmd, "TERM");

        // PTTH_LOG is read: an invalid filter there is the same error as with --log-level.
        let mut cmd = command(self.bin);
        cmd.env("PTTH_CONFIG", &config).env("PTTH_LOG", "bogus=[");
        let err = failure(&run(cmd));
        assert!(
            err.starts_with("Error: invalid log level \"bogus=[\": "),
            "{err}"
        );
        // The flags win over the environment.
        let mut cmd = config_command(self.bin, &config);
        cmd.env("PTTH_CONFIG", dir.path().join("absent.toml"))
            .env("PTTH_LOG", "bogus=[")
            .args(["--log-level", "info"]);
        (self.starts_and_exits_cleanly_on)(cmd, "INT");
    }

    /// The key commands work when the environment sets what a run would use.
    pub fn key_commands_ignore_the_settings_in_the_environment(&self) {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = (self.write_config)(dir.path(), Some(self.key));
        let key = dir.path().join(self.key);
        let mut cmd = command(self.bin);
        cmd.arg("keygen")
            .arg("--out")
            .arg(&key)
            .env("PTTH_CONFIG", &config)
            .env("PTTH_LOG", "debug")
            .env("PTTH_KEY_FD", "0");
        let out = run(cmd);
        assert!(out.status.success(), "{}", stderr(&out));
        let public = stdout(&out);
        assert_eq!(public.len(), 45, "{public}");
        let mut cmd = command(self.bin);
        cmd.arg("pubkey")
            .arg("--key")
            .arg(&key)
            .env("PTTH_CONFIG", &config)
            .env("PTTH_KEY_FD", "0");
        let out = run(cmd);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), public);
    }

    /// With no `key_file`, the key may be the PEM text in `PTTH_KEY`; it is never logged.
    pub fn key_from_the_environment_is_accepted(&self) {
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = self.key_pem(dir.path());
        std::fs::remove_file(dir.path().join(self.key)).expect("remove the key file");
        let config = (self.write_config)(dir.path(), None);
        let mut cmd = config_command(self.bin, &config);
        cmd.env("PTTH_KEY", &pem).env("PTTH_LOG", "trace");
        let log = (self.starts_and_exits_cleanly_on)(cmd, "TERM");
        shows_no_key(&log, &pem);
    }

    /// With no `key_file`, the key may be read from an inherited file descriptor: here a pipe
    /// on stdin, with `--key-fd 0` and with `PTTH_KEY_FD=0`.
    pub fn key_from_a_file_descriptor_is_accepted(&self) {
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = self.key_pem(dir.path());
        std::fs::remove_file(dir.path().join(self.key)).expect("remove the key file");
        let config = (self.write_config)(dir.path(), None);
        for flag in [true, false] {
            let mut cmd = config_command(self.bin, &config);
            if flag {
                cmd.args(["--key-fd", "0"]);
            } else {
                cmd.env("PTTH_KEY_FD", "0");
            }
            cmd.stdin(pem_pipe(&pem)).env("PTTH_LOG", "trace");
            let log = (self.starts_and_exits_cleanly_on)(cmd, "TERM");
            shows_no_key(&log, &pem);
        }
    }

    /// Two sources of the key, or none, are refused, naming them; the key is not shown.
    pub fn key_given_twice_or_not_at_all_is_refused(&self) {
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = self.key_pem(dir.path());
        let with_file = (self.write_config)(dir.path(), Some(self.key));

        let mut cmd = config_command(self.bin, &with_file);
        cmd.env("PTTH_KEY", &pem);
        let err = failure(&run(cmd));
        assert_eq!(
            err,
            format!(
                "Error: the private key is given more than once, in key_file in {} and \
                 PTTH_KEY: give only one\n",
                with_file.display()
            )
        );

        let mut cmd = config_command(self.bin, &with_file);
        cmd.args(["--key-fd", "0"]).stdin(pem_pipe(&pem));
        let err = failure(&run(cmd));
        assert_eq!(
            err,
            format!(
                "Error: the private key is given more than once, in key_file in {} and file \
                 descriptor 0 (--key-fd or PTTH_KEY_FD): give only one\n",
                with_file.display()
            )
        );

        let without = (self.write_config)(dir.path(), None);
        let mut cmd = config_command(self.bin, &without);
        cmd.env("PTTH_KEY", &pem).env("PTTH_KEY_FD", "0");
        let err = failure(&run(cmd));
        assert_eq!(
            err,
            "Error: the private key is given more than once, in PTTH_KEY and file descriptor 0 \
             (--key-fd or PTTH_KEY_FD): give only one\n"
        );
        shows_no_key(&err, &pem);

        let err = failure(&run_config(self.bin, &without));
        assert_eq!(
            err,
            format!(
                "Error: no private key: set key_file in {}, or give the key in PTTH_KEY or \
                 --key-fd (PTTH_KEY_FD)\n",
                without.display()
            )
        );
    }

    /// A `PTTH_KEY` that is not a key, a descriptor that is not open or holds no key, and a
    /// `PTTH_KEY_FD` that is not a number are each refused; the text given is not shown.
    pub fn bad_key_from_the_environment_or_a_descriptor_is_refused(&self) {
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = self.key_pem(dir.path());
        let config = (self.write_config)(dir.path(), None);
        let half = &pem[..pem.len() / 2];

        let mut cmd = config_command(self.bin, &config);
        cmd.env("PTTH_KEY", half);
        let err = failure(&run(cmd));
        assert!(
            err.starts_with("Error: PTTH_KEY: not a PKCS#8 PEM ed25519 private key ("),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        shows_no_key(&err, half);

        let mut cmd = config_command(self.bin, &config);
        cmd.args(["--key-fd", "0"]).stdin(pem_pipe(half));
        let err = failure(&run(cmd));
        assert!(
            err.starts_with(
                "Error: file descriptor 0 (--key-fd or PTTH_KEY_FD)\n\nCaused by:\n    \
                 stdin: not a PKCS#8 PEM ed25519 private key ("
            ),
            "{err}"
        );
        shows_no_key(&err, half);

        let mut cmd = config_command(self.bin, &config);
        cmd.args(["--key-fd", "57"]);
        let err = failure(&run(cmd));
        assert_eq!(
            err,
            "Error: file descriptor 57 (--key-fd or PTTH_KEY_FD)\n\nCaused by:\n    \
             /proc/self/fd/57: No such file or directory (os error 2)\n"
        );

        let mut cmd = config_command(self.bin, &config);
        cmd.env("PTTH_KEY_FD", "three");
        let err = failure(&run(cmd));
        assert!(
            err.starts_with("error: invalid value 'three' for '--key-fd <FD>'"),
            "{err}"
        );
    }

    /// `--help` names every environment variable, and never shows the key.
    pub fn help_names_the_environment_and_never_the_key(&self) {
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = self.key_pem(dir.path());
        let mut cmd = command(self.bin);
        cmd.arg("--help").env("PTTH_KEY", &pem);
        let out = run(cmd);
        assert!(out.status.success(), "{}", stderr(&out));
        let help = stdout(&out);
        for want in [
            "[env: PTTH_CONFIG=]",
            "[env: PTTH_LOG=]",
            "[env: PTTH_KEY_FD=]",
            "PTTH_KEY may hold the PEM text itself",
        ] {
            assert!(help.contains(want), "{want:?} missing from:\n{help}");
        }
        shows_no_key(&help, &pem);
    }
}

/// A pipe holding `pem`, its writing end closed: a key on a file descriptor (a pipe holds
/// 64 KiB, so the text is written whole before the binary starts).
#[allow(dead_code)]
fn pem_pipe(pem: &str) -> std::io::PipeReader {
    use std::io::Write;
    let (reader, mut writer) = std::io::pipe().expect("pipe");
    writer.write_all(pem.as_bytes()).expect("write the key");
    reader
}

/// Asserts that `output` shows no line of the key's PEM text but its frame.
#[allow(dead_code)]
fn shows_no_key(output: &str, pem: &str) {
    let secret: Vec<&str> = pem
        .lines()
        .filter(|l| !l.starts_with("-----") && !l.is_empty())
        .collect();
    assert!(!secret.is_empty(), "no key text in {pem:?}");
    for line in secret {
        assert!(!output.contains(line), "the key is shown:\n{output}");
    }
}
