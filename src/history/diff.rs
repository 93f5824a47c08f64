//! Comparing two checkpoints: per-task score deltas from the eval records (a drop is marked as
//! forgetting), file changes, and tensor-level changes with the relative L2 norm of the change.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::store::{FileEntry, TensorEntry};

use super::checkpoint::Checkpoint;
use super::repo::CoinRepo;
use super::{CheckpointId, HistoryError};

/// The score change of one task between two checkpoints.
#[derive(Clone, Debug, Serialize)]
pub struct EvalDelta {
    /// The task.
    pub task: String,
    /// The metric (from B if present, else A).
    pub metric: String,
    /// Score in A, if recorded.
    pub a: Option<f64>,
    /// Score in B, if recorded.
    pub b: Option<f64>,
    /// B − A, when both are recorded.
    pub delta: Option<f64>,
    /// True when the score dropped (B < A).
    pub forgetting: bool,
}

/// A file-level change.
#[derive(Clone, Debug, Serialize)]
pub struct FileChange {
    /// The file's path in the checkpoint.
    pub path: String,
    /// `added`, `removed` or `changed`.
    pub change: String,
}

/// A tensor-level change inside a safetensors file present in both checkpoints (or a file
/// added/removed as a whole: then every tensor in it is listed).
#[derive(Clone, Debug, Serialize)]
pub struct TensorChange {
    /// The safetensors file.
    pub file: String,
    /// The tensor name.
    pub name: String,
    /// `added`, `removed` or `changed`.
    pub change: String,
    /// Dtype in B (or A for removed tensors).
    pub dtype: String,
    /// Shape in B (or A for removed tensors).
    pub shape: Vec<u64>,
    /// ‖B − A‖₂ / ‖A‖₂ for changed tensors of equal dtype class and shape.
    pub rel_l2: Option<f64>,
    /// Why `rel_l2` is missing, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Everything that differs between checkpoints A and B.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointDiff {
    /// Checkpoint A.
    pub a: CheckpointId,
    /// Checkpoint B.
    pub b: CheckpointId,
    /// Per-task score changes, sorted by task.
    pub eval: Vec<EvalDelta>,
    /// File changes, sorted by path.
    pub files: Vec<FileChange>,
    /// Tensor changes, sorted by file then name.
    pub tensors: Vec<TensorChange>,
    /// Tensors identical in both.
    pub unchanged_tensors: usize,
    /// B's forgetting relative to the best earlier score of each task on A's first-parent
    /// chain (see [`super::forgetting_along_path`]).
    pub forgetting: super::ForgettingReport,
}

/// Decode raw little-endian tensor bytes of a safetensors dtype into f64 values.
/// `None` for dtypes without a numeric meaning here (e.g. 8-bit floats).
pub(crate) fn decode_f64(dtype: &str, bytes: &[u8]) -> Option<Vec<f64>> {
    fn chunks<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        bytes.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        })
    }
    let v: Vec<f64> = match dtype {
        "F64" => chunks::<8>(bytes).map(f64::from_le_bytes).collect(),
        "F32" => chunks::<4>(bytes)
            .map(|b| f64::from(f32::from_le_bytes(b)))
            .collect(),
        "F16" => chunks::<2>(bytes)
            .map(|b| half::f16::from_le_bytes(b).to_f64())
            .collect(),
        "BF16" => chunks::<2>(bytes)
            .map(|b| half::bf16::from_le_bytes(b).to_f64())
            .collect(),
        "BOOL" | "U8" => bytes.iter().map(|&b| f64::from(b)).collect(),
        "I8" => bytes.iter().map(|&b| f64::from(b as i8)).collect(),
        "I16" => chunks::<2>(bytes)
            .map(|b| f64::from(i16::from_le_bytes(b)))
            .collect(),
        "U16" => chunks::<2>(bytes)
            .map(|b| f64::from(u16::from_le_bytes(b)))
            .collect(),
        "I32" => chunks::<4>(bytes)
            .map(|b| f64::from(i32::from_le_bytes(b)))
            .collect(),
        "U32" => chunks::<4>(bytes)
            .map(|b| f64::from(u32::from_le_bytes(b)))
            .collect(),
        "I64" => chunks::<8>(bytes)
            .map(|b| i64::from_le_bytes(b) as f64)
            .collect(),
        "U64" => chunks::<8>(bytes)
            .map(|b| u64::from_le_bytes(b) as f64)
            .collect(),
        _ => return None,
    };
    Some(v)
}

