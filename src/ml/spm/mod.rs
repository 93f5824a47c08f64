//! SentencePiece `tokenizer.model` files and transformers' slow `LlamaTokenizer` over them.
//!
//! The CoIN split setup starts from Vicuna-7B-v1.5, whose folder has `tokenizer.model` and no
//! `tokenizer.json`, and LLaVA tokenizes with the slow tokenizer (`use_fast=False`). [`model`]
//! reads the protobuf ([`proto`], decoded by `prost`) and implements sentencepiece's BPE
//! encoder and decoder; [`slow`] adds what transformers 4.31.0's `LlamaTokenizer` does around
//! it (special tokens, `legacy`, BOS). Goldens from the real libraries are in
//! `tests/fixtures/spm/`.

pub mod model;
pub mod proto;
pub mod slow;

pub use model::{SpmError, SpmModel};
pub use slow::SlowTokenizer;

#[cfg(test)]
mod tests;

/// The body of the `spm_model` fuzz target (also run by the unit tests on a hostile corpus):
/// arbitrary bytes as a `tokenizer.model`. Reading must fail cleanly or give a model that
/// encodes and decodes without panicking.
pub fn fuzz_model(data: &[u8]) {
    if let Ok(m) = SpmModel::from_bytes(data) {
        for text in ["", " ", "What color is the cube? 12", "a  b\n☃ ▁ <s>"] {
            let ids: Vec<u32> = m.encode(text).iter().map(|p| p.id).collect();
            let _ = m.decode(&ids);
        }
        let all: Vec<u32> = (0..m.len().min(4096) as u32).collect();
        let _ = m.decode(&all);
    }
}
