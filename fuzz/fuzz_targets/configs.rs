//! The three configuration files, from any text: they never panic, and each error names the
//! file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use ptth_common::config::{ProxyConfig, RelayConfig, ServerConfig};

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let path = Path::new("/etc/ptth/fuzz.toml");
    let errors = [
        RelayConfig::from_str(path, text)
            .err()
            .map(|e| e.to_string()),
        ServerConfig::from_str(path, text)
            .err()
            .map(|e| e.to_string()),
        ProxyConfig::from_str(path, text)
            .err()
            .map(|e| e.to_string()),
    ];
    for e in errors.into_iter().flatten() {
        assert!(e.contains("fuzz.toml"), "{e}");
    }
});
