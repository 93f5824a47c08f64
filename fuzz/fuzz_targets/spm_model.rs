//! Fuzz the SentencePiece `tokenizer.model` reader, encoder and decoder: arbitrary bytes as a
//! whole file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    coin::ml::spm::fuzz_model(data);
});
