//! Checking an object file's bytes as they stream past (an upload being sent, a download
//! being read), without a store to write them into: the same checks as
//! [`Store::receive_object`](super::Store::receive_object) — a valid header, a payload whose
//! hash is the id, nothing after it.

use std::io::Read;

use super::codec::{self, DecodeError};
use super::object::{Codec, ObjectHeader};
use super::repo::hash_update;
use super::ObjectId;

/// The fixed part of a header, which holds the header's length.
const HEADER_PREFIX: usize = 24;
/// A compressed object's stored bytes are held until its end to be decoded; larger ones are
/// refused (compressed objects are written by `coin repack`, tensors up to a few GiB).
const MAX_BUFFERED: u64 = 8 << 30;
/// Longer headers are refused before buffering them (the decoder's own limit is lower).
const MAX_HEADER: usize = 1 << 20;

/// Feed an object file's bytes in any chunking with [`ObjectVerifier::update`], then
/// [`ObjectVerifier::finish`]: `Ok` only when they are exactly the object `id`.
pub struct ObjectVerifier {
    id: ObjectId,
    /// Header bytes seen while the header is incomplete.
    head: Vec<u8>,
    /// (decoded header, its length) once known.
    header: Option<(ObjectHeader, u64)>,
    hasher: Option<blake3::Hasher>,
    /// A compressed object's stored bytes, decoded at [`ObjectVerifier::finish`].
    stored: Vec<u8>,
    payload_seen: u64,
    total: u64,
}

impl ObjectVerifier {
    /// A verifier for object `id`.
    pub fn new(id: ObjectId) -> Self {
        ObjectVerifier {
            id,
            head: Vec::new(),
            header: None,
            hasher: None,
            stored: Vec::new(),
            payload_seen: 0,
            total: 0,
        }
    }

    /// Bytes seen so far.
    pub fn bytes(&self) -> u64 {
        self.total
    }

    /// The decoded header and its length, once enough bytes were seen.
    pub fn header(&self) -> Option<&(ObjectHeader, u64)> {
        self.header.as_ref()
    }

    /// Take the next bytes; an error is a reason (the bytes are not object `id`).
    pub fn update(&mut self, data: &[u8]) -> Result<(), String> {
        self.total += data.len() as u64;
        if self.header.is_some() {
            return self.payload(data);
        }
        self.head.extend_from_slice(data);
        if self.head.len() < HEADER_PREFIX {
            return Ok(());
        }
        let declared =
            u32::from_le_bytes([self.head[12], self.head[13], self.head[14], self.head[15]])
                as usize;
        if declared > MAX_HEADER {
            return Err(format!("bad header length {declared}"));
        }
        if self.head.len() < declared {
            return Ok(());
        }
        let mut cursor = self.head.as_slice();
        let (header, header_len) = ObjectHeader::decode(&mut cursor)?;
        if header.codec != Codec::Raw && header.stored_len > MAX_BUFFERED {
            return Err(format!(
                "a compressed object of {} bytes is more than can be checked while streaming",
                header.stored_len
            ));
        }
        let head = std::mem::take(&mut self.head);
        if header.codec == Codec::Raw {
            self.hasher = Some(header.id_hasher());
        }
        self.header = Some((header, header_len));
        self.payload(&head[header_len as usize..])
    }

    fn payload(&mut self, data: &[u8]) -> Result<(), String> {
        let Some((header, _)) = self.header.as_ref() else {
            return Err("no header".into());
        };
        if data.len() as u64 > header.stored_len - self.payload_seen {
            return Err("bytes follow the payload".into());
        }
        match self.hasher.as_mut() {
            Some(h) => hash_update(h, data),
            None => self.stored.extend_from_slice(data),
        }
        self.payload_seen += data.len() as u64;
        Ok(())
    }

