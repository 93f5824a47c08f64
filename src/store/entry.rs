//! What a manifest records about one stored file ([`FileEntry`], [`TensorEntry`]) and what
//! the store returns ([`TensorData`], [`StoreStats`]).

use serde::{Deserialize, Serialize};

use super::{Dtype, ObjectId};

/// One file of a checkpoint directory, as recorded in a manifest (serde, tagged by `"kind"`:
/// `"blob"`, `"safetensors"` or `"torchbin"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum FileEntry {
    /// Any non-safetensors file (config JSON, tokenizer, README, ...): one blob.
    Blob {
        /// The blob object.
        id: ObjectId,
        /// The file size in bytes.
        size: u64,
    },
    /// A safetensors file: its header bytes (the 8-byte length prefix + the JSON header exactly
    /// as on disk, padding included) as one blob, and one tensor object per tensor, in the
    /// order of their data offsets (the order their bytes follow the header in the file).
    Safetensors {
        /// The blob holding the length prefix and the JSON header.
        header: ObjectId,
        /// The file size in bytes.
        size: u64,
        /// The tensors, in file (data offset) order.
        tensors: Vec<TensorEntry>,
    },
    /// A `torch.save` zip checkpoint (`adapter_model.bin`, `non_lora_trainables.bin`, ...)
    /// that coin's safe reader accepts: the file with every tensor storage's bytes cut out
    /// (zip headers, `data.pkl`, padding, central directory: all verbatim) as one blob, and
    /// one tensor object per storage. The rebuild puts each storage back at its offset.
    Torchbin {
        /// The blob holding the file minus the storage bytes.
        layout: ObjectId,
        /// The file size in bytes.
        size: u64,
        /// blake3 of the whole file, checked when the file is rebuilt.
        file_hash: ObjectId,
        /// The storages, in file order (by `offset`).
        storages: Vec<StorageEntry>,
        /// The state dict's tensors, in the pickle's order (views of the storages).
        tensors: Vec<TorchTensorEntry>,
    },
}

impl FileEntry {
    /// The size of the rebuilt file in bytes.
    pub fn size(&self) -> u64 {
        match self {
            FileEntry::Blob { size, .. }
            | FileEntry::Safetensors { size, .. }
            | FileEntry::Torchbin { size, .. } => *size,
        }
    }

    /// Check what an entry says about itself, without the store: every tensor's byte count is
    /// its dtype's size times its element count (no overflow), tensor names are unique, and
    /// the tensors do not add up to more than the file. Used on every manifest read, so a
    /// manifest from a remote is checked before anything trusts it.
    pub fn check(&self) -> Result<(), String> {
        let (size, tensors) = match self {
            FileEntry::Blob { .. } => return Ok(()),
            FileEntry::Torchbin {
                size,
                storages,
                tensors,
                ..
            } => return check_torchbin(*size, storages, tensors),
            FileEntry::Safetensors { size, tensors, .. } => (size, tensors),
        };
        let mut names = std::collections::BTreeSet::new();
        let mut total: u64 = 0;
        for t in tensors {
            let shown = t.name.escape_debug();
            if !names.insert(t.name.as_str()) {
                return Err(format!("tensor '{shown}' is listed twice"));
            }
            let elements = t
                .shape
                .iter()
                .try_fold(1u64, |n, d| n.checked_mul(*d))
                .ok_or_else(|| format!("tensor '{shown}': the shape's element count overflows"))?;
            if t.dtype.byte_len(elements) != Some(t.bytes) {
                return Err(format!(
                    "tensor '{shown}': {} bytes do not hold {} {:?}",
                    t.bytes, t.dtype, t.shape
                ));
            }
            total = total
                .checked_add(t.bytes)
                .ok_or_else(|| "the tensor sizes overflow".to_string())?;
        }
        if total > *size {
            return Err(format!(
                "its tensors hold {total} bytes, more than the file's {size}"
            ));
        }
        Ok(())
    }

    /// Every object this entry refers to (for reachability in gc and fsck), header first.
    pub fn object_ids(&self) -> Vec<ObjectId> {
        match self {
            FileEntry::Blob { id, .. } => vec![*id],
            FileEntry::Safetensors {
                header, tensors, ..
            } => std::iter::once(*header)
                .chain(tensors.iter().map(|t| t.id))
                .collect(),
            FileEntry::Torchbin {
                layout, storages, ..
            } => std::iter::once(*layout)
                .chain(storages.iter().map(|s| s.id))
                .collect(),
        }
    }

    /// The tensors by name, for listing and diffing: a safetensors file's tensors, or a
    /// torch checkpoint's state-dict tensors, each with the id and byte count of the storage
    /// it views (tensors sharing a storage share its id); empty for a blob.
    pub fn named_tensors(&self) -> Vec<TensorEntry> {
        match self {
            FileEntry::Blob { .. } => Vec::new(),
            FileEntry::Safetensors { tensors, .. } => tensors.clone(),
            FileEntry::Torchbin {
                storages, tensors, ..
            } => {
                let by_key: std::collections::HashMap<&str, &StorageEntry> =
                    storages.iter().map(|s| (s.key.as_str(), s)).collect();
                tensors
                    .iter()
                    .filter_map(|t| {
                        let s = by_key.get(t.storage.as_str())?;
                        Some(TensorEntry {
                            name: t.name.clone(),
                            dtype: t.dtype,
                            shape: t.shape.clone(),
                            id: s.id,
                            bytes: s.bytes,
                        })
                    })
                    .collect()
            }
        }
    }
}