/// ‖b − a‖₂ / ‖a‖₂ (0 when both are zero; `None` when only A is zero or lengths differ).
pub(crate) fn relative_l2(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() {
        return None;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        num += (y - x) * (y - x);
        den += x * x;
    }
    if den == 0.0 {
        return if num == 0.0 { Some(0.0) } else { None };
    }
    Some((num / den).sqrt())
}

/// Whether a listed tensor is a view of a larger torch storage (its bytes are the storage's).
fn is_view(t: &TensorEntry) -> bool {
    let elements = t.shape.iter().try_fold(1u64, |n, d| n.checked_mul(*d));
    elements.and_then(|n| t.dtype.byte_len(n)) != Some(t.bytes)
}

/// The named tensors of a file (safetensors tensors, or a torch checkpoint's state-dict
/// tensors with the id of the storage they view); empty for a blob.
fn tensors_of(entry: &FileEntry) -> Vec<TensorEntry> {
    entry.named_tensors()
}

fn eval_deltas(a: &Checkpoint, b: &Checkpoint) -> Vec<EvalDelta> {
    let tasks: BTreeSet<&String> = a.evals.keys().chain(b.evals.keys()).collect();
    tasks
        .into_iter()
        .map(|task| {
            let ra = a.evals.get(task).map(|(r, _)| r);
            let rb = b.evals.get(task).map(|(r, _)| r);
            let metric = rb.or(ra).map(|r| r.metric.clone()).unwrap_or_default();
            let (sa, sb) = (ra.map(|r| r.score), rb.map(|r| r.score));
            let delta = match (sa, sb) {
                (Some(x), Some(y)) => Some(y - x),
                _ => None,
            };
            EvalDelta {
                task: task.clone(),
                metric,
                a: sa,
                b: sb,
                delta,
                forgetting: delta.is_some_and(|d| d < 0.0),
            }
        })
        .collect()
}

