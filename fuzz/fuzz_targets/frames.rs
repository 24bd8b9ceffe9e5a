//! The frame decoder, fed a channel body in arbitrary pieces: it never panics, and what it
//! decodes does not depend on where the body was split.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use ptth_common::frame::{Decoder, Item};

/// Decodes `body`, cut after each length in `cuts` (then the rest in one piece): the items,
/// with data items' bytes joined, and whether it ended in an error or mid-frame.
fn decode(body: &[u8], cuts: &[u8]) -> (Vec<Item>, Result<(), String>) {
    let mut decoder = Decoder::new();
    let mut items: Vec<Item> = Vec::new();
    let mut rest = body;
    let mut pieces = Vec::new();
    for &cut in cuts {
        let n = usize::from(cut).min(rest.len());
        pieces.push(&rest[..n]);
        rest = &rest[n..];
    }
    pieces.push(rest);
    for piece in pieces {
        let mut chunk = Bytes::copy_from_slice(piece);
        loop {
            match decoder.decode(&mut chunk) {
                Ok(Some(Item::Data(d))) => match items.last_mut() {
                    Some(Item::Data(last)) => {
                        let mut joined = last.to_vec();
                        joined.extend_from_slice(&d);
                        *last = Bytes::from(joined);
                    }
                    _ => items.push(Item::Data(d)),
                },
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(e) => return (items, Err(e.to_string())),
            }
        }
    }
    (items, decoder.finish().map_err(|e| e.to_string()))
}

fuzz_target!(|input: &[u8]| {
    // The first byte says how many of the next bytes are cut lengths.
    let Some((&n, rest)) = input.split_first() else {
        return;
    };
    let (cuts, body) = rest.split_at(usize::from(n % 16).min(rest.len()));
    let whole = decode(body, &[]);
    let split = decode(body, cuts);
    assert_eq!(format!("{whole:?}"), format!("{split:?}"), "cuts {cuts:?}");
    // `check` follows the same bytes without taking them apart, and never panics.
    let mut checker = Decoder::new();
    let _ = checker.check(body);
});
