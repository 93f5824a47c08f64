//! Fuzz the torch.save checkpoint reader: arbitrary bytes as a whole `.bin` file and as a bare
//! `data.pkl`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    coin::store::pickle::fuzz_torch_checkpoint(data);
});
