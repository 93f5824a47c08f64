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
