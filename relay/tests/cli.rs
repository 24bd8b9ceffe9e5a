//! Command-line tests of the `ptth_relay` binary: configuration errors, `--help`/`--version`,
//! a listen address in use, settings from the environment (`PTTH_CONFIG`, `PTTH_LOG`), and
//! clean exit on SIGTERM and SIGINT.
//!
//! Every test runs the real binary on files in a fresh temporary folder, listening on
//! `127.0.0.1:0`; every wait is bounded by `support::LIMIT`.

#[path = "../../tests/support/cli.rs"]
mod support;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};

use ptth_common::keys::PrivateKey;
use support::{LIMIT, Running, command, failure, run};

const BIN: &str = env!("CARGO_BIN_EXE_ptth_relay");

/// A fresh public key in base64, as `ptth_server keygen` prints it.
fn public_key() -> String {
    PrivateKey::generate()
        .expect("generate key")
        .public()
        .to_base64()
}

/// Writes `relay.toml` with `text` in `dir` and returns its path.
fn write_config(dir: &Path, text: &str) -> PathBuf {
    support::write_file(dir, "relay.toml", text)
}

/// Starts `--config config`, waits for the `relay listening` line and connects to the address it
/// names, sends `signal` and expects exit 0. Returns the `relay listening` line.
fn starts_and_exits_cleanly_on(config: &Path, signal: &str) -> String {
    let mut relay = Running::start(support::config_command(BIN, config));
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
    relay.exits_cleanly_on(signal, "relay shutting down");
    drop(conn);
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
    assert!(line.ends_with(" servers=1 clients=1 tls=false"), "{line}");
}

#[test]
fn sigint_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "listen = \"127.0.0.1:0\"\n");
    let line = starts_and_exits_cleanly_on(&config, "INT");
    assert!(line.ends_with(" servers=0 clients=0 tls=false"), "{line}");
}

#[test]
fn an_older_config_with_listen_timeout_starts_with_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        "listen = \"127.0.0.1:0\"\nlisten_timeout = \"25s\"\n",
    );
    let mut relay = Running::start(support::config_command(BIN, &config));
    let line = relay.wait_for_line("listen_timeout");
    assert!(
        line.contains("WARN") && line.contains("no longer used"),
        "{line}"
    );
    relay.exits_cleanly_on("TERM", "relay shutting down");
}

#[test]
fn rust_log_is_honoured_and_log_level_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "listen = \"127.0.0.1:0\"\n");
    // The relay logs this at debug level when it starts on loopback without `authorities`.
    let debug_line = "no `authorities` configured";
    let mut cmd = support::config_command(BIN, &config);
    cmd.env("RUST_LOG", "debug");
    let mut relay = Running::start(cmd);
    relay.wait_for_line(debug_line);
    relay.exits_cleanly_on("TERM", "relay shutting down");

    let mut cmd = support::config_command(BIN, &config);
    cmd.env("RUST_LOG", "debug").args(["--log-level", "info"]);
    let mut relay = Running::start(cmd);
    relay.wait_for_line("relay listening");
    let log = relay.exits_cleanly_on("TERM", "relay shutting down");
    assert!(
        !log.contains(debug_line),
        "--log-level must win over RUST_LOG:\n{log}"
    );
    assert!(!log.contains("DEBUG"), "{log}");
}

#[test]
fn config_and_log_level_come_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "listen = \"127.0.0.1:0\"\n");
    let debug_line = "no `authorities` configured";
    // Runs the relay with `env` and `args` (and no --config unless given) and tells whether
    // it logged at debug level.
    let logs_debug = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = command(BIN);
        cmd.envs(env.iter().copied()).args(args);
        let mut relay = Running::start(cmd);
        relay.wait_for_line("relay listening");
        relay
            .exits_cleanly_on("TERM", "relay shutting down")
            .contains(debug_line)
    };
    let path = config.to_str().expect("UTF-8 path");
    assert!(logs_debug(
        &[("PTTH_CONFIG", path), ("PTTH_LOG", "debug")],
        &[]
    ));
    assert!(
        !logs_debug(&[("PTTH_CONFIG", path)], &[]),
        "info by default"
    );
    // --log-level, then PTTH_LOG, then RUST_LOG.
    assert!(
        !logs_debug(
            &[
                ("PTTH_CONFIG", path),
                ("PTTH_LOG", "info"),
                ("RUST_LOG", "debug")
            ],
            &[]
        ),
        "PTTH_LOG must win over RUST_LOG"
    );
    assert!(
        !logs_debug(
            &[("PTTH_LOG", "debug")],
            &["--config", path, "--log-level", "info"]
        ),
        "--log-level must win over PTTH_LOG"
    );
    // --config wins over PTTH_CONFIG.
    let absent = dir.path().join("absent.toml");
    let absent = absent.to_str().expect("UTF-8 path");
    assert!(!logs_debug(&[("PTTH_CONFIG", absent)], &["--config", path]));
}

#[test]
fn errors_never_come_with_a_backtrace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "listen = \"127.0.0.1:0\"\nbogus = 1\n");
    let mut cmd = support::config_command(BIN, &config);
    cmd.env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1");
    let err = failure(&run(cmd));
    assert!(err.starts_with("Error: "), "{err}");
    assert!(err.contains("unknown field `bogus`"), "{err}");
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
}

#[test]
fn listen_address_in_use_is_named() {
    support::listen_address_in_use_is_named(BIN, |dir, addr| {
        write_config(dir, &format!("listen = \"{addr}\"\n"))
    });
}

/// [`support::config_error`] on `relay.toml` with `template`, each `KEY` in it replaced by a
/// fresh public key.
fn config_error(template: &str, line: &str, detail: &str) {
    let mut parts = template.split("KEY");
    let mut text = parts.next().unwrap_or_default().to_owned();
    for part in parts {
        text.push_str(&public_key());
        text.push_str(part);
    }
    support::config_error(BIN, "relay.toml", &text, line, detail);
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
    support::missing_config_file_is_named(BIN);
}

#[test]
fn missing_config_flag_is_explained() {
    let out = run(command(BIN));
    let err = failure(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err,
        "error: the following required arguments were not provided:\n  --config <CONFIG>\n\nUsage: ptth_relay --config <CONFIG>\n\nFor more information, try '--help'.\n"
    );
}

#[test]
fn invalid_log_filter_is_explained() {
    support::invalid_log_filter_is_explained(BIN, |dir| {
        write_config(dir, "listen = \"127.0.0.1:0\"\n")
    });
}

#[test]
fn help_shows_an_example_config() {
    support::help_contains(
        BIN,
        &[
            "Usage: ptth_relay [OPTIONS] --config <CONFIG>",
            "--log-level <LOG_LEVEL>",
            "[env: PTTH_CONFIG=]",
            "[env: PTTH_LOG=]",
            "Example relay.toml:",
            "listen = \"127.0.0.1:4000\"",
            "[[servers]]",
            "[[clients]]",
            "allow = [\"db/postgres\", \"web/*\"]",
            "Run: ptth_relay --config relay.toml",
        ],
    );
}

#[test]
fn version_prints_name_and_version() {
    support::version_prints_name_and_version(BIN);
}
