//! The checks of a path's segments: names (`{server}`, `{port}`) and channel IDs. They never
//! panic, and what they accept is what they print.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ptth_common::config::Name;
use ptth_common::protocol::ChannelId;

fuzz_target!(|input: &[u8]| {
    let Ok(segment) = std::str::from_utf8(input) else {
        return;
    };
    if let Ok(name) = Name::try_from(segment.to_owned()) {
        assert_eq!(name.as_str(), segment);
        assert!(
            segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "{segment:?}"
        );
    }
    if let Ok(id) = segment.parse::<ChannelId>() {
        assert_eq!(id.to_string(), segment);
    }
});
