//! Command-line tests of the `ptth_server` binary: `keygen`, key files from `openssl`, key file
//! permissions, the key from `PTTH_KEY` or a file descriptor instead, settings from the
//! environment (`PTTH_CONFIG`, `PTTH_LOG`), configuration errors, `--help`/`--version`, and clean
//! exit on SIGTERM and SIGINT.
//!
//! Every test runs the real binary on files in a fresh temporary folder; every wait is bounded
//! by `support::LIMIT`. The relay is never reachable (a port that was bound and released),
//! which the server proxy only logs and retries: the tests need nothing listening.

#[path = "../../tests/support/cli.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{Keyed, Running, failure, run_config};

const BIN: &str = env!("CARGO_BIN_EXE_ptth_server");

const SERVER: Keyed = Keyed {
    bin: BIN,
    key: "db.key",
    write_config,
    starts_and_exits_cleanly_on,
};

/// Writes `server.toml` in `dir` with a relative `key_file` (or none) and returns its path.
fn write_config(dir: &Path, key_file: Option<&str>) -> PathBuf {
    let key_file = key_file.map_or(String::new(), |k| format!("key_file = \"{k}\"\n"));
    let text = format!(
        "relay_url = \"{}\"\nname = \"db\"\n{key_file}\n[ports]\npostgres = \"127.0.0.1:5432\"\n",
        support::unreachable_relay_url()
    );
    support::write_file(dir, "server.toml", &text)
}

/// Starts `cmd`, waits for the startup line, sends `signal` and expects exit 0; returns the
/// whole stderr.
fn starts_and_exits_cleanly_on(cmd: Command, signal: &str) -> String {
    let mut server = Running::start(cmd);
    let started = server.wait_for_line("server proxy started");
    assert!(started.contains("server=db"), "{started}");
    assert!(started.contains("ports=[\"postgres\"]"), "{started}");
    server.exits_cleanly_on(signal, "server proxy shutting down")
}

#[test]
fn keygen_prints_the_public_key_and_writes_a_private_pem() {
    SERVER.keygen_prints_the_public_key_and_writes_a_private_pem();
}

#[test]
fn keygen_never_overwrites() {
    SERVER.keygen_never_overwrites();
}

#[test]
fn keygen_needs_out() {
    SERVER.keygen_needs_out();
}

#[test]
fn openssl_key_is_accepted_and_sigterm_exits_cleanly() {
    SERVER.openssl_key_is_accepted_and_sigterm_exits_cleanly();
}

#[test]
fn keygen_key_is_accepted_and_sigint_exits_cleanly() {
    SERVER.keygen_key_is_accepted_and_sigint_exits_cleanly();
}

#[test]
fn config_and_log_level_come_from_the_environment() {
    SERVER.config_and_log_level_come_from_the_environment();
}

#[test]
fn key_commands_ignore_the_settings_in_the_environment() {
    SERVER.key_commands_ignore_the_settings_in_the_environment();
}

#[test]
fn key_from_the_environment_is_accepted() {
    SERVER.key_from_the_environment_is_accepted();
}

#[test]
fn key_from_a_file_descriptor_is_accepted() {
    SERVER.key_from_a_file_descriptor_is_accepted();
}

#[test]
fn key_given_twice_or_not_at_all_is_refused() {
    SERVER.key_given_twice_or_not_at_all_is_refused();
}

#[test]
fn bad_key_from_the_environment_or_a_descriptor_is_refused() {
    SERVER.bad_key_from_the_environment_or_a_descriptor_is_refused();
}

#[test]
fn help_names_the_environment_and_never_the_key() {
    SERVER.help_names_the_environment_and_never_the_key();
}

#[test]
fn group_readable_key_is_refused() {
    SERVER.group_readable_key_is_refused();
}

#[test]
fn missing_key_file_is_refused() {
    SERVER.missing_key_file_is_refused();
}

#[test]
fn key_file_that_is_not_a_key_is_refused() {
    SERVER.key_file_that_is_not_a_key_is_refused();
}

/// [`support::config_error`] on `server.toml`.
fn config_error(text: &str, line: &str, detail: &str) {
    support::config_error(BIN, "server.toml", text, line, detail);
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
    let config = support::write_file(
        dir.path(),
        "server.toml",
        "relay_url = \"http://127.0.0.1:1\"\nname = \"db\"\nkey_file = \"db.key\"\n[ports]\npostgres = \"nowhere\"\n",
    );
    let err = failure(&run_config(BIN, &config));
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
    support::missing_config_file_is_named(BIN);
}

#[test]
fn missing_config_flag_is_explained() {
    SERVER.missing_config_flag_is_explained();
}

#[test]
fn invalid_log_filter_is_explained() {
    SERVER.invalid_log_filter_is_explained();
}

#[test]
fn help_shows_an_example_config() {
    support::help_contains(
        BIN,
        &[
            "Usage: ptth_server [OPTIONS]",
            "keygen",
            "--config <CONFIG>",
            "--log-level <LOG_LEVEL>",
            "Example server.toml:",
            "relay_url = \"https://relay.example.com\"",
            "[ports]",
            "postgres = \"127.0.0.1:5432\"",
            "ptth_server keygen --out db.key",
        ],
    );
}

#[test]
fn version_prints_name_and_version() {
    support::version_prints_name_and_version(BIN);
}
