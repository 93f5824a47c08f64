//! Compressed object payloads: an optional dtype-aware byte transform followed by zstd.
//!
//! The transform groups the bytes of each element by significance, so that the slowly
//! varying sign/exponent bytes of floats sit together and zstd finds their redundancy (the
//! idea of xet's BG4 byte grouping). It works on blocks of [`BLOCK`] raw bytes, so encoding
//! and decoding stream with bounded memory; zstd then compresses the transformed blocks as
//! one frame. The object id is always the hash of the raw (decoded) payload: the codec is
//! invisible to dedupe and verification. docs/on-disk-format.md has the byte layout.

use std::io::{self, Read, Write};

use super::object::{Codec, ObjectHeader};
use super::repo::hash_update;

/// Raw bytes per transform block (a multiple of every element width).
pub const BLOCK: usize = 1 << 20;
/// The zstd level `coin repack` uses unless told otherwise.
pub const DEFAULT_LEVEL: i32 = 3;
/// Highest zstd level accepted.
pub const MAX_LEVEL: i32 = 19;
/// A compressed object is kept only when it is at most this fraction of the raw payload.
pub const KEEP_RATIO: f64 = 0.97;
/// Objects smaller than this stay raw (a zstd frame's overhead eats the gain).
pub const MIN_COMPRESS_LEN: u64 = 256;

/// The codec `coin repack` chooses for an object: byte planes for tensors of 2-byte
/// elements, the high byte split off for 4- and 8-byte elements (smaller than all planes on
/// a trained f32 adapter, equal on generated LoRA matrices: docs/benchmarks.md), plain zstd
/// for everything else.
pub fn choose(header: &ObjectHeader) -> Codec {
    match element_width(header) {
        Some(2) => Codec::ZstdPlanes,
        Some(w) if w >= 4 => Codec::ZstdHighByte,
        _ => Codec::Zstd,
    }
}

/// Bytes per element of a tensor object whose elements are whole bytes; `None` for blobs
/// and sub-byte types.
pub fn element_width(header: &ObjectHeader) -> Option<usize> {
    let (dtype, _) = header.tensor.as_ref()?;
    let bits = dtype.bit_size();
    (bits % 8 == 0).then_some(bits / 8)
}

/// Whether `codec` may encode an object with this header (the transforms need whole-byte
/// elements of at least 2 bytes).
pub fn applies(codec: Codec, header: &ObjectHeader) -> bool {
    match codec {
        Codec::Raw | Codec::Zstd => true,
        Codec::ZstdPlanes | Codec::ZstdHighByte => element_width(header).is_some_and(|w| w >= 2),
    }
}

/// Apply `codec`'s byte transform to one block (`src` and `dst` of equal length). Bytes past
/// the last whole element are copied as they are.
pub fn transform(codec: Codec, width: usize, src: &[u8], dst: &mut [u8]) {
    match (codec, width) {
        (Codec::ZstdPlanes, 2) | (Codec::ZstdHighByte, 2) => split::<2>(src, dst, false),
        (Codec::ZstdPlanes, 4) => split::<4>(src, dst, false),
        (Codec::ZstdPlanes, 8) => split::<8>(src, dst, false),
        (Codec::ZstdHighByte, 4) => split::<4>(src, dst, true),
        (Codec::ZstdHighByte, 8) => split::<8>(src, dst, true),
        _ => dst.copy_from_slice(src),
    }
}

/// Undo [`transform`] for one block.
pub fn untransform(codec: Codec, width: usize, src: &[u8], dst: &mut [u8]) {
    match (codec, width) {
        (Codec::ZstdPlanes, 2) | (Codec::ZstdHighByte, 2) => join::<2>(src, dst, false),
        (Codec::ZstdPlanes, 4) => join::<4>(src, dst, false),
        (Codec::ZstdPlanes, 8) => join::<8>(src, dst, false),
        (Codec::ZstdHighByte, 4) => join::<4>(src, dst, true),
        (Codec::ZstdHighByte, 8) => join::<8>(src, dst, true),
        _ => dst.copy_from_slice(src),
    }
}

/// Elements of `W` bytes → `W` planes (byte 0 of every element, then byte 1, ...); with
/// `high_only`, the high-byte plane first and the other `W - 1` bytes of each element kept
/// together after it. The tail past the last whole element is copied.
fn split<const W: usize>(src: &[u8], dst: &mut [u8], high_only: bool) {
    let m = src.len() / W;
    let body = m * W;
    let (head, tail) = dst.split_at_mut(body);
    tail.copy_from_slice(&src[body..]);
    let elems = src[..body].chunks_exact(W);
    if high_only {
        let (high, low) = head.split_at_mut(m);
        for ((el, h), l) in elems.zip(high.iter_mut()).zip(low.chunks_exact_mut(W - 1)) {
            *h = el[W - 1];
            l.copy_from_slice(&el[..W - 1]);
        }
    } else {
        let mut planes: Vec<&mut [u8]> = head.chunks_exact_mut(m.max(1)).collect();
        for (i, el) in elems.enumerate() {
            for p in 0..W {
                planes[p][i] = el[p];
            }
        }
    }
}

