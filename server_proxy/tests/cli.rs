//! Command-line tests of the `ptth_server` binary: `keygen`, key files from `openssl`, key file
//! permissions, configuration errors, `--help`/`--version`, and clean exit on SIGTERM and SIGINT.
//!
//! Every test runs the real binary on files in a fresh temporary folder; every wait is bounded
//! by [`LIMIT`]. The relay is never reachable (a port that was bound and released), which the
//! server proxy only logs and retries: the tests need nothing listening.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ptth_common::keys::PrivateKey;

const BIN: &str = env!("CARGO_BIN_EXE_ptth_server");
/// Upper bound on every wait for a child process or one of its log lines.
const LIMIT: Duration = Duration::from_secs(10);

/// The binary with deterministic output: no backtraces on errors, no colours, no inherited
/// log filter, and a working folder that is not the test's (relative paths must resolve
/// against the configuration file, not the working folder).
fn command() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .current_dir("/")
        .stdin(Stdio::null());
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
fn run(cmd: Command) -> Output {
    try_run(cmd).expect("spawn")
}

/// [`run`], but a program that cannot be started is an error rather than a failure.
fn try_run(mut cmd: Command) -> std::io::Result<Output> {
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

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).expect("stderr is UTF-8")
}

/// Asserts a failed run with nothing on stdout and returns its stderr.
fn failure(out: &Output) -> String {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected a failure, got {:?}; stderr:\n{err}",
        out.status
    );
    assert_eq!(stdout(out), "", "nothing on stdout when failing");
    err
}

/// A long-running child whose stderr lines are read by a thread and handed over a channel.
struct Running {
    child: Option<Child>,
    pid: u32,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(mut cmd: Command) -> Self {
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
    fn wait_for_line(&mut self, needle: &str) -> String {
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

/// `http://127.0.0.1:PORT` where nothing listens: the port was bound and released.
fn unreachable_relay_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// Writes `server.toml` in `dir` with a relative `key_file` and returns its path.
fn write_config(dir: &Path, key_file: &str) -> PathBuf {
    let path = dir.join("server.toml");
    let text = format!(
        "relay_url = \"{}\"\nname = \"db\"\nkey_file = \"{key_file}\"\n\n[ports]\npostgres = \"127.0.0.1:5432\"\n",
        unreachable_relay_url()
    );
    std::fs::write(&path, text).expect("write config");
    path
}

fn keygen(out: &Path) -> Output {
    let mut cmd = command();
    cmd.arg("keygen").arg("--out").arg(out);
    run(cmd)
}

fn run_config(config: &Path) -> Output {
    let mut cmd = command();
    cmd.arg("--config").arg(config);
    run(cmd)
}

/// Starts `--config config`, waits for the startup line, sends `signal` and expects exit 0.
fn starts_and_exits_cleanly_on(config: &Path, signal: &str) {
    let mut cmd = command();
    cmd.arg("--config").arg(config);
    let mut server = Running::start(cmd);
    let started = server.wait_for_line("server proxy started");
    assert!(started.contains("server=db"), "{started}");
    assert!(started.contains("ports=[\"postgres\"]"), "{started}");
    // The ready line is the contract: once it is logged, SIGTERM and SIGINT must shut down
    // cleanly, so the signal is sent at once, with no grace period.
    server.signal(signal);
    let (status, log) = server.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "{status} after SIG{signal} (if killed by the signal: no handler was installed yet when \
         the ready line was logged); stderr:\n{log}"
    );
    assert!(log.contains("server proxy shutting down"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn keygen_prints_the_public_key_and_writes_a_private_pem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("db.key");
    let out = keygen(&key);
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
}

#[test]
fn keygen_never_overwrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("db.key");
    assert!(keygen(&key).status.success());
    let before = std::fs::read(&key).expect("read key");

    let err = failure(&keygen(&key));
    // Only the first line: the cause after it repeats the OS error.
    assert_eq!(
        err.lines().next(),
        Some(format!("Error: {}: File exists (os error 17)", key.display()).as_str()),
        "{err}"
    );
    assert_eq!(std::fs::read(&key).expect("read key"), before);
    assert_eq!(mode(&key), 0o600);
}

#[test]
fn keygen_needs_out() {
    let mut cmd = command();
    cmd.arg("keygen");
    let err = failure(&run(cmd));
    assert!(err.contains("--out <OUT>"), "{err}");
}

#[test]
fn openssl_key_is_accepted_and_sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("openssl.key");
    let mut openssl = Command::new("openssl");
    openssl
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key)
        .stdin(Stdio::null());
    let out = match try_run(openssl) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("skipped: openssl is not installed");
            return;
        }
        r => r.expect("run openssl"),
    };
    assert!(out.status.success(), "openssl: {}", stderr(&out));
    set_mode(&key, 0o600);
    let config = write_config(dir.path(), "openssl.key");
    starts_and_exits_cleanly_on(&config, "TERM");
}

#[test]
fn keygen_key_is_accepted_and_sigint_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(keygen(&dir.path().join("db.key")).status.success());
    let config = write_config(dir.path(), "db.key");
    starts_and_exits_cleanly_on(&config, "INT");
}

#[test]
fn group_readable_key_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("db.key");
    assert!(keygen(&key).status.success());
    set_mode(&key, 0o640);
    let config = write_config(dir.path(), "db.key");
    let err = failure(&run_config(&config));
    assert_eq!(
        err,
        format!(
            "Error: key_file in {0}\n\nCaused by:\n    {1}: key file is readable by group or others (mode 640); run `chmod 600 {1}`\n",
            config.display(),
            key.display()
        )
    );
}

