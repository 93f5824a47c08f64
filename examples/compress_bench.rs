//! Compression of stored tensors, per codec variant: ratio (stored / raw payload bytes) and
//! MB/s of raw bytes for encode (hash + transform + zstd, what `coin repack` does per object)
//! and decode (zstd + inverse transform + hash, what checkout does), against plain zstd
//! measured in the same run; then the store end to end (ingest, repack, checkout) on one
//! tensor set. Run by bench/compress.sh.
//!
//!   cargo run --example compress_bench -- [ADAPTER.safetensors ...]
//!
//! Sets: generated LoRA A (U(-1/sqrt(in), 1/sqrt(in)), r 128 x 4096) and trained-like B
//! (N(0, std), 4096 x 128, std 1e-3 and 1e-2), each in f32 and bf16; and every given
//! safetensors file as stored (its float tensors) and converted to bf16.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Instant;

use coin::store::codec;
use coin::store::object::ObjectHeader;
use coin::store::{Codec, Dtype, Store};

struct Tensor {
    dtype: Dtype,
    shape: Vec<u64>,
    data: Vec<u8>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn gauss(&mut self) -> f64 {
        let u = self.unit().max(1e-300);
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

fn to_dtype(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn generated(rng: &mut Rng, dtype: Dtype) -> Vec<(String, Vec<Tensor>)> {
    let (r, d) = (128usize, 4096usize);
    let bound = 1.0 / (d as f64).sqrt();
    let a: Vec<f32> = (0..r * d)
        .map(|_| ((rng.unit() * 2.0 - 1.0) * bound) as f32)
        .collect();
    let mut sets = vec![(
        format!("LoRA A U(±1/64) {dtype} [128,4096]"),
        vec![Tensor {
            dtype,
            shape: vec![r as u64, d as u64],
            data: to_dtype(&a, dtype),
        }],
    )];
    for std in [1e-3, 1e-2] {
        let b: Vec<f32> = (0..r * d).map(|_| (rng.gauss() * std) as f32).collect();
        sets.push((
            format!("LoRA B N(0,{std:.0e}) {dtype} [4096,128]"),
            vec![Tensor {
                dtype,
                shape: vec![d as u64, r as u64],
                data: to_dtype(&b, dtype),
            }],
        ));
    }
    sets
}

/// The float tensors of a safetensors file as stored, and converted to bf16.
fn from_file(path: &Path) -> Vec<(String, Vec<Tensor>)> {
    let bytes = std::fs::read(path).expect("read the adapter");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors file");
    let name = path.display();
    let mut stored = Vec::new();
    let mut bf16 = Vec::new();
    for (_, view) in st.tensors() {
        let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
        let data = view.data().to_vec();
        match view.dtype() {
            safetensors::Dtype::F32 => {
                let values: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                bf16.push(Tensor {
                    dtype: Dtype::BF16,
                    shape: shape.clone(),
                    data: to_dtype(&values, Dtype::BF16),
                });
                stored.push(Tensor {
                    dtype: Dtype::F32,
                    shape,
                    data,
                });
            }
            safetensors::Dtype::BF16 => {
                bf16.push(Tensor {
                    dtype: Dtype::BF16,
                    shape,
                    data,
                });
            }
            _ => {}
        }
    }
    let mut sets = Vec::new();
    if !stored.is_empty() {
        sets.push((format!("{name} (F32, {} tensors)", stored.len()), stored));
    }
    if !bf16.is_empty() {
        sets.push((format!("{name} as BF16 ({} tensors)", bf16.len()), bf16));
    }
    sets
}

const VARIANTS: [(Codec, i32); 6] = [
    (Codec::Zstd, 1),
    (Codec::Zstd, 3),
    (Codec::ZstdPlanes, 1),
    (Codec::ZstdPlanes, 3),
    (Codec::ZstdHighByte, 1),
    (Codec::ZstdHighByte, 3),
];

/// (stored payload bytes, raw bytes, encode seconds, decode seconds) of a set under one variant;
/// each tensor is one object, as in the store.
fn measure(set: &[Tensor], codec: Codec, level: i32, reps: usize) -> (u64, u64, f64, f64) {
    let mut enc_s = f64::MAX;
    let mut dec_s = f64::MAX;
    let mut encoded: Vec<(ObjectHeader, Vec<u8>)> = Vec::new();
    for _ in 0..reps {
        encoded.clear();
        let t = Instant::now();
        for x in set {
            let h = ObjectHeader::tensor(x.dtype, x.shape.clone(), x.data.len() as u64);
            let mut out = Vec::with_capacity(x.data.len());
            let e = codec::encode(&h, codec, level, &mut x.data.as_slice(), &mut out).unwrap();
            encoded.push((h.with_codec(codec, e.len), out));
        }
        enc_s = enc_s.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for (h, bytes) in &encoded {
            codec::decode(h, &mut bytes.as_slice(), &mut |_| Ok(())).unwrap();
        }
        dec_s = dec_s.min(t.elapsed().as_secs_f64());
    }
    let raw: u64 = set.iter().map(|x| x.data.len() as u64).sum();
    let payload_stored: u64 = encoded.iter().map(|(_, b)| b.len() as u64).sum();
    (payload_stored, raw, enc_s, dec_s)
}

fn mbs(bytes: u64, s: f64) -> f64 {
    bytes as f64 / 1e6 / s.max(1e-9)
}

/// Hash-only floor: what a raw checkout verifies.
fn hash_floor(set: &[Tensor], reps: usize) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        for x in set {
            let h = ObjectHeader::tensor(x.dtype, x.shape.clone(), x.data.len() as u64);
            let mut hasher = h.id_hasher();
            hasher.update(&x.data);
            std::hint::black_box(hasher.finalize());
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn write_safetensors(path: &Path, set: &[Tensor]) {
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for (i, t) in set.iter().enumerate() {
        let end = off + t.data.len() as u64;
        header.insert(
            format!("t{i}"),
            serde_json::json!({"dtype": t.dtype.as_str(), "shape": t.shape, "data_offsets": [off, end]}),
        );
        off = end;
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    for t in set {
        bytes.extend_from_slice(&t.data);
    }
    coin::store::fsutil::write_atomic(path, &bytes).unwrap();
}

/// Ingest, checkout raw, repack, checkout compressed: seconds of each, and stored bytes.
fn end_to_end(set: &[Tensor]) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.safetensors");
    write_safetensors(&file, set);
    let raw: u64 = set.iter().map(|t| t.data.len() as u64).sum();
    let store = Store::init(&dir.path().join(".coin")).unwrap();
    let t = Instant::now();
    let entry = store.ingest_file(&file).unwrap();
    let ingest = t.elapsed().as_secs_f64();
    let t = Instant::now();
    store.materialize(&entry, &dir.path().join("out1")).unwrap();
    let checkout_raw = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let report = store.repack(codec::DEFAULT_LEVEL, &mut |_, _| {}).unwrap();
    let repack = t.elapsed().as_secs_f64();
    let t = Instant::now();
    store.materialize(&entry, &dir.path().join("out2")).unwrap();
    let checkout_z = t.elapsed().as_secs_f64();
    assert_eq!(
        std::fs::read(dir.path().join("out2")).ok(),
        std::fs::read(dir.path().join("out1")).ok()
    );
    let s = store.stats().unwrap();
    println!(
        "\nStore end to end ({} tensors, {:.1} MB): ingest {:.0} MB/s, repack {:.0} MB/s \
         ({} objects compressed), stored {:.3}x of the payload; checkout raw {:.0} MB/s, \
         compressed {:.0} MB/s ({:.2}x the raw checkout's time)",
        set.len(),
        raw as f64 / 1e6,
        mbs(raw, ingest),
        mbs(raw, repack),
        report.compressed,
        s.stored_bytes as f64 / s.payload_bytes as f64,
        mbs(raw, checkout_raw),
        mbs(raw, checkout_z),
        checkout_z / checkout_raw
    );
}

fn main() {
    let reps = 3;
    let mut rng = Rng(0x5eed_c01d_cafe_f00d);
    let mut sets = Vec::new();
    for dtype in [Dtype::BF16, Dtype::F32] {
        sets.extend(generated(&mut rng, dtype));
    }
    for arg in std::env::args().skip(1) {
        sets.extend(from_file(Path::new(&arg)));
    }
    println!(
        "ratio = stored payload / raw payload (object headers excluded); MB/s of raw bytes, \
         best of {reps}; encode includes the id hash, decode the verifying hash"
    );
    println!(
        "\n| set | MB | variant | ratio | vs zstd-3 | encode MB/s | decode MB/s | hash-only MB/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, set) in &sets {
        let floor = hash_floor(set, reps);
        let mut base = None;
        let results: Vec<_> = VARIANTS
            .iter()
            .map(|&(c, l)| (c, l, measure(set, c, l, reps)))
            .collect();
        for (c, l, r) in &results {
            if *c == Codec::Zstd && *l == 3 {
                base = Some(r.0 as f64 / r.1 as f64);
            }
        }
        for (c, l, (stored, raw, e, d)) in results {
            let ratio = stored as f64 / raw as f64;
            println!(
                "| {name} | {:.2} | {}-{l} | {ratio:.3} | {:.3} | {:.0} | {:.0} | {:.0} |",
                raw as f64 / 1e6,
                c.as_str(),
                ratio / base.unwrap_or(ratio),
                mbs(raw, e),
                mbs(raw, d),
                mbs(raw, floor),
            );
        }
    }
    // End to end on the generated bf16 set (A + two B).
    let mut rng = Rng(0x5eed_c01d_cafe_f00d);
    let set: Vec<Tensor> = generated(&mut rng, Dtype::BF16)
        .into_iter()
        .flat_map(|(_, s)| s)
        .collect();
    end_to_end(&set);
}
