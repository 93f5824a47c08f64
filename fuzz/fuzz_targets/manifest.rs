//! Fuzz the whole checkpoint manifest parser (`history::parse_manifest`): arbitrary bytes must
//! give a manifest or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = coin::history::parse_manifest(data);
});
