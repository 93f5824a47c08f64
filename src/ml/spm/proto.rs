//! The part of SentencePiece's `sentencepiece_model.proto` (proto2, package `sentencepiece`)
//! that coin reads, as `prost` messages. Field numbers are the proto's; fields coin does not
//! need are skipped by the decoder as unknown fields.

/// `ModelProto`: the whole `tokenizer.model` file.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    /// The vocabulary, in id order.
    #[prost(message, repeated, tag = "1")]
    pub pieces: Vec<Piece>,
    /// How the model was trained (model type, special ids, byte fallback).
    #[prost(message, optional, tag = "2")]
    pub trainer_spec: Option<TrainerSpec>,
    /// How text is normalized before encoding.
    #[prost(message, optional, tag = "3")]
    pub normalizer_spec: Option<NormalizerSpec>,
    /// How text is denormalized after decoding.
    #[prost(message, optional, tag = "5")]
    pub denormalizer_spec: Option<NormalizerSpec>,
}

/// `ModelProto.SentencePiece`: one vocabulary entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Piece {
    /// The piece text (`▁` for a space).
    #[prost(string, optional, tag = "1")]
    pub piece: Option<String>,
    /// The merge priority (BPE) or log probability (unigram).
    #[prost(float, optional, tag = "2")]
    pub score: Option<f32>,
    /// `Type`: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
    #[prost(int32, optional, tag = "3")]
    pub r#type: Option<i32>,
}

/// `TrainerSpec`, the fields that change encoding or decoding.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TrainerSpec {
    /// `ModelType`: 1 unigram (the default), 2 BPE, 3 word, 4 char.
    #[prost(int32, optional, tag = "3")]
    pub model_type: Option<i32>,
    /// A space ends a piece instead of starting it.
    #[prost(bool, optional, tag = "24")]
    pub treat_whitespace_as_suffix: Option<bool>,
    /// Unknown characters become `<0xNN>` byte pieces.
    #[prost(bool, optional, tag = "35")]
    pub byte_fallback: Option<bool>,
    /// What `<unk>` decodes to (default `" ⁇ "`).
    #[prost(string, optional, tag = "44")]
    pub unk_surface: Option<String>,
}

/// `NormalizerSpec`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NormalizerSpec {
    /// The rule name (`identity`, `nmt_nfkc`, …).
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// A compiled character map (empty for `identity`).
    #[prost(bytes = "vec", optional, tag = "2")]
    pub precompiled_charsmap: Option<Vec<u8>>,
    /// Prepend `▁` to the text (default true).
    #[prost(bool, optional, tag = "3")]
    pub add_dummy_prefix: Option<bool>,
    /// Drop leading and trailing spaces and squeeze runs (default true).
    #[prost(bool, optional, tag = "4")]
    pub remove_extra_whitespaces: Option<bool>,
    /// Replace a space with `▁` (default true).
    #[prost(bool, optional, tag = "5")]
    pub escape_whitespaces: Option<bool>,
}
