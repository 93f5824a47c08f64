//! The object format on disk: a small binary header (magic, format version, kind, codec,
//! tensor dtype and shape) followed by the payload; and the canonical encoding an object id
//! hashes. docs/on-disk-format.md describes both byte by byte.

use std::io::Read;

use super::Dtype;

/// The first 8 bytes of every object file.
pub const MAGIC: [u8; 8] = *b"COINOBJ\0";
/// The object format version of raw objects (unchanged since the first coin, so every
/// coin reads them).
pub const OBJECT_FORMAT_VERSION: u16 = 1;
/// The object format version of compressed objects: the v1 header plus the stored length.
/// A coin that predates compression refuses them with a clear "version 2" error.
pub const COMPRESSED_FORMAT_VERSION: u16 = 2;
/// Object headers larger than this are refused as corrupt (a tensor of rank ~8000).
pub const MAX_OBJECT_HEADER_LEN: u32 = 64 * 1024;
/// Size of the fixed part of a v1 header.
const FIXED_LEN: usize = 8 + 2 + 1 + 1 + 4 + 8;
/// Size of the fixed part of a v2 header (the stored length follows the payload length).
const FIXED_LEN_V2: usize = FIXED_LEN + 8;

/// What an object holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    /// Any bytes.
    Blob,
    /// Raw tensor bytes with a dtype and shape.
    Tensor,
}

impl ObjectKind {
    fn code(self) -> u8 {
        match self {
            ObjectKind::Blob => 1,
            ObjectKind::Tensor => 2,
        }
    }

    /// The lowercase name (`blob`, `tensor`).
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Blob => "blob",
            ObjectKind::Tensor => "tensor",
        }
    }
}

/// How the payload is encoded on disk (`store::codec`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Codec {
    /// The payload is stored as is (format version 1).
    Raw,
    /// One zstd frame of the payload (format version 2).
    Zstd,
    /// The bytes of each element grouped into planes by significance, per 1 MiB block,
    /// then one zstd frame (tensors of 2-, 4- or 8-byte elements; format version 2).
    ZstdPlanes,
    /// The high (sign/exponent) byte of each element split off, the other bytes kept
    /// together, per 1 MiB block, then one zstd frame (format version 2).
    ZstdHighByte,
}

impl Codec {
    fn code(self) -> u8 {
        match self {
            Codec::Raw => 0,
            Codec::Zstd => 1,
            Codec::ZstdPlanes => 2,
            Codec::ZstdHighByte => 3,
        }
    }

    fn from_code(code: u8) -> Option<Codec> {
        Some(match code {
            0 => Codec::Raw,
            1 => Codec::Zstd,
            2 => Codec::ZstdPlanes,
            3 => Codec::ZstdHighByte,
            _ => return None,
        })
    }

    /// The lowercase name (`raw`, `zstd`, `zstd-planes`, `zstd-highbyte`).
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::Zstd => "zstd",
            Codec::ZstdPlanes => "zstd-planes",
            Codec::ZstdHighByte => "zstd-highbyte",
        }
    }
}

/// The decoded header of an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectHeader {
    /// Blob or tensor.
    pub kind: ObjectKind,
    /// Payload encoding.
    pub codec: Codec,
    /// Length of the decoded payload in bytes.
    pub payload_len: u64,
    /// Length of the payload as stored after the header: `payload_len` for `Raw`, the
    /// encoded length otherwise.
    pub stored_len: u64,
    /// dtype and shape, for tensors.
    pub tensor: Option<(Dtype, Vec<u64>)>,
}

impl ObjectHeader {
    /// The header of a raw blob of `len` bytes.
    pub fn blob(len: u64) -> Self {
        ObjectHeader {
            kind: ObjectKind::Blob,
            codec: Codec::Raw,
            payload_len: len,
            stored_len: len,
            tensor: None,
        }
    }

    /// The header of a raw tensor.
    pub fn tensor(dtype: Dtype, shape: Vec<u64>, len: u64) -> Self {
        ObjectHeader {
            kind: ObjectKind::Tensor,
            codec: Codec::Raw,
            payload_len: len,
            stored_len: len,
            tensor: Some((dtype, shape)),
        }
    }

