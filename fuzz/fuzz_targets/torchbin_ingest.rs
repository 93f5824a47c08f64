//! Fuzz storing a `.bin` checkpoint per tensor storage: arbitrary bytes are ingested into a
//! fresh store and rebuilt, which must give the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    coin::store::fuzz::torchbin_ingest(data);
});
