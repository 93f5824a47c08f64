//! Fuzz the safetensors reader: arbitrary bytes as a whole file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    coin::store::fuzz::safetensors_file(data);
});