/// Compare checkpoints `a` and `b` of `repo`.
pub fn diff_checkpoints(
    repo: &CoinRepo,
    a: CheckpointId,
    b: CheckpointId,
) -> Result<CheckpointDiff, HistoryError> {
    let ca = repo.read_checkpoint(a)?;
    let cb = repo.read_checkpoint(b)?;
    let mut files = Vec::new();
    let mut tensors = Vec::new();
    let mut unchanged = 0;
    let paths: BTreeSet<&String> = ca
        .manifest
        .files
        .keys()
        .chain(cb.manifest.files.keys())
        .collect();
    let listed = |file: &str, t: &TensorEntry, change: &str| TensorChange {
        file: file.to_string(),
        name: t.name.clone(),
        change: change.to_string(),
        dtype: t.dtype.to_string(),
        shape: t.shape.clone(),
        rel_l2: None,
        note: None,
    };
    for path in paths {
        let ea = ca.manifest.files.get(path);
        let eb = cb.manifest.files.get(path);
        match (ea, eb) {
            (None, Some(e)) => {
                files.push(FileChange {
                    path: path.clone(),
                    change: "added".into(),
                });
                for t in &tensors_of(e) {
                    tensors.push(listed(path, t, "added"));
                }
            }
            (Some(e), None) => {
                files.push(FileChange {
                    path: path.clone(),
                    change: "removed".into(),
                });
                for t in &tensors_of(e) {
                    tensors.push(listed(path, t, "removed"));
                }
            }
            (Some(x), Some(y)) => {
                if x != y {
                    files.push(FileChange {
                        path: path.clone(),
                        change: "changed".into(),
                    });
                }
                let (xa, xb) = (tensors_of(x), tensors_of(y));
                let ta: BTreeMap<&str, &TensorEntry> =
                    xa.iter().map(|t| (t.name.as_str(), t)).collect();
                let tb: BTreeMap<&str, &TensorEntry> =
                    xb.iter().map(|t| (t.name.as_str(), t)).collect();
                let names: BTreeSet<&str> = ta.keys().chain(tb.keys()).copied().collect();
                for name in names {
                    match (ta.get(name), tb.get(name)) {
                        (None, Some(t)) => tensors.push(listed(path, t, "added")),
                        (Some(t), None) => tensors.push(listed(path, t, "removed")),
                        (Some(t1), Some(t2)) if t1.id == t2.id => unchanged += 1,
                        (Some(t1), Some(t2)) => {
                            let mut c = listed(path, t2, "changed");
                            if t1.shape != t2.shape {
                                c.note = Some(format!("shape changed from {:?}", t1.shape));
                            } else {
                                let da = repo.store().read_tensor(&t1.id)?;
                                let db = repo.store().read_tensor(&t2.id)?;
                                let va = decode_f64(&t1.dtype.to_string(), &da.data);
                                let vb = decode_f64(&t2.dtype.to_string(), &db.data);
                                match (va, vb) {
                                    (Some(va), Some(vb)) => {
                                        c.rel_l2 = relative_l2(&va, &vb);
                                        if c.rel_l2.is_none() {
                                            c.note = Some("the tensor in A is all zeros".into());
                                        } else if is_view(t2) {
                                            c.note = Some(
                                                "compared over its whole torch storage".into(),
                                            );
                                        }
                                    }
                                    _ => {
                                        c.note = Some(format!(
                                            "dtype {} is not compared numerically",
                                            t1.dtype
                                        ))
                                    }
                                }
                            }
                            tensors.push(c);
                        }
                        (None, None) => {}
                    }
                }
            }
            (None, None) => {}
        }
    }
    Ok(CheckpointDiff {
        a,
        b,
        eval: eval_deltas(&ca, &cb),
        files,
        tensors,
        unchanged_tensors: unchanged,
        forgetting: super::forgetting_along_path(repo, a, b)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_l2_values() {
        assert_eq!(relative_l2(&[3.0, 4.0], &[3.0, 4.0]), Some(0.0));
        let r = relative_l2(&[3.0, 4.0], &[0.0, 0.0]).unwrap();
        assert!((r - 1.0).abs() < 1e-12);
        let r = relative_l2(&[1.0, 0.0], &[1.0, 1.0]).unwrap();
        assert!((r - 1.0).abs() < 1e-12);
        assert_eq!(relative_l2(&[0.0], &[1.0]), None);
        assert_eq!(relative_l2(&[0.0], &[0.0]), Some(0.0));
        assert_eq!(relative_l2(&[1.0], &[1.0, 2.0]), None);
    }

    #[test]
    fn decode_dtypes() {
        let f32s: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(decode_f64("F32", &f32s).unwrap(), vec![1.5, -2.0]);
        let f16s: Vec<u8> = [half::f16::from_f32(0.5), half::f16::from_f32(-3.0)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(decode_f64("F16", &f16s).unwrap(), vec![0.5, -3.0]);
        let bf: Vec<u8> = half::bf16::from_f32(2.0).to_le_bytes().to_vec();
        assert_eq!(decode_f64("BF16", &bf).unwrap(), vec![2.0]);
        assert_eq!(decode_f64("I8", &[0xff]).unwrap(), vec![-1.0]);
        assert!(decode_f64("F8_E4M3", &[0]).is_none());
    }
}
