//! Key parsing: a private key file's text (PKCS#8 PEM) and a public key (base64, as in
//! relay.toml). They never panic, and a key accepted gives itself back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ptth_common::keys::{PrivateKey, PublicKey};

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let _ = PrivateKey::from_pem(text);
    if let Ok(key) = PublicKey::from_base64(text) {
        let again = PublicKey::from_base64(&key.to_base64()).expect("its own encoding");
        assert_eq!(again.to_bytes(), key.to_bytes());
    }
});
