//! Fuzz the manifest file-entry parser: arbitrary bytes as a FileEntry JSON.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    coin::store::fuzz::manifest_entry(data);
});
