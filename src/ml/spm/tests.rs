//! Every golden of `tests/fixtures/spm/goldens.json` (sentencepiece 0.1.99, transformers
//! 4.31.0) against coin's reader, and hostile model files.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::model::{SpmError, SpmModel};
use super::slow::SlowTokenizer;
use crate::ml::config::ImageToken;
use crate::ml::llava::Segment;
use crate::ml::template::PromptTokenizer;
use crate::ml::MlError;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm")
}

fn goldens() -> Value {
    let text = std::fs::read_to_string(fixtures().join("goldens.json")).expect("goldens");
    serde_json::from_str(&text).expect("json")
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_i64().expect("int"))
        .collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    ids(v).into_iter().map(|x| x as u32).collect()
}

fn settings() -> Vec<(String, Value)> {
    let g = goldens();
    let s = g["settings"].as_object().expect("settings");
    assert!(s.len() >= 7, "the goldens cover every setting");
    s.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[test]
fn encodings_match_the_slow_tokenizer() {
    for (name, s) in settings() {
        let tok = SlowTokenizer::from_dir(&fixtures().join(&name)).expect("loads");
        assert_eq!(Some(tok.legacy()), s["legacy"].as_bool(), "{name}: legacy");
        let mut n = 0;
        for case in s["texts"].as_array().expect("texts") {
            let text = case["text"].as_str().expect("text");
            let toks = tok.tokenize(text);
            let pieces: Vec<&str> = toks.iter().map(|t| t.piece.as_str()).collect();
            let want: Vec<&str> = case["tokens"]
                .as_array()
                .expect("tokens")
                .iter()
                .map(|t| t.as_str().expect("s"))
                .collect();
            assert_eq!(pieces, want, "{name}: tokens of {text:?}");
            assert_eq!(
                tok.encode(text, true),
                u32s(&case["ids"]),
                "{name}: ids of {text:?}"
            );
            assert_eq!(
                tok.encode(text, false),
                u32s(&case["ids_no_special"]),
                "{name}: ids without specials of {text:?}"
            );
            let dec = tok.decode(&u32s(&case["ids"])).expect("decodes");
            assert_eq!(
                dec,
                case["decoded"].as_str().expect("s"),
                "{name}: decode of {text:?}"
            );
            n += 1;
        }
        assert!(n > 30, "{name}: {n} texts");
    }
}

#[test]
fn decodes_match_the_slow_tokenizer() {
    for (name, s) in settings() {
        let tok = SlowTokenizer::from_dir(&fixtures().join(&name)).expect("loads");
        for case in s["decodes"].as_array().expect("decodes") {
            let ids = u32s(&case["ids"]);
            let dec = tok.decode(&ids).expect("decodes");
            assert_eq!(dec, case["decoded"].as_str().expect("s"), "{name}: {ids:?}");
        }
    }
}

fn flatten(segs: &[Segment]) -> Vec<i64> {
    let mut out = Vec::new();
    for s in segs {
        match s {
            Segment::Text(t) => out.extend(t.iter().map(|&x| i64::from(x))),
            Segment::Image => out.push(-200),
        }
    }
    out
}

#[test]
fn prompts_match_tokenizer_image_token() {
    for (name, s) in settings() {
        let dir = fixtures().join(&name);
        let tok = PromptTokenizer::from_spm_dir(&dir, ImageToken::Placeholder).expect("loads");
        for case in s["prompts"].as_array().expect("prompts") {
            let prompt = case["prompt"].as_str().expect("s");
            let want = ids(&case["ids"]);
            let segs = tok.encode_prompt(prompt).expect("encodes");
            assert_eq!(flatten(&segs), want, "{name}: {prompt:?}");
            let (segs2, ranges) = tok.encode_prompt_with_offsets(prompt).expect("encodes");
            assert_eq!(flatten(&segs2), want, "{name}: {prompt:?} with offsets");
            let n_text = want.iter().filter(|&&x| x >= 0).count();
            assert_eq!(ranges.len(), n_text, "{name}: one range per text token");
            for &(a, b) in &ranges {
                assert!(
                    a <= b && b <= prompt.len(),
                    "{name}: range {a}..{b} of {prompt:?}"
                );
            }
        }
    }
}

#[test]
fn token_ranges_cover_the_text_they_came_from() {
    let tok = SlowTokenizer::from_dir(&fixtures().join("legacy_true")).expect("loads");
    let text = "USER: Café 12 ☃</s> next";
    let toks = tok.tokenize(text);
    let eos = toks.iter().find(|t| t.piece == "</s>").expect("eos");
    assert_eq!(&text[eos.range.0..eos.range.1], "</s>");
    let snow = toks
        .iter()
        .filter(|t| t.piece.starts_with("<0x"))
        .collect::<Vec<_>>();
    assert_eq!(snow.len(), 3, "☃ falls back to 3 bytes");
    assert!(snow.iter().all(|t| &text[t.range.0..t.range.1] == "☃"));
    assert_eq!(toks[0].range.0, 0, "{toks:?}");
    let first = toks
        .iter()
        .find(|t| t.range.1 > t.range.0)
        .expect("a token with text");
    assert!(
        text[first.range.0..first.range.1].starts_with('U'),
        "{toks:?}"
    );
    let legacy_false = SlowTokenizer::from_dir(&fixtures().join("legacy_false")).expect("loads");
    for t in legacy_false.tokenize("a ▁b</s>c") {
        assert!(
            t.range.0 <= t.range.1 && t.range.1 <= "a ▁b</s>c".len(),
            "{t:?}"
        );
    }
}

fn model_bytes() -> Vec<u8> {
    std::fs::read(fixtures().join("tiny.model")).expect("model")
}

#[test]
fn hostile_models_are_refused_not_misread() {
    let good = model_bytes();
    assert!(SpmModel::from_bytes(&good).is_ok());
    // Truncated anywhere, flipped bytes, garbage: an error or a model, never a panic.
    for cut in (0..good.len()).step_by(37) {
        super::fuzz_model(&good[..cut]);
    }
    for i in (0..good.len()).step_by(11) {
        let mut b = good.clone();
        b[i] ^= 0xA5;
        super::fuzz_model(&b);
    }
    assert!(matches!(
        SpmModel::from_bytes(b"not a protobuf at all"),
        Err(SpmError::Decode(_) | SpmError::Invalid(_) | SpmError::Unsupported(_))
    ));
    assert!(matches!(
        SpmModel::from_bytes(&[]),
        Err(SpmError::Unsupported(_))
    ));
}

fn edit(f: impl FnOnce(&mut super::proto::ModelProto)) -> Vec<u8> {
    use prost::Message;
    let mut p = super::proto::ModelProto::decode(model_bytes().as_slice()).expect("decodes");
    f(&mut p);
    p.encode_to_vec()
}

#[test]
fn unsupported_models_are_refused_with_the_reason() {
    let unigram = edit(|p| p.trainer_spec.as_mut().expect("t").model_type = Some(1));
    let e = SpmModel::from_bytes(&unigram).err().expect("refused");
    assert!(e.to_string().contains("unigram"), "{e}");
    let nfkc =
        edit(|p| p.normalizer_spec.as_mut().expect("n").precompiled_charsmap = Some(vec![1, 2, 3]));
    let e = SpmModel::from_bytes(&nfkc).err().expect("refused");
    assert!(e.to_string().contains("precompiled character map"), "{e}");
    let squeeze = edit(|p| {
        p.normalizer_spec
            .as_mut()
            .expect("n")
            .remove_extra_whitespaces = Some(true)
    });
    assert!(matches!(
        SpmModel::from_bytes(&squeeze),
        Err(SpmError::Unsupported(_))
    ));
    let dup = edit(|p| {
        let first = p.pieces[300].clone();
        p.pieces.push(first);
    });
    let e = SpmModel::from_bytes(&dup).err().expect("refused");
    assert!(e.to_string().contains("defined twice"), "{e}");
    let no_byte = edit(|p| {
        p.pieces.retain(|x| x.piece.as_deref() != Some("<0x41>"));
    });
    let e = SpmModel::from_bytes(&no_byte).err().expect("refused");
    assert!(e.to_string().contains("<0x41>"), "{e}");
    let no_unk = edit(|p| p.pieces[0].r#type = Some(1));
    assert!(matches!(
        SpmModel::from_bytes(&no_unk),
        Err(SpmError::Invalid(_))
    ));
}

#[test]
fn a_corrupt_tokenizer_model_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(fixtures().join("legacy_true").join(f), dir.path().join(f)).expect("copy");
    }
    let path = dir.path().join("tokenizer.model");
    crate::store::fsutil::write_atomic(&path, b"\x0a\xff\xff\xff\xff\x0fgarbage").expect("write");
    let err = SlowTokenizer::from_dir(dir.path()).err().expect("refused");
    assert!(matches!(err, MlError::SentencePiece { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn unused_pieces_are_split_back() {
    // Mark a merged piece unused: it must be resegmented into the pieces it came from, so the
    // text still round-trips.
    let tok = SlowTokenizer::from_dir(&fixtures().join("legacy_true")).expect("loads");
    let plain = tok.model().encode("the answer is");
    let merged = plain
        .iter()
        .find(|p| p.piece.chars().count() > 2)
        .expect("a merged piece")
        .piece
        .clone();
    let bytes = edit(|p| {
        for x in &mut p.pieces {
            if x.piece.as_deref() == Some(merged.as_str()) {
                x.r#type = Some(5);
            }
        }
    });
    let m = SpmModel::from_bytes(&bytes).expect("loads");
    let pieces = m.encode("the answer is");
    assert!(pieces.iter().all(|p| p.piece != merged), "{pieces:?}");
    let ids: Vec<u32> = pieces.iter().map(|p| p.id).collect();
    assert_eq!(m.decode(&ids).expect("decodes"), "the answer is");
}

mod loading {
    use candle_core::{DType, Device};

    use super::*;
    use crate::ml::generate::{generate, GenerateRequest, GenerateSettings};
    use crate::ml::image::{AspectMode, Rgb8};
    use crate::ml::llava::{load_model, ModelSource};
    use crate::ml::template::TokenizerBackend;
    use crate::ml::tiny::{write_tiny, TinyLayout, TinyOptions};

    /// A tiny model whose vocabulary covers the golden model's 700 pieces.
    fn tiny(dir: &Path, layout: TinyLayout) -> PathBuf {
        let corpus = std::fs::read_to_string(fixtures().join("corpus.txt")).expect("corpus");
        write_tiny(
            dir,
            &TinyOptions {
                seed: 3,
                layout,
                corpus: corpus.repeat(3),
                vocab_size: 760,
                ..TinyOptions::default()
            },
        )
        .expect("tiny model writes")
    }

    fn use_spm_files(dir: &Path, setting: &str) {
        for f in [
            "tokenizer.model",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            std::fs::copy(fixtures().join(setting).join(f), dir.join(f)).expect("copy");
        }
    }

    fn is_slow(b: &TokenizerBackend) -> bool {
        matches!(b, TokenizerBackend::Slow(_))
    }

    #[test]
    fn a_split_setup_with_only_tokenizer_model_generates_with_the_slow_tokenizer() {
        let t = tempfile::tempdir().expect("tmp");
        let llm = tiny(&t.path().join("split"), TinyLayout::Split);
        let clip = t.path().join("split/clip");
        let proj = t.path().join("split/mm_projector.safetensors");
        std::fs::remove_file(llm.join("tokenizer.json")).expect("rm");
        use_spm_files(&llm, "legacy_false");
        let src = ModelSource::resolve(&llm, Some(&clip), Some(&proj)).expect("resolves");
        let mut m = load_model(&src, &Device::Cpu, DType::F32).expect("loads");
        assert!(is_slow(&m.tokenizer.backend));
        assert!(
            m.model.config.text.vocab_size >= 700,
            "the tiny vocabulary covers the golden model: {}",
            m.model.config.text.vocab_size
        );
        let g = goldens();
        let want = ids(&g["settings"]["legacy_false"]["prompts"][0]["ids"]);
        let prompt = g["settings"]["legacy_false"]["prompts"][0]["prompt"]
            .as_str()
            .expect("s")
            .to_string();
        let segs = m.tokenizer.encode_prompt(&prompt).expect("encodes");
        assert_eq!(flatten(&segs), want);
        let img = Rgb8 {
            width: 8,
            height: 8,
            data: vec![120; 8 * 8 * 3],
        };
        let s = GenerateSettings {
            max_new_tokens: 4,
            aspect: AspectMode::Pad,
            return_logits: false,
            ignore_eos: true,
        };
        let out = generate(
            &mut m,
            None,
            &[GenerateRequest {
                prompt,
                image: Some(img),
            }],
            &s,
        )
        .expect("generates");
        assert_eq!(out[0].token_ids.len(), 4);
        let text = m.tokenizer.decode(&out[0].token_ids).expect("decodes");
        assert_eq!(
            out[0].text, text,
            "generation decodes with the slow tokenizer"
        );
    }

    #[test]
    fn which_tokenizer_file_wins_when_both_exist() {
        let t = tempfile::tempdir().expect("tmp");
        // Split setup: tokenizer.model, as LLaVA's use_fast=False.
        let llm = tiny(&t.path().join("split"), TinyLayout::Split);
        use_spm_files(&llm, "legacy_true");
        let src = ModelSource::resolve(
            &llm,
            Some(&t.path().join("split/clip")),
            Some(&t.path().join("split/mm_projector.safetensors")),
        )
        .expect("resolves");
        let m = load_model(&src, &Device::Cpu, DType::F32).expect("loads");
        assert!(is_slow(&m.tokenizer.backend));
        // llava-hf: tokenizer.json, unless tokenizer_config.json says use_fast=false.
        let hf = tiny(&t.path().join("hf"), TinyLayout::Hf);
        use_spm_files(&hf, "legacy_true");
        let src = ModelSource::resolve(&hf, None, None).expect("resolves");
        let m = load_model(&src, &Device::Cpu, DType::F32).expect("loads");
        assert!(!is_slow(&m.tokenizer.backend));
        let cfg_path = hf.join("tokenizer_config.json");
        let mut cfg: Value =
            serde_json::from_slice(&std::fs::read(&cfg_path).expect("read")).expect("json");
        cfg["use_fast"] = Value::Bool(false);
        crate::store::fsutil::write_atomic(&cfg_path, cfg.to_string()).expect("write");
        let m = load_model(&src, &Device::Cpu, DType::F32).expect("loads");
        assert!(is_slow(&m.tokenizer.backend));
    }
}
