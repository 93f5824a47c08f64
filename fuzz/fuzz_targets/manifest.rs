//! Fuzz the whole checkpoint manifest parser (`history::parse_manifest`): arbitrary bytes must
//! give a manifest or an error, never a panic; an accepted manifest names only safe paths that
//! can all exist in one folder, and serialises back to a manifest that parses the same.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    coin::history::fuzz_manifest(data);
});
