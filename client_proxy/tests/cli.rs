//! Command-line tests of the `ptth_proxy` binary: `keygen`, key files from `openssl`, key file
//! permissions, the key from `PTTH_KEY` or a file descriptor instead, settings from the
//! environment (`PTTH_CONFIG`, `PTTH_LOG`), configuration errors, `--help`/`--version`, and clean
//! exit on SIGTERM and SIGINT.
//!
//! Every test runs the real binary on files in a fresh temporary folder; every wait is bounded
//! by `support::LIMIT`. The relay is never reachable (a port that was bound and released): the
//! proxy only dials it when a local connection arrives, which these tests never make.

#[path = "../../tests/support/cli.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{Keyed, Running, failure, run_config};

const BIN: &str = env!("CARGO_BIN_EXE_ptth_proxy");

const PROXY: Keyed = Keyed {
    bin: BIN,
    key: "alice.key",
    write_config,
    starts_and_exits_cleanly_on,
};

/// Writes `proxy.toml` in `dir` with a relative `key_file` (or none) and one forward from an ephemeral
/// local port, and returns its path.
fn write_config(dir: &Path, key_file: Option<&str>) -> PathBuf {
    let key_file = key_file.map_or(String::new(), |k| format!("key_file = \"{k}\"\n"));
    let text = format!(
        "relay_url = \"{}\"\n{key_file}\n[[forwards]]\nlisten = \"127.0.0.1:0\"\nserver = \"db\"\nport = \"postgres\"\n",
        support::unreachable_relay_url()
    );
    support::write_file(dir, "proxy.toml", &text)
}

/// Starts `cmd`, waits for the `forwarding` line, sends `signal` and expects exit 0; returns
/// the whole stderr.
fn starts_and_exits_cleanly_on(cmd: Command, signal: &str) -> String {
    let mut proxy = Running::start(cmd);
    let line = proxy.wait_for_line("forwarding");
    // The forward is bound to a real ephemeral port before it is announced.
    let listen = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("listen="))
        .expect("listen= field");
    let port: u16 = listen
        .strip_prefix("127.0.0.1:")
        .expect("listen on 127.0.0.1")
        .parse()
        .expect("a port number");
    assert_ne!(port, 0, "{line}");
    assert!(line.contains("server=db port=postgres"), "{line}");
    proxy.exits_cleanly_on(signal, "proxy shutting down")
}

#[test]
fn keygen_prints_the_public_key_and_writes_a_private_pem() {
    PROXY.keygen_prints_the_public_key_and_writes_a_private_pem();
}

#[test]
fn keygen_never_overwrites() {
    PROXY.keygen_never_overwrites();
}

#[test]
fn keygen_needs_out() {
    PROXY.keygen_needs_out();
}

#[test]
fn openssl_key_is_accepted_and_sigterm_exits_cleanly() {
    PROXY.openssl_key_is_accepted_and_sigterm_exits_cleanly();
}

#[test]
fn keygen_key_is_accepted_and_sigint_exits_cleanly() {
    PROXY.keygen_key_is_accepted_and_sigint_exits_cleanly();
}

#[test]
fn config_and_log_level_come_from_the_environment() {
    PROXY.config_and_log_level_come_from_the_environment();
}

#[test]
fn key_commands_ignore_the_settings_in_the_environment() {
    PROXY.key_commands_ignore_the_settings_in_the_environment();
}

#[test]
fn key_from_the_environment_is_accepted() {
    PROXY.key_from_the_environment_is_accepted();
}

#[test]
fn key_from_a_file_descriptor_is_accepted() {
    PROXY.key_from_a_file_descriptor_is_accepted();
}

#[test]
fn key_given_twice_or_not_at_all_is_refused() {
    PROXY.key_given_twice_or_not_at_all_is_refused();
}

#[test]
fn bad_key_from_the_environment_or_a_descriptor_is_refused() {
    PROXY.bad_key_from_the_environment_or_a_descriptor_is_refused();
}

#[test]
fn help_names_the_environment_and_never_the_key() {
    PROXY.help_names_the_environment_and_never_the_key();
}