#[test]
fn missing_key_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "absent.key");
    let err = failure(&run_config(&config));
    let want = format!("Error: key_file in {}\n\nCaused by:\n", config.display());
    assert!(err.starts_with(&want), "{err}");
    let cause = format!(
        "{}: No such file or directory (os error 2)\n",
        dir.path().join("absent.key").display()
    );
    assert!(err.contains(&cause), "{err}");
}

#[test]
fn key_file_that_is_not_a_key_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("db.key");
    std::fs::write(&key, "not a key\n").expect("write");
    set_mode(&key, 0o600);
    let config = write_config(dir.path(), "db.key");
    let err = failure(&run_config(&config));
    let want = format!(
        "Error: key_file in {}\n\nCaused by:\n    {}: not a PKCS#8 PEM ed25519 private key (",
        config.display(),
        key.display()
    );
    assert!(err.starts_with(&want), "{err}");
}

/// Runs on a config with `text` and asserts the first line of the error names the file and
/// `line`, and that the error mentions `detail`.
fn config_error(text: &str, line: &str, detail: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("server.toml");
    std::fs::write(&config, text).expect("write config");
    let err = failure(&run_config(&config));
    let first = err.lines().next().expect("an error line");
    assert!(
        first.starts_with(&format!("Error: {}: ", config.display())),
        "{err}"
    );
    assert!(first.contains(line), "want {line:?}:\n{err}");
    assert!(err.contains(detail), "want {detail:?}:\n{err}");
}

#[test]
fn unknown_field_names_file_and_line() {
    config_error(
        "relay_url = \"http://127.0.0.1:1\"\nname = \"db\"\nkey_file = \"db.key\"\ncolour = \"blue\"\n[ports]\npostgres = \"127.0.0.1:5432\"\n",
        "TOML parse error at line 4, column 1",
        "unknown field `colour`",
    );
}

#[test]
fn bad_name_names_file_and_line() {
    config_error(
        "relay_url = \"http://127.0.0.1:1\"\nname = \"a/b\"\nkey_file = \"db.key\"\n[ports]\npostgres = \"127.0.0.1:5432\"\n",
        "TOML parse error at line 2, column 8",
        "invalid name \"a/b\"",
    );
}

#[test]
fn bad_port_name_names_file_and_line() {
    config_error(
        "relay_url = \"http://127.0.0.1:1\"\nname = \"db\"\nkey_file = \"db.key\"\n\n[ports]\n\"pg/1\" = \"127.0.0.1:5432\"\n",
        "TOML parse error at line 6, column 1",
        "invalid name \"pg/1\"",
    );
}

#[test]
fn relay_url_with_a_path_names_file_and_line() {
    config_error(
        "name = \"db\"\nrelay_url = \"http://127.0.0.1:1/prefix\"\nkey_file = \"db.key\"\n[ports]\npostgres = \"127.0.0.1:5432\"\n",
        "TOML parse error at line 2, column 13",
        "must not have a path",
    );
}

#[test]
fn bad_duration_names_file_and_line() {
    config_error(
        "relay_url = \"http://127.0.0.1:1\"\nname = \"db\"\nkey_file = \"db.key\"\nmax_backoff = \"0s\"\n[ports]\npostgres = \"127.0.0.1:5432\"\n",
        "TOML parse error at line 4, column 15",
        "duration must be above zero",
    );
}

#[test]
fn bad_port_target_names_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        "relay_url = \"http://127.0.0.1:1\"\nname = \"db\"\nkey_file = \"db.key\"\n[ports]\npostgres = \"nowhere\"\n",
    )
    .expect("write config");
    let err = failure(&run_config(&config));
    assert!(
        err.starts_with(&format!(
            "Error: {}: TOML parse error at line 5, column 12",
            config.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("target \"nowhere\" must be host:port"),
        "{err}"
    );
}

#[test]
fn missing_config_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("absent.toml");
    let err = failure(&run_config(&config));
    assert_eq!(
        err,
        format!(
            "Error: {}: No such file or directory (os error 2)\n",
            config.display()
        )
    );
}

#[test]
fn missing_config_flag_is_explained() {
    let err = failure(&run(command()));
    assert_eq!(err, "Error: missing --config FILE (see --help)\n");
}

#[test]
fn invalid_log_filter_is_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "db.key");
    let mut cmd = command();
    cmd.arg("--config")
        .arg(&config)
        .args(["--log-level", "bogus=["]);
    let err = failure(&run(cmd));
    assert!(
        err.starts_with("Error: invalid log level \"bogus=[\": "),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn help_shows_an_example_config() {
    let mut cmd = command();
    cmd.arg("--help");
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    let help = stdout(&out);
    for want in [
        "Usage: ptth_server [OPTIONS]",
        "keygen",
        "--config <CONFIG>",
        "--log-level <LOG_LEVEL>",
        "Example server.toml:",
        "relay_url = \"https://relay.example.com\"",
        "[ports]",
        "postgres = \"127.0.0.1:5432\"",
        "ptth_server keygen --out db.key",
    ] {
        assert!(help.contains(want), "{want:?} missing from:\n{help}");
    }
}

#[test]
fn version_prints_name_and_version() {
    let mut cmd = command();
    cmd.arg("--version");
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    assert_eq!(
        stdout(&out),
        format!("{} {}\n", env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
    );
}