    /// The bytes an object id hashes before the payload:
    /// `blob <len>\0` or `tensor <dtype> [<d0>,<d1>,...] <len>\0`. Independent of the
    /// on-disk codec and format version.
    pub fn id_prefix(&self) -> Vec<u8> {
        match &self.tensor {
            None => format!("blob {}\0", self.payload_len).into_bytes(),
            Some((dtype, shape)) => {
                let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
                format!("tensor {dtype} [{}] {}\0", dims.join(","), self.payload_len).into_bytes()
            }
        }
    }

    /// A hasher that has already absorbed [`ObjectHeader::id_prefix`].
    pub fn id_hasher(&self) -> blake3::Hasher {
        let mut h = blake3::Hasher::new();
        h.update(&self.id_prefix());
        h
    }

    /// The same object stored with `codec` in `stored_len` bytes.
    pub fn with_codec(&self, codec: Codec, stored_len: u64) -> ObjectHeader {
        ObjectHeader {
            codec,
            stored_len: if codec == Codec::Raw {
                self.payload_len
            } else {
                stored_len
            },
            ..self.clone()
        }
    }

    /// The on-disk header bytes (little-endian; see docs/on-disk-format.md): version 1 for
    /// raw objects, version 2 (with the stored length) for compressed ones.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&MAGIC);
        let raw = self.codec == Codec::Raw;
        let version = if raw {
            OBJECT_FORMAT_VERSION
        } else {
            COMPRESSED_FORMAT_VERSION
        };
        out.extend_from_slice(&version.to_le_bytes());
        out.push(self.kind.code());
        out.push(self.codec.code());
        out.extend_from_slice(&[0; 4]); // header length, patched below
        out.extend_from_slice(&self.payload_len.to_le_bytes());
        if !raw {
            out.extend_from_slice(&self.stored_len.to_le_bytes());
        }
        if let Some((dtype, shape)) = &self.tensor {
            let name = dtype.as_str().as_bytes();
            out.push(name.len() as u8);
            out.extend_from_slice(name);
            out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
            for d in shape {
                out.extend_from_slice(&d.to_le_bytes());
            }
        }
        let len = out.len() as u32;
        out[12..16].copy_from_slice(&len.to_le_bytes());
        out
    }

    /// Read and check a header; returns it with its length in bytes. Errors are reasons
    /// ("bad magic", ...) for the caller to wrap with the object id.
    pub fn decode(r: &mut impl Read) -> Result<(ObjectHeader, u64), String> {
        let mut fixed = [0u8; FIXED_LEN];
        r.read_exact(&mut fixed)
            .map_err(|e| format!("cannot read the object header: {e}"))?;
        if fixed[..8] != MAGIC {
            return Err("bad magic (not a coin object)".into());
        }
        let version = u16::from_le_bytes([fixed[8], fixed[9]]);
        if version != OBJECT_FORMAT_VERSION && version != COMPRESSED_FORMAT_VERSION {
            return Err(format!(
                "object format version {version} is not supported (this coin reads versions {OBJECT_FORMAT_VERSION} and {COMPRESSED_FORMAT_VERSION})"
            ));
        }
        let kind = match fixed[10] {
            1 => ObjectKind::Blob,
            2 => ObjectKind::Tensor,
            k => return Err(format!("unknown object kind {k}")),
        };
        let codec = match Codec::from_code(fixed[11]) {
            Some(c) => c,
            None => return Err(format!("unknown codec {}", fixed[11])),
        };
        let v2 = version == COMPRESSED_FORMAT_VERSION;
        if v2 == (codec == Codec::Raw) {
            return Err(format!(
                "codec {} is not valid in object format version {version}",
                codec.as_str()
            ));
        }
        let header_len = u32::from_le_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]);
        let payload_len = u64::from_le_bytes(fixed[16..24].try_into().expect("8 bytes"));
        let fixed_len = if v2 { FIXED_LEN_V2 } else { FIXED_LEN };
        if header_len > MAX_OBJECT_HEADER_LEN || (header_len as usize) < fixed_len {
            return Err(format!("bad header length {header_len}"));
        }
        let stored_len = if v2 {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)
                .map_err(|e| format!("cannot read the object header: {e}"))?;
            u64::from_le_bytes(b)
        } else {
            payload_len
        };
        let mut rest = vec![0u8; header_len as usize - fixed_len];
        r.read_exact(&mut rest)
            .map_err(|e| format!("cannot read the object header: {e}"))?;
        let tensor = match kind {
            ObjectKind::Blob => {
                if !rest.is_empty() {
                    return Err("blob header has trailing bytes".into());
                }
                None
            }
            ObjectKind::Tensor => Some(decode_tensor_fields(&rest)?),
        };
        let header = ObjectHeader {
            kind,
            codec,
            payload_len,
            stored_len,
            tensor,
        };
        if !super::codec::applies(codec, &header) {
            return Err(format!(
                "codec {} does not apply to this object (it needs a tensor of 2-, 4- or 8-byte elements)",
                codec.as_str()
            ));
        }
        if let Some((dtype, shape)) = &header.tensor {
            let expected = shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .and_then(|n| dtype.byte_len(n));
            if expected != Some(payload_len) {
                return Err(format!(
                    "tensor header says {dtype} {shape:?} but {payload_len} bytes"
                ));
            }
        }
        Ok((header, header_len as u64))
    }
}