/// The checks of [`FileEntry::check`] for a torch checkpoint: storage keys unique, each
/// storage a whole number of elements, storages in file order without overlap and inside the
/// file; tensor names unique, each naming a listed storage of its dtype.
fn check_torchbin(
    size: u64,
    storages: &[StorageEntry],
    tensors: &[TorchTensorEntry],
) -> Result<(), String> {
    let mut keys = std::collections::BTreeMap::new();
    let mut end = 0u64;
    for s in storages {
        let shown = s.key.escape_debug();
        if keys.insert(s.key.as_str(), s.dtype).is_some() {
            return Err(format!("storage '{shown}' is listed twice"));
        }
        if s.numel().is_none() {
            return Err(format!(
                "storage '{shown}': {} bytes are not a whole number of {} elements",
                s.bytes, s.dtype
            ));
        }
        if s.offset < end {
            return Err(format!(
                "storage '{shown}' starts at byte {}, inside the previous storage",
                s.offset
            ));
        }
        end = s
            .offset
            .checked_add(s.bytes)
            .filter(|e| *e <= size)
            .ok_or_else(|| format!("storage '{shown}' ends beyond the file's {size} bytes"))?;
    }
    let mut names = std::collections::BTreeSet::new();
    for t in tensors {
        let shown = t.name.escape_debug();
        if !names.insert(t.name.as_str()) {
            return Err(format!("tensor '{shown}' is listed twice"));
        }
        match keys.get(t.storage.as_str()) {
            Some(d) if *d == t.dtype => {}
            Some(d) => {
                return Err(format!(
                    "tensor '{shown}' is {} but its storage '{}' is {d}",
                    t.dtype,
                    t.storage.escape_debug()
                ))
            }
            None => {
                return Err(format!(
                    "tensor '{shown}' views storage '{}', which is not listed",
                    t.storage.escape_debug()
                ))
            }
        }
    }
    Ok(())
}

/// One storage of a torch checkpoint (the zip entry `<prefix>/data/<key>`), stored as a
/// one-dimensional tensor object of `bytes / dtype size` elements.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageEntry {
    /// The storage key in `data.pkl` (the zip entry's last name component).
    pub key: String,
    /// The element type.
    pub dtype: Dtype,
    /// Where its bytes start in the file.
    pub offset: u64,
    /// Its byte count.
    pub bytes: u64,
    /// The tensor object.
    pub id: ObjectId,
}

impl StorageEntry {
    /// The element count, when `bytes` is a whole number of elements.
    pub fn numel(&self) -> Option<u64> {
        let es = self.dtype.size_in_bytes() as u64;
        if es == 0 {
            return None;
        }
        let n = self.bytes / es;
        (self.dtype.byte_len(n) == Some(self.bytes)).then_some(n)
    }
}

/// One tensor of a torch checkpoint's state dict: a view of a storage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TorchTensorEntry {
    /// The state-dict key.
    pub name: String,
    /// The element type.
    pub dtype: Dtype,
    /// The shape (empty for a scalar).
    pub shape: Vec<u64>,
    /// Stride per dimension, in elements.
    pub strides: Vec<u64>,
    /// The storage it views ([`StorageEntry::key`]).
    pub storage: String,
    /// Offset of its first element inside the storage, in elements.
    pub offset: u64,
}

/// One tensor of a safetensors file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    /// The tensor name (the key in the safetensors header).
    pub name: String,
    /// The element type.
    pub dtype: Dtype,
    /// The shape (empty for a scalar).
    pub shape: Vec<u64>,
    /// The tensor object.
    pub id: ObjectId,
    /// The data size in bytes.
    pub bytes: u64,
}

/// A tensor read back from the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorData {
    /// The element type.
    pub dtype: Dtype,
    /// The shape (empty for a scalar).
    pub shape: Vec<u64>,
    /// The raw little-endian bytes, exactly as they were in the safetensors file.
    pub data: Vec<u8>,
}

/// Totals over the objects of a store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    /// How many objects.
    pub objects: u64,
    /// Their size on disk in bytes, object headers included.
    pub stored_bytes: u64,
    /// Their decoded payload bytes (what they hold before compression, headers excluded).
    pub payload_bytes: u64,
    /// How many are compressed.
    pub compressed_objects: u64,
    /// Decoded payload bytes of the compressed objects.
    pub compressed_payload_bytes: u64,
    /// Bytes on disk of the compressed objects, headers included.
    pub compressed_stored_bytes: u64,
    /// How many of them are in packs.
    pub packed_objects: u64,
    /// How many pack files there are.
    pub packs: u64,
}
