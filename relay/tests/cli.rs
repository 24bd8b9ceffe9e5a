//! Command-line tests of the `ptth_relay` binary: configuration errors, `--help`/`--version`,
//! a listen address in use, and clean exit on SIGTERM and SIGINT.
//!
//! Every test runs the real binary on files in a fresh temporary folder, listening on
//! `127.0.0.1:0`; every wait is bounded by [`LIMIT`].

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ptth_common::keys::PrivateKey;

const BIN: &str = env!("CARGO_BIN_EXE_ptth_relay");
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

/// A fresh public key in base64, as `ptth_server keygen` prints it.
fn public_key() -> String {
    PrivateKey::generate()
        .expect("generate key")
        .public()
        .to_base64()
}

/// Writes `relay.toml` with `text` in `dir` and returns its path.
fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn run_config(config: &Path) -> Output {
    let mut cmd = command();
    cmd.arg("--config").arg(config);
    run(cmd)
}

/// Starts `--config config`, waits for the `relay listening` line and connects to the address it
/// names, sends `signal` and expects exit 0. Returns the `relay listening` line.
fn starts_and_exits_cleanly_on(config: &Path, signal: &str) -> String {
    let mut cmd = command();
    cmd.arg("--config").arg(config);
    let mut relay = Running::start(cmd);
    let line = relay.wait_for_line("relay listening");
    let addr: SocketAddr = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("address="))
        .expect("address= field")
        .parse()
        .expect("a socket address");
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{line}");
    // Listening for real: a connection is accepted (and left unused).
    let conn = TcpStream::connect_timeout(&addr, LIMIT).expect("connect to the relay");
    // The ready line is the contract: once it is logged, SIGTERM and SIGINT must shut down
    // cleanly, so the signal is sent at once, with no grace period.
    relay.signal(signal);
    let (status, log) = relay.wait_exit();
    drop(conn);
    assert_eq!(
        status.code(),
        Some(0),
        "{status} after SIG{signal} (if killed by the signal: no handler was installed yet when \
         the ready line was logged); stderr:\n{log}"
    );
    assert!(log.contains("relay shutting down"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
    line
}

#[test]
fn sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &format!(
            "listen = \"127.0.0.1:0\"\n\n[[servers]]\nname = \"db\"\npublic_key = \"{}\"\n\n[[clients]]\nname = \"alice\"\npublic_key = \"{}\"\nallow = [\"db/postgres\", \"web/*\"]\n",
            public_key(),
            public_key()
        ),
    );
    let line = starts_and_exits_cleanly_on(&config, "TERM");
    assert!(line.ends_with(" servers=1 clients=1"), "{line}");
}

#[test]
fn sigint_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "listen = \"127.0.0.1:0\"\n");
    let line = starts_and_exits_cleanly_on(&config, "INT");
    assert!(line.ends_with(" servers=0 clients=0"), "{line}");
}

#[test]
fn listen_address_in_use_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("local addr");
    let config = write_config(dir.path(), &format!("listen = \"{addr}\"\n"));
    let err = failure(&run_config(&config));
    assert_eq!(
        err,
        format!(
            "Error: cannot listen on {addr}\n\nCaused by:\n    Address already in use (os error 98)\n"
        )
    );
    drop(taken);
}

/// Runs on a config with `template` (each `KEY` replaced by a fresh public key) and asserts the
/// first line of the error names the file and `line`, and that the error mentions `detail`.
fn config_error(template: &str, line: &str, detail: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut parts = template.split("KEY");
    let mut text = parts.next().unwrap_or_default().to_owned();
    for part in parts {
        text.push_str(&public_key());
        text.push_str(part);
    }
    let config = write_config(dir.path(), &text);
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
        "listen = \"127.0.0.1:0\"\nbogus = 1\n",
        "TOML parse error at line 2, column 1",
        "unknown field `bogus`",
    );
}

#[test]
fn unknown_field_in_a_client_names_file_and_line() {
    config_error(
        "listen = \"127.0.0.1:0\"\n[[clients]]\nname = \"alice\"\npublic_key = \"KEY\"\nallowed = [\"db/*\"]\n",
        "TOML parse error at line 5, column 1",
        "unknown field `allowed`",
    );
}

#[test]
fn bad_duration_names_file_and_line() {
    config_error(
        "listen = \"127.0.0.1:0\"\nidle_timeout = \"soon\"\n",
        "TOML parse error at line 2, column 16",
        "invalid value: string \"soon\", expected a duration",
    );
}

#[test]
fn bad_listen_address_names_file_and_line() {
    config_error(
        "\nlisten = \"localhost\"\n",
        "TOML parse error at line 2, column 10",
        "invalid socket address syntax",
    );
}

#[test]
fn bad_public_key_names_file_and_line() {
    config_error(
        "[[servers]]\nname = \"db\"\npublic_key = \"nope\"\n",
        "TOML parse error at line 3, column 14",
        "invalid public key: expected 32 bytes, got 3",
    );
}

#[test]
fn bad_allow_entry_names_file_and_line() {
    config_error(
        "[[clients]]\nname = \"alice\"\npublic_key = \"KEY\"\nallow = [\"db\"]\n",
        "TOML parse error at line 4, column 9",
        "allow entry \"db\" must be \"server/port\" or \"server/*\"",
    );
}

#[test]
fn duplicate_server_names_file_and_line() {
    config_error(
        "[[servers]]\nname = \"db\"\npublic_key = \"KEY\"\n\n[[servers]]\nname = \"db\"\npublic_key = \"KEY\"\n",
        "line 6: server db is listed twice",
        "",
    );
}

#[test]
fn duplicate_public_key_names_file_and_line() {
    let key = public_key();
    config_error(
        &format!(
            "[[servers]]\nname = \"db\"\npublic_key = \"{key}\"\n[[clients]]\nname = \"alice\"\npublic_key = \"{key}\"\n"
        ),
        "line 6: public key is used twice",
        "",
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
    let out = run(command());
    let err = failure(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err,
        "error: the following required arguments were not provided:\n  --config <CONFIG>\n\nUsage: ptth_relay --config <CONFIG>\n\nFor more information, try '--help'.\n"
    );
}

#[test]
fn invalid_log_filter_is_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "listen = \"127.0.0.1:0\"\n");
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
        "Usage: ptth_relay [OPTIONS] --config <CONFIG>",
        "--log-level <LOG_LEVEL>",
        "Example relay.toml:",
        "listen = \"127.0.0.1:4000\"",
        "[[servers]]",
        "[[clients]]",
        "allow = [\"db/postgres\", \"web/*\"]",
        "Run: ptth_relay --config relay.toml",
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