fn decode_tensor_fields(rest: &[u8]) -> Result<(Dtype, Vec<u64>), String> {
    let short = || "truncated tensor header".to_string();
    let (&n, rest) = rest.split_first().ok_or_else(short)?;
    let name = rest.get(..n as usize).ok_or_else(short)?;
    let rest = &rest[n as usize..];
    let dtype: Dtype = std::str::from_utf8(name)
        .map_err(|_| "dtype name is not UTF-8".to_string())?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let rank_bytes = rest.get(..4).ok_or_else(short)?;
    let rank = u32::from_le_bytes(rank_bytes.try_into().expect("4 bytes")) as usize;
    let dims = &rest[4..];
    if dims.len() != rank.checked_mul(8).ok_or_else(short)? {
        return Err(format!(
            "tensor header has rank {rank} but {} bytes of dims",
            dims.len()
        ));
    }
    let shape = dims
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Ok((dtype, shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        for h in [
            ObjectHeader::blob(0),
            ObjectHeader::blob(12345),
            ObjectHeader::tensor(Dtype::BF16, vec![2, 3], 12),
            ObjectHeader::tensor(Dtype::F32, vec![], 4),
            ObjectHeader::tensor(Dtype::F4, vec![4], 2),
        ] {
            let bytes = h.encode();
            let (back, len) = ObjectHeader::decode(&mut bytes.as_slice()).unwrap();
            assert_eq!(back, h);
            assert_eq!(len, bytes.len() as u64);
        }
    }

    #[test]
    fn compressed_headers_round_trip_as_version_2() {
        for (h, codec) in [
            (ObjectHeader::blob(5000), Codec::Zstd),
            (
                ObjectHeader::tensor(Dtype::BF16, vec![64, 32], 4096),
                Codec::ZstdPlanes,
            ),
            (
                ObjectHeader::tensor(Dtype::F32, vec![8], 32),
                Codec::ZstdHighByte,
            ),
            (ObjectHeader::tensor(Dtype::U8, vec![8], 8), Codec::Zstd),
        ] {
            let c = h.with_codec(codec, 77);
            let bytes = c.encode();
            assert_eq!(&bytes[8..10], &[2, 0]);
            assert_eq!(bytes[11], codec.code());
            let (back, len) = ObjectHeader::decode(&mut bytes.as_slice()).unwrap();
            assert_eq!(back, c);
            assert_eq!(back.stored_len, 77);
            assert_eq!(len, bytes.len() as u64);
            assert_eq!(len, h.encode().len() as u64 + 8);
            // The id prefix ignores the codec.
            assert_eq!(c.id_prefix(), h.id_prefix());
        }
        // Raw stays version 1, byte for byte as before compression existed.
        let raw = ObjectHeader::tensor(Dtype::BF16, vec![2], 4);
        assert_eq!(raw.with_codec(Codec::Raw, 999), raw);
    }

    #[test]
    fn version_1_objects_decode_from_their_documented_bytes() {
        // A v1 F32 [2] tensor header written by coin before compression existed.
        let mut v1 = Vec::new();
        v1.extend_from_slice(b"COINOBJ\0");
        v1.extend_from_slice(&[1, 0, 2, 0]); // version 1, tensor, raw
        v1.extend_from_slice(&40u32.to_le_bytes()); // header length
        v1.extend_from_slice(&8u64.to_le_bytes()); // payload length
        v1.extend_from_slice(&[3, b'F', b'3', b'2']);
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&2u64.to_le_bytes());
        assert_eq!(v1.len(), 40);
        let (h, len) = ObjectHeader::decode(&mut v1.as_slice()).unwrap();
        assert_eq!(h, ObjectHeader::tensor(Dtype::F32, vec![2], 8));
        assert_eq!((h.codec, h.stored_len, len), (Codec::Raw, 8, 40));
        assert_eq!(h.encode(), v1);
    }

    #[test]
    fn codecs_and_versions_must_agree() {
        // Version 1 with a compressed codec, version 2 with raw: refused.
        let mut bad = ObjectHeader::blob(10).encode();
        bad[11] = Codec::Zstd.code();
        assert!(ObjectHeader::decode(&mut bad.as_slice())
            .unwrap_err()
            .contains("not valid"));
        let mut bad = ObjectHeader::blob(10).with_codec(Codec::Zstd, 5).encode();
        bad[11] = Codec::Raw.code();
        assert!(ObjectHeader::decode(&mut bad.as_slice()).is_err());
        // Byte planes need whole-byte elements of 2+ bytes: not for blobs or U8.
        for h in [
            ObjectHeader::blob(10),
            ObjectHeader::tensor(Dtype::U8, vec![10], 10),
        ] {
            let mut bytes = h.with_codec(Codec::Zstd, 5).encode();
            bytes[11] = Codec::ZstdPlanes.code();
            assert!(ObjectHeader::decode(&mut bytes.as_slice())
                .unwrap_err()
                .contains("does not apply"));
        }
        // Unknown codecs and versions are named.
        let mut bytes = ObjectHeader::blob(10).encode();
        bytes[11] = 9;
        assert!(ObjectHeader::decode(&mut bytes.as_slice())
            .unwrap_err()
            .contains("unknown codec 9"));
        bytes[8] = 3;
        assert!(ObjectHeader::decode(&mut bytes.as_slice())
            .unwrap_err()
            .contains("version 3"));
    }

    #[test]
    fn id_prefix_is_the_documented_text() {
        assert_eq!(ObjectHeader::blob(5).id_prefix(), b"blob 5\0");
        assert_eq!(
            ObjectHeader::tensor(Dtype::F16, vec![2, 3], 12).id_prefix(),
            b"tensor F16 [2,3] 12\0"
        );
        assert_eq!(
            ObjectHeader::tensor(Dtype::F64, vec![], 8).id_prefix(),
            b"tensor F64 [] 8\0"
        );
    }

    #[test]
    fn broken_headers_are_refused() {
        let good = ObjectHeader::tensor(Dtype::F32, vec![2], 8).encode();
        // Every truncation fails.
        for n in 0..good.len() {
            assert!(ObjectHeader::decode(&mut &good[..n]).is_err(), "len {n}");
        }
        // Every single-byte change that is not a no-op fails or decodes to a different header
        // (the id check catches the rest).
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            if let Ok((h, _)) = ObjectHeader::decode(&mut bad.as_slice()) {
                assert_ne!(h, ObjectHeader::tensor(Dtype::F32, vec![2], 8), "byte {i}");
            }
        }
        // Shape and length must agree.
        let wrong = ObjectHeader::tensor(Dtype::F32, vec![3], 8).encode();
        assert!(ObjectHeader::decode(&mut wrong.as_slice()).is_err());
    }
}