/// Undo [`split`].
fn join<const W: usize>(src: &[u8], dst: &mut [u8], high_only: bool) {
    let m = src.len() / W;
    let body = m * W;
    let (head, tail) = dst.split_at_mut(body);
    tail.copy_from_slice(&src[body..]);
    let elems = head.chunks_exact_mut(W);
    if high_only {
        let (high, low) = src[..body].split_at(m);
        for ((el, h), l) in elems.zip(high.iter()).zip(low.chunks_exact(W - 1)) {
            el[W - 1] = *h;
            el[..W - 1].copy_from_slice(l);
        }
    } else {
        let planes: Vec<&[u8]> = src[..body].chunks_exact(m.max(1)).collect();
        for (i, el) in elems.enumerate() {
            for p in 0..W {
                el[p] = planes[p][i];
            }
        }
    }
}

/// Counts what passes through to the inner writer.
struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What [`encode`] did.
#[derive(Clone, Copy, Debug)]
pub struct Encoded {
    /// The id hash of the raw payload read (header prefix + bytes).
    pub hash: blake3::Hash,
    /// Bytes written to `out`.
    pub len: u64,
}

/// Read `header.payload_len` raw bytes from `src`, hash them as the object id does, and
/// write them encoded with `codec` (not `Raw`) at zstd `level` to `out`.
pub fn encode(
    header: &ObjectHeader,
    codec: Codec,
    level: i32,
    src: &mut dyn Read,
    out: &mut dyn Write,
) -> io::Result<Encoded> {
    let width = element_width(header).unwrap_or(1);
    let mut enc = zstd::stream::write::Encoder::new(Counting { inner: out, n: 0 }, level)?;
    enc.set_pledged_src_size(Some(header.payload_len))?;
    let cap = header.payload_len.min(BLOCK as u64) as usize;
    let mut raw = vec![0u8; cap];
    let mut grouped = vec![0u8; cap];
    let mut h = header.id_hasher();
    let mut left = header.payload_len;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        src.read_exact(&mut raw[..n])?;
        hash_update(&mut h, &raw[..n]);
        transform(codec, width, &raw[..n], &mut grouped[..n]);
        enc.write_all(&grouped[..n])?;
        left -= n as u64;
    }
    let counting = enc.finish()?;
    Ok(Encoded {
        hash: h.finalize(),
        len: counting.n,
    })
}

/// Why [`decode`] failed.
#[derive(Debug)]
pub enum DecodeError {
    /// The stored bytes are not a valid encoding of the header's payload.
    Corrupt(String),
    /// The sink failed.
    Sink(io::Error),
}

