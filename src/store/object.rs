//! The object format on disk: a small binary header (magic, format version, kind, codec,
//! tensor dtype and shape) followed by the payload; and the canonical encoding an object id
//! hashes. docs/on-disk-format.md describes both byte by byte.

use std::io::Read;

use super::Dtype;

/// The first 8 bytes of every object file.
pub const MAGIC: [u8; 8] = *b"COINOBJ\0";
/// The object format version written by this coin; readers refuse other versions.
pub const OBJECT_FORMAT_VERSION: u16 = 1;
/// Object headers larger than this are refused as corrupt (a tensor of rank ~8000).
pub const MAX_OBJECT_HEADER_LEN: u32 = 64 * 1024;
/// Size of the fixed part of the header.
const FIXED_LEN: usize = 8 + 2 + 1 + 1 + 4 + 8;

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

/// How the payload is encoded on disk. Only `Raw` exists; the field is there so that a
/// compressed codec can be added without a new format version for old objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// The payload is stored as is.
    Raw,
}

impl Codec {
    fn code(self) -> u8 {
        match self {
            Codec::Raw => 0,
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
            tensor: None,
        }
    }

    /// The header of a raw tensor.
    pub fn tensor(dtype: Dtype, shape: Vec<u64>, len: u64) -> Self {
        ObjectHeader {
            kind: ObjectKind::Tensor,
            codec: Codec::Raw,
            payload_len: len,
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

    /// The on-disk header bytes (little-endian; see docs/on-disk-format.md).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&OBJECT_FORMAT_VERSION.to_le_bytes());
        out.push(self.kind.code());
        out.push(self.codec.code());
        out.extend_from_slice(&[0; 4]); // header length, patched below
        out.extend_from_slice(&self.payload_len.to_le_bytes());
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
        if version != OBJECT_FORMAT_VERSION {
            return Err(format!(
                "object format version {version} is not supported (this coin reads version {OBJECT_FORMAT_VERSION})"
            ));
        }
        let kind = match fixed[10] {
            1 => ObjectKind::Blob,
            2 => ObjectKind::Tensor,
            k => return Err(format!("unknown object kind {k}")),
        };
        let codec = match fixed[11] {
            0 => Codec::Raw,
            c => return Err(format!("unknown codec {c}")),
        };
        let header_len = u32::from_le_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]);
        let payload_len = u64::from_le_bytes(fixed[16..24].try_into().expect("8 bytes"));
        if header_len > MAX_OBJECT_HEADER_LEN || (header_len as usize) < FIXED_LEN {
            return Err(format!("bad header length {header_len}"));
        }
        let mut rest = vec![0u8; header_len as usize - FIXED_LEN];
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
            tensor,
        };
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