#[test]
fn group_readable_key_is_refused() {
    PROXY.group_readable_key_is_refused();
}

#[test]
fn missing_key_file_is_refused() {
    PROXY.missing_key_file_is_refused();
}

#[test]
fn key_file_that_is_not_a_key_is_refused() {
    PROXY.key_file_that_is_not_a_key_is_refused();
}

/// [`support::config_error`] on `proxy.toml`.
fn config_error(text: &str, line: &str, detail: &str) {
    support::config_error(BIN, "proxy.toml", text, line, detail);
}

#[test]
fn unknown_field_in_a_forward_names_file_and_line() {
    config_error(
        "relay_url = \"http://127.0.0.1:1\"\nkey_file = \"alice.key\"\n\n[[forwards]]\nlisten = \"127.0.0.1:0\"\nserver = \"db\"\nport = \"postgres\"\nbogus = 1\n",
        "TOML parse error at line 8, column 1",
        "unknown field `bogus`",
    );
}

#[test]
fn unknown_top_level_field_names_file_and_line() {
    config_error(
        "relay_url = \"http://127.0.0.1:1\"\nname = \"alice\"\nkey_file = \"alice.key\"\n[[forwards]]\nlisten = \"127.0.0.1:0\"\nserver = \"db\"\nport = \"postgres\"\n",
        "TOML parse error at line 2, column 1",
        "unknown field `name`",
    );
}

#[test]
fn bad_listen_address_names_file_and_line() {
    config_error(
        "relay_url = \"http://127.0.0.1:1\"\nkey_file = \"alice.key\"\n[[forwards]]\nlisten = \"nowhere\"\nserver = \"db\"\nport = \"postgres\"\n",
        "TOML parse error at line 4, column 10",
        "invalid socket address syntax",
    );
}

#[test]
fn relay_url_scheme_names_file_and_line() {
    config_error(
        "key_file = \"alice.key\"\nrelay_url = \"ftp://127.0.0.1:1\"\n[[forwards]]\nlisten = \"127.0.0.1:0\"\nserver = \"db\"\nport = \"postgres\"\n",
        "TOML parse error at line 2, column 13",
        "must start with http:// or https://",
    );
}

#[test]
fn no_forwards_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = support::write_file(
        dir.path(),
        "proxy.toml",
        "relay_url = \"http://127.0.0.1:1\"\nkey_file = \"alice.key\"\nforwards = []\n",
    );
    let err = failure(&run_config(BIN, &config));
    assert_eq!(
        err,
        format!(
            "Error: {}: at least one [[forwards]] entry is needed\n",
            config.display()
        )
    );
}

#[test]
fn listen_address_in_use_is_named() {
    support::listen_address_in_use_is_named(BIN, |dir, addr| {
        assert!(PROXY.keygen(&dir.join("alice.key")).status.success());
        let text = format!(
            "relay_url = \"{}\"\nkey_file = \"alice.key\"\n[[forwards]]\nlisten = \"{addr}\"\nserver = \"db\"\nport = \"postgres\"\n",
            support::unreachable_relay_url()
        );
        support::write_file(dir, "proxy.toml", &text)
    });
}

#[test]
fn missing_config_file_is_named() {
    support::missing_config_file_is_named(BIN);
}

#[test]
fn missing_config_flag_is_explained() {
    PROXY.missing_config_flag_is_explained();
}

#[test]
fn invalid_log_filter_is_explained() {
    PROXY.invalid_log_filter_is_explained();
}

#[test]
fn help_shows_an_example_config() {
    support::help_contains(
        BIN,
        &[
            "Usage: ptth_proxy [OPTIONS]",
            "keygen",
            "--config <CONFIG>",
            "--log-level <LOG_LEVEL>",
            "Example proxy.toml:",
            "relay_url = \"https://relay.example.com\"",
            "[[forwards]]",
            "listen = \"127.0.0.1:6432\"",
            "ptth_proxy keygen --out alice.key",
        ],
    );
}

#[test]
fn version_prints_name_and_version() {
    support::version_prints_name_and_version(BIN);
}