/// Decode a compressed payload from `src` (exactly the stored bytes), giving the raw bytes
/// to `sink` block by block. The decoded length must be exactly `header.payload_len`; more
/// is never decoded. Returns the id hash of the decoded payload.
pub fn decode(
    header: &ObjectHeader,
    src: &mut dyn Read,
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> Result<blake3::Hash, DecodeError> {
    let codec = header.codec;
    let width = element_width(header).unwrap_or(1);
    let mut dec = zstd::stream::read::Decoder::new(src)
        .map_err(|e| DecodeError::Corrupt(format!("the zstd decoder cannot start ({e})")))?;
    let cap = header.payload_len.min(BLOCK as u64) as usize;
    let mut grouped = vec![0u8; cap];
    let mut raw = vec![0u8; cap];
    let mut h = header.id_hasher();
    let mut left = header.payload_len;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        dec.read_exact(&mut grouped[..n]).map_err(|e| {
            DecodeError::Corrupt(if e.kind() == io::ErrorKind::UnexpectedEof {
                format!(
                    "the compressed payload decodes to fewer than the header's {} bytes",
                    header.payload_len
                )
            } else {
                format!("the compressed payload cannot be decoded ({e})")
            })
        })?;
        untransform(codec, width, &grouped[..n], &mut raw[..n]);
        hash_update(&mut h, &raw[..n]);
        sink(&raw[..n]).map_err(DecodeError::Sink)?;
        left -= n as u64;
    }
    let mut extra = [0u8; 1];
    match dec.read(&mut extra) {
        Ok(0) => Ok(h.finalize()),
        Ok(_) => Err(DecodeError::Corrupt(format!(
            "the compressed payload decodes to more than the header's {} bytes",
            header.payload_len
        ))),
        Err(e) => Err(DecodeError::Corrupt(format!(
            "the compressed payload cannot be decoded after its {} bytes ({e})",
            header.payload_len
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Dtype;
    use proptest::prelude::*;

    fn round_trip(header: &ObjectHeader, codec: Codec, data: &[u8]) {
        let mut enc = Vec::new();
        let e = encode(header, codec, 1, &mut &data[..], &mut enc).unwrap();
        assert_eq!(e.len, enc.len() as u64);
        let mut want = header.id_hasher();
        want.update(data);
        assert_eq!(e.hash, want.finalize());
        let mut h = header.clone();
        h.codec = codec;
        h.stored_len = e.len;
        let mut back = Vec::new();
        let got = decode(&h, &mut enc.as_slice(), &mut |b| {
            back.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        assert_eq!(back, data);
        assert_eq!(got, want.finalize());
    }

    fn tensor_header(dtype: Dtype, len: usize) -> ObjectHeader {
        let n = (len * 8 / dtype.bit_size()) as u64;
        ObjectHeader::tensor(dtype, vec![n], len as u64)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn every_codec_round_trips_every_dtype(
            dtype_i in 0usize..Dtype::ALL.len(),
            elems8 in 0usize..400,
            seed in any::<u64>(),
            codec_i in 0usize..3,
        ) {
            let dtype = Dtype::ALL[dtype_i];
            // A multiple of 8 elements is whole bytes for every dtype (4- and 6-bit ones too).
            let elems = elems8 * 8;
            let len = dtype.byte_len(elems as u64).unwrap() as usize;
            let mut x = seed | 1;
            let data: Vec<u8> = (0..len).map(|i| {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                // Mix runs and noise so zstd has something to find.
                if i % 5 == 0 { 0 } else { x as u8 }
            }).collect();
            let header = ObjectHeader::tensor(dtype, vec![elems as u64], len as u64);
            let codec = [Codec::Zstd, Codec::ZstdPlanes, Codec::ZstdHighByte][codec_i];
            if applies(codec, &header) {
                round_trip(&header, codec, &data);
            }
        }

        #[test]
        fn transform_is_a_permutation(width in 1usize..9, len in 0usize..200) {
            let src: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            for codec in [Codec::Zstd, Codec::ZstdPlanes, Codec::ZstdHighByte] {
                let mut dst = vec![0u8; len];
                transform(codec, width, &src, &mut dst);
                let mut back = vec![0u8; len];
                untransform(codec, width, &dst, &mut back);
                prop_assert_eq!(&back, &src);
                let mut a = src.clone();
                let mut b = dst.clone();
                a.sort_unstable();
                b.sort_unstable();
                prop_assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn multi_block_payloads_round_trip() {
        // Three blocks and a partial one, f32 and bf16.
        for dtype in [Dtype::F32, Dtype::BF16] {
            let len = 3 * BLOCK + 4096;
            let data: Vec<u8> = (0..len).map(|i| ((i / 2) % 7) as u8).collect();
            let header = tensor_header(dtype, len);
            round_trip(&header, Codec::ZstdPlanes, &data);
            round_trip(&header, Codec::ZstdHighByte, &data);
        }
        let blob = ObjectHeader::blob(BLOCK as u64 + 3);
        round_trip(&blob, Codec::Zstd, &vec![9u8; BLOCK + 3]);
    }

    #[test]
    fn planes_put_the_high_bytes_first_in_significance_order() {
        // Two bf16 elements: [lo0 hi0 lo1 hi1] -> [lo0 lo1 hi0 hi1].
        let mut dst = [0u8; 4];
        transform(Codec::ZstdPlanes, 2, &[1, 2, 3, 4], &mut dst);
        assert_eq!(dst, [1, 3, 2, 4]);
        // f32 high byte split: [a0 a1 a2 A, b0 b1 b2 B] -> [A B a0 a1 a2 b0 b1 b2].
        let mut dst = [0u8; 8];
        transform(
            Codec::ZstdHighByte,
            4,
            &[1, 2, 3, 10, 4, 5, 6, 20],
            &mut dst,
        );
        assert_eq!(dst, [10, 20, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn wrong_lengths_and_damage_are_refused() {
        let data: Vec<u8> = (0..8192u32)
            .flat_map(|i| ((i % 13) as f32).to_le_bytes())
            .collect();
        let header = tensor_header(Dtype::F32, data.len());
        let mut enc = Vec::new();
        let e = encode(&header, Codec::ZstdPlanes, 3, &mut &data[..], &mut enc).unwrap();
        let mut h = header.clone();
        h.codec = Codec::ZstdPlanes;
        h.stored_len = e.len;
        let sink = &mut |_: &[u8]| Ok(());
        // Header claims fewer bytes than the frame holds.
        let mut short = h.clone();
        short.payload_len -= 4;
        assert!(matches!(
            decode(&short, &mut enc.as_slice(), sink),
            Err(DecodeError::Corrupt(m)) if m.contains("more than")
        ));
        // Header claims more.
        let mut long = h.clone();
        long.payload_len += 4;
        assert!(matches!(
            decode(&long, &mut enc.as_slice(), sink),
            Err(DecodeError::Corrupt(m)) if m.contains("fewer")
        ));
        // A truncated frame.
        assert!(decode(&h, &mut &enc[..enc.len() - 3], sink).is_err());
        // Garbage instead of a frame.
        assert!(decode(&h, &mut &vec![0x55u8; 64][..], sink).is_err());
        // A flipped byte either fails to decode or decodes to other bytes (the id check).
        let mut want = header.id_hasher();
        want.update(&data);
        let want = want.finalize();
        for i in (0..enc.len()).step_by(7) {
            let mut bad = enc.clone();
            bad[i] ^= 0x10;
            if let Ok(got) = decode(&h, &mut bad.as_slice(), sink) {
                assert_ne!(got, want, "byte {i}");
            }
        }
    }
}
