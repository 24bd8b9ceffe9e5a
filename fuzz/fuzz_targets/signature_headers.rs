//! The relay's check of a request's `Signature-Input` and `Signature` headers, with any
//! method, path and header text: it never panics, and accepts only what the key signed.
//!
//! The relay knows the key of docs/protocol.md's worked example, at the time of that example:
//! the example's own headers (in the corpus) pass, and lead the fuzzer through every check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ptth_common::auth::{ReceivedHeaders, Verifier};
use ptth_common::keys::PrivateKey;

/// RFC 8032's test key 1.
const SECRET: [u8; 32] = [
    0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec, 0x2c, 0xc4,
    0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03, 0x1c, 0xae, 0x7f, 0x60,
];
/// What the worked example signs.
const METHOD: &str = "POST";
const PATH: &str = "/v1/servers/db/ports/postgres/connect";

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    // Fields separated by newlines: method, path, Signature-Input, Signature.
    let mut fields = text.splitn(4, '\n');
    let method = fields.next().unwrap_or_default();
    let path = fields.next().unwrap_or_default();
    let signature_input = fields.next();
    let signature = fields.next();
    let key = PrivateKey::from_seed(&SECRET);
    let verifier = Verifier::new([(key.public(), "alice")], 16);
    // The authority the caller says it signed for: tried only once the signature has failed.
    let received = ReceivedHeaders {
        input: signature_input,
        signature,
        signed_for: Some("other.example.com"),
    };
    let verified = verifier.verify(method, &["relay.example.com"], path, received, 1_700_000_000);
    if verified.is_ok() {
        assert_eq!(
            (method, path),
            (METHOD, PATH),
            "accepted what was not signed"
        );
    }
});