    /// Whether what was fed is complete and is object `id`; returns its length in bytes.
    pub fn finish(self) -> Result<u64, String> {
        let Some((header, header_len)) = &self.header else {
            return Err(format!(
                "it ends inside the object header ({} bytes)",
                self.head.len()
            ));
        };
        if self.payload_seen < header.stored_len {
            return Err(format!(
                "it ends early ({} of {} payload bytes)",
                self.payload_seen, header.stored_len
            ));
        }
        let hash = match self.hasher {
            Some(h) => ObjectId::from(h.finalize()),
            None => {
                let hash = codec::decode(header, &mut self.stored.as_slice(), &mut |_| Ok(()))
                    .map_err(|e| match e {
                        DecodeError::Corrupt(reason) => reason,
                        DecodeError::Sink(e) => e.to_string(),
                    })?;
                ObjectId::from(hash)
            }
        };
        if hash != self.id {
            return Err("its content does not match its id".into());
        }
        Ok(header_len + header.stored_len)
    }

    /// Check everything `src` yields; an I/O error is a reason too.
    pub fn check_reader(id: ObjectId, src: &mut dyn Read) -> Result<u64, String> {
        let mut v = ObjectVerifier::new(id);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = src
                .read(&mut buf)
                .map_err(|e| format!("reading it failed ({e})"))?;
            if n == 0 {
                break;
            }
            v.update(&buf[..n])?;
        }
        v.finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::store::{Dtype, Store};

    #[test]
    fn any_chunking_accepts_the_object_and_refuses_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::init(&tmp.path().join("s")).unwrap();
        let blob = store.put_blob_bytes(&vec![7u8; 5000]).unwrap();
        let bytes = std::fs::read(store.object_path(&blob)).unwrap();
        for chunk in [1, 3, 23, 24, 25, 100, 4999, 1 << 20] {
            let mut v = ObjectVerifier::new(blob);
            for c in bytes.chunks(chunk) {
                v.update(c).unwrap();
            }
            assert_eq!(v.finish().unwrap(), bytes.len() as u64, "chunk {chunk}");
        }
        assert_eq!(
            ObjectVerifier::check_reader(blob, &mut bytes.as_slice()).unwrap(),
            bytes.len() as u64
        );
        // A flipped payload byte, a truncation, an extra byte, a wrong id.
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let e = ObjectVerifier::check_reader(blob, &mut bad.as_slice()).unwrap_err();
        assert!(e.contains("does not match"), "{e}");
        let e = ObjectVerifier::check_reader(blob, &mut &bytes[..last]).unwrap_err();
        assert!(e.contains("ends early"), "{e}");
        let e = ObjectVerifier::check_reader(blob, &mut &bytes[..10]).unwrap_err();
        assert!(e.contains("object header"), "{e}");
        let mut long = bytes.clone();
        long.push(0);
        let e = ObjectVerifier::check_reader(blob, &mut long.as_slice()).unwrap_err();
        assert!(e.contains("follow the payload"), "{e}");
        let other = ObjectId::from(blake3::hash(b"other"));
        assert!(ObjectVerifier::check_reader(other, &mut bytes.as_slice()).is_err());
        // Garbage is refused at the header.
        let e = ObjectVerifier::check_reader(blob, &mut vec![0u8; 64].as_slice()).unwrap_err();
        assert!(e.contains("magic"), "{e}");
    }

    #[test]
    fn tensor_objects_verify_with_their_header() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ck");
        std::fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..4096u32)
            .flat_map(|i| (i as f32).to_le_bytes())
            .collect();
        let st = safetensors::serialize(
            [(
                "w",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![64, 64], &data)
                    .unwrap(),
            )],
            None,
        )
        .unwrap();
        std::fs::write(dir.join("a.safetensors"), st).unwrap();
        let store = Store::init(&tmp.path().join("s")).unwrap();
        let entry = store.ingest_file(&dir.join("a.safetensors")).unwrap();
        let ids = entry.object_ids();
        let mut tensors = 0;
        for id in ids {
            let bytes = std::fs::read(store.object_path(&id)).unwrap();
            let mut v = ObjectVerifier::new(id);
            for c in bytes.chunks(7) {
                v.update(c).unwrap();
            }
            if v.header().is_some_and(|(h, _)| h.tensor.is_some()) {
                tensors += 1;
                assert_eq!(
                    v.header().and_then(|(h, _)| h.tensor.clone()).unwrap().0,
                    Dtype::F32
                );
            }
            v.finish().unwrap();
        }
        assert_eq!(tensors, 1);
    }
}
