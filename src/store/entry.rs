//! What a manifest records about one stored file ([`FileEntry`], [`TensorEntry`]) and what
//! the store returns ([`TensorData`], [`StoreStats`]).

use serde::{Deserialize, Serialize};

use super::{Dtype, ObjectId};

/// One file of a checkpoint directory, as recorded in a manifest (serde, tagged by `"kind"`:
/// `"blob"` or `"safetensors"`).
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
}

impl FileEntry {
    /// The size of the rebuilt file in bytes.
    pub fn size(&self) -> u64 {
        match self {
            FileEntry::Blob { size, .. } | FileEntry::Safetensors { size, .. } => *size,
        }
    }

    /// Check what an entry says about itself, without the store: every tensor's byte count is
    /// its dtype's size times its element count (no overflow), tensor names are unique, and
    /// the tensors do not add up to more than the file. Used on every manifest read, so a
    /// manifest from a remote is checked before anything trusts it.
    pub fn check(&self) -> Result<(), String> {
        let FileEntry::Safetensors { size, tensors, .. } = self else {
            return Ok(());
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
        }
    }
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
}
