//! Fuzz the one path validator (`store::check_relative_path`): an accepted path must stay in
//! its folder and never name git's directory.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    coin::store::fuzz::relative_path(data);
});
