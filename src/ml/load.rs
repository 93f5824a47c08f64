//! Reading checkpoints: safetensors (single or sharded), PyTorch zip pickles, and the layouts of
//! llava-hf (old `language_model.model.*` and new `model.language_model.*`) and of the CoIN
//! split setup (a LLaMA dir + a CLIP dir + a projector file).
//!
//! Tensors are read once into a [`TensorStore`] (converted to the run dtype on the run device);
//! the modules then take them by name through a [`Vb`] with shape checks, so a missing tensor or
//! a wrong shape is reported with its full name and the files searched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde_json::Value;

use super::config::{read_json, LlavaConfig};
use super::error::escape_name;
use super::{MlError, Result};
use crate::store::fsutil::write_atomic;
use crate::store::pickle::{Limits, TorchZip};
use crate::store::Dtype;

/// Named tensors on the run device.
pub struct TensorStore {
    map: HashMap<String, Tensor>,
    desc: String,
}

impl TensorStore {
    /// An empty store described as `desc` in error messages.
    pub fn new(desc: impl Into<String>) -> Self {
        TensorStore {
            map: HashMap::new(),
            desc: desc.into(),
        }
    }

    /// Read checkpoint files (`.safetensors` or zip `.bin`), converting floats to `dtype`.
    pub fn from_files(files: &[PathBuf], device: &Device, dtype: DType) -> Result<Self> {
        let desc = describe(files);
        let mut store = TensorStore::new(desc);
        for f in files {
            store.add_file(f, device, dtype, "")?;
        }
        Ok(store)
    }

    /// Add every tensor of one file, with `prefix` prepended to its names.
    pub fn add_file(
        &mut self,
        file: &Path,
        device: &Device,
        dtype: DType,
        prefix: &str,
    ) -> Result<()> {
        let tensors = read_tensor_file(file)?;
        for (name, t) in tensors {
            let t = if t.dtype().is_float() && t.dtype() != dtype {
                t.to_dtype(dtype)?
            } else {
                t
            };
            let t = t.to_device(device)?;
            self.map.insert(format!("{prefix}{name}"), t);
        }
        if !self.desc.contains(&file.display().to_string()) {
            self.desc = format!("{}, '{}'", self.desc, file.display());
        }
        Ok(())
    }

    /// Insert one tensor.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.map.insert(name.into(), t);
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// All names.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }

    /// A tensor by full name with a shape check.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.map.get(name).ok_or_else(|| MlError::MissingTensor {
            name: name.to_string(),
            source_desc: self.desc.clone(),
        })?;
        if t.dims() != shape {
            return Err(MlError::ShapeMismatch {
                name: name.to_string(),
                source_desc: self.desc.clone(),
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        Ok(t.clone())
    }

    /// A view under a name prefix.
    pub fn vb(&self, prefix: &str) -> Vb<'_> {
        Vb {
            store: self,
            prefix: prefix.to_string(),
        }
    }
}

/// A prefix into a [`TensorStore`]: `vb.pp("layers").pp(3).get(&[..], "weight")`.
#[derive(Clone)]
pub struct Vb<'a> {
    store: &'a TensorStore,
    prefix: String,
}

impl<'a> Vb<'a> {
    /// Descend into a sub-module.
    pub fn pp(&self, name: impl std::fmt::Display) -> Vb<'a> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Vb {
            store: self.store,
            prefix,
        }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// A tensor with a shape check.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        self.store.get(&self.full(name), shape)
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.full(name))
    }

    /// A linear layer `{prefix}.weight` (out, in) and optionally `{prefix}.bias`.
    pub fn linear(
        &self,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<super::linear::Linear> {
        let w = self.get(&[out_dim, in_dim], "weight")?;
        let b = if bias {
            Some(self.get(&[out_dim], "bias")?)
        } else {
            None
        };
        Ok(super::linear::Linear::new(w, b))
    }
}

fn describe(files: &[PathBuf]) -> String {
    let names: Vec<String> = files.iter().map(|f| format!("'{}'", f.display())).collect();
    names.join(", ")
}

/// Read every tensor of a `.safetensors` file or a PyTorch zip `.bin` (on the CPU, as stored),
/// sorted by name. A `.bin` is read with coin's own bounded reader ([`crate::store::pickle`]):
/// nothing in it is run, and its storages are read straight out of the zip. Floating-point
/// tensors must be finite ([`MlError::NonFinite`]). Nothing is written.
pub fn read_tensor_file(file: &Path) -> Result<Vec<(String, Tensor)>> {
    let meta = std::fs::metadata(file).map_err(|source| MlError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(MlError::OutsideFolder {
            path: file.to_path_buf(),
            dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
            problem: "is not a regular file in",
        });
    }
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut v = if name.ends_with(".safetensors") {
        read_safetensors(file)?
    } else {
        read_torch_zip(file)?
    };
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

fn read_safetensors(file: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(file).map_err(|source| MlError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    let not_st = |e: &dyn std::fmt::Display| MlError::Parse {
        path: file.to_path_buf(),
        message: format!("not a safetensors file: {e}"),
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| not_st(&e))?;
    for (name, view) in st.iter() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F64 => DType::F64,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            _ => continue,
        };
        check_finite(file, name, dtype, view.data())?;
    }
    let map =
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| not_st(&e))?;
    Ok(map.into_iter().collect())
}

/// The candle dtype of a torch storage type.
fn candle_dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::U8 => DType::U8,
        _ => return None,
    })
}

fn read_torch_zip(file: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut z = TorchZip::open(file, &Limits::default())?;
    let tensors = z.tensors().to_vec();
    let mut out = Vec::with_capacity(tensors.len());
    for t in &tensors {
        let dtype = candle_dtype(t.dtype).ok_or_else(|| MlError::Unsupported {
            path: file.to_path_buf(),
            message: format!(
                "the tensor '{}' has dtype {} (coin reads F32, F64, F16, BF16, I64, I32, I16 and U8)",
                escape_name(&t.name),
                t.dtype
            ),
        })?;
        let bytes = z.read_tensor(t)?;
        check_finite(file, &t.name, dtype, &bytes)?;
        let tensor = Tensor::from_raw_buffer(&bytes, dtype, &t.shape, &Device::Cpu)?;
        out.push((t.name.clone(), tensor));
    }
    Ok(out)
}

/// The first element of little-endian `bytes` of a float `dtype` that is NaN or infinite
/// (exponent bits all ones), and which; `None` for other dtypes. Large buffers are scanned in
/// parallel chunks.
fn first_non_finite(dtype: DType, bytes: &[u8]) -> Option<(usize, &'static str)> {
    fn scan<const N: usize>(
        bytes: &[u8],
        bad: impl Fn([u8; N]) -> Option<&'static str> + Sync,
    ) -> Option<(usize, &'static str)> {
        const CHUNK: usize = 1 << 20;
        let find = |chunk: &[u8]| {
            chunk.chunks_exact(N).enumerate().find_map(|(i, e)| {
                let a: [u8; N] = e.try_into().ok()?;
                bad(a).map(|what| (i, what))
            })
        };
        if bytes.len() <= CHUNK {
            return find(bytes);
        }
        bytes
            .par_chunks(CHUNK)
            .enumerate()
            .find_map_first(|(c, chunk)| find(chunk).map(|(i, w)| (c * (CHUNK / N) + i, w)))
    }
    let which = |mantissa_zero: bool| if mantissa_zero { "an infinity" } else { "NaN" };
    match dtype {
        DType::F32 => scan(bytes, |a: [u8; 4]| {
            let b = u32::from_le_bytes(a);
            (b & 0x7f80_0000 == 0x7f80_0000).then(|| which(b & 0x007f_ffff == 0))
        }),
        DType::F64 => scan(bytes, |a: [u8; 8]| {
            let b = u64::from_le_bytes(a);
            (b & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000)
                .then(|| which(b & 0x000f_ffff_ffff_ffff == 0))
        }),
        DType::BF16 => scan(bytes, |a: [u8; 2]| {
            let b = u16::from_le_bytes(a);
            (b & 0x7f80 == 0x7f80).then(|| which(b & 0x007f == 0))
        }),
        DType::F16 => scan(bytes, |a: [u8; 2]| {
            let b = u16::from_le_bytes(a);
            (b & 0x7c00 == 0x7c00).then(|| which(b & 0x03ff == 0))
        }),
        _ => None,
    }
}

/// Refuse a float tensor holding NaN or an infinity, naming the file and the tensor.
fn check_finite(file: &Path, name: &str, dtype: DType, bytes: &[u8]) -> Result<()> {
    match first_non_finite(dtype, bytes) {
        None => Ok(()),
        Some((index, value)) => Err(MlError::NonFinite {
            path: file.to_path_buf(),
            name: name.to_string(),
            index,
            value,
        }),
    }
}

/// Write tensors as a safetensors file (atomically).
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    for (name, t) in sorted {
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        let (code, bytes) = tensor_bytes(&t)?;
        let start = data.len();
        data.extend_from_slice(&bytes);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": code, "shape": t.dims(), "data_offsets": [start, data.len()]}),
        );
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut h = serde_json::to_vec(&Value::Object(header)).map_err(|source| MlError::Encode {
        what: "a safetensors header",
        source,
    })?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + data.len());
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    write_atomic(path, out).map_err(|source| MlError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Write a safetensors file one tensor at a time: `entries` name each tensor with its shape and
/// dtype (the header is written first), and `make(i)` builds entry `i` when its bytes are due,
/// so only one tensor is in memory at once (a 7B model's 14 GB need not fit twice). Entries are
/// written in name order, as [`write_safetensors`] does; the file appears atomically.
pub fn write_safetensors_streaming(
    path: &Path,
    entries: &[(String, Vec<usize>, DType)],
    mut make: impl FnMut(usize) -> Result<Tensor>,
) -> Result<()> {
    use std::io::Write;
    let werr = |source: std::io::Error| MlError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by(|&a, &b| entries[a].0.cmp(&entries[b].0));
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for &i in &order {
        let (name, shape, dtype) = &entries[i];
        let code = match dtype {
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            other => {
                return Err(MlError::Input(format!(
                    "cannot stream a {other:?} tensor '{name}' into '{}'",
                    path.display()
                )))
            }
        };
        let len = shape.iter().product::<usize>() * dtype.size_in_bytes();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": code, "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut h = serde_json::to_vec(&Value::Object(header)).map_err(|source| MlError::Encode {
        what: "a safetensors header",
        source,
    })?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut f = crate::store::fsutil::AtomicFile::create(path).map_err(werr)?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, f.file());
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(werr)?;
    w.write_all(&h).map_err(werr)?;
    for &i in &order {
        let (name, shape, dtype) = &entries[i];
        let t = make(i)?.to_device(&Device::Cpu)?.to_dtype(*dtype)?;
        if t.dims() != shape.as_slice() {
            return Err(MlError::Input(format!(
                "tensor '{name}' has shape {:?}, not the announced {shape:?}",
                t.dims()
            )));
        }
        let (_, bytes) = tensor_bytes(&t.contiguous()?)?;
        w.write_all(&bytes).map_err(werr)?;
    }
    w.flush().map_err(werr)?;
    drop(w);
    f.commit().map_err(werr)
}

fn tensor_bytes(t: &Tensor) -> Result<(&'static str, Vec<u8>)> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => (
            "F32",
            flat.to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::F64 => (
            "F64",
            flat.to_vec1::<f64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            "BF16",
            flat.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            "F16",
            flat.to_vec1::<half::f16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::I64 => (
            "I64",
            flat.to_vec1::<i64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::U32 => (
            "U32",
            flat.to_vec1::<u32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::U8 => ("U8", flat.to_vec1::<u8>()?),
        other => {
            return Err(MlError::Input(format!(
                "cannot write dtype {other:?} to safetensors"
            )))
        }
    })
}

/// The folder a model folder's files may resolve into: the folder itself or, for a Hugging Face
/// hub cache snapshot (`<repo>/snapshots/<rev>/`, whose files are links into `<repo>/blobs/`),
/// the repo folder.
fn containment_root(dir: &Path) -> Result<PathBuf> {
    let root = dir.canonicalize().map_err(|source| MlError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    if let Some(repo) = root
        .parent()
        .filter(|p| p.file_name() == Some(std::ffi::OsStr::new("snapshots")))
        .and_then(Path::parent)
    {
        if repo.join("blobs").is_dir() {
            return Ok(repo.to_path_buf());
        }
    }
    Ok(root)
}

/// Check that `file` (found in or named by the folder `dir`) resolves to a regular file inside
/// `dir` (links are followed, then the target must be inside; see [`containment_root`]).
pub fn check_inside(dir: &Path, file: &Path) -> Result<()> {
    let root = containment_root(dir)?;
    let real = file.canonicalize().map_err(|source| MlError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    let outside = |problem| MlError::OutsideFolder {
        path: file.to_path_buf(),
        dir: dir.to_path_buf(),
        problem,
    };
    if !real.starts_with(&root) {
        return Err(outside("resolves outside the folder"));
    }
    if !real.is_file() {
        return Err(outside("is not a regular file in"));
    }
    Ok(())
}

/// The checkpoint files of a model directory: the shards named by
/// `model.safetensors.index.json` (or `pytorch_model.bin.index.json`), else every
/// `*.safetensors`, else every `pytorch_model*.bin` / `*.bin` weight file. Every shard name must
/// be a plain relative path ([`crate::store::check_relative_path`]) and every file must resolve
/// inside the directory ([`check_inside`]). `*.coin.safetensors` files (conversion caches of
/// older coin versions) are ignored.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for index in [
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    ] {
        let p = dir.join(index);
        if p.exists() {
            let v = read_json(&p)?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| MlError::Parse {
                    path: p.clone(),
                    message: "no 'weight_map' object".into(),
                })?;
            let mut names = Vec::with_capacity(map.len());
            for (tensor, f) in map {
                let f = f.as_str().ok_or_else(|| MlError::Parse {
                    path: p.clone(),
                    message: format!(
                        "the shard of '{}' in 'weight_map' is not a string",
                        escape_name(tensor)
                    ),
                })?;
                names.push(f.to_string());
            }
            names.sort();
            names.dedup();
            let mut files = Vec::with_capacity(names.len());
            for name in names {
                crate::store::check_relative_path(&name).map_err(|source| {
                    MlError::UnsafeShard {
                        index: p.clone(),
                        name: name.clone(),
                        source: Box::new(source),
                    }
                })?;
                let f = dir.join(&name);
                if !f.exists() {
                    return Err(MlError::NotAModel {
                        path: dir.to_path_buf(),
                        message: format!(
                            "the shard '{}' named by {index} is missing",
                            escape_name(&name)
                        ),
                    });
                }
                check_inside(dir, &f)?;
                files.push(f);
            }
            return Ok(files);
        }
    }
    let entries = std::fs::read_dir(dir).map_err(|source| MlError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut st = Vec::new();
    let mut bins = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".coin.safetensors") {
            continue;
        }
        if name.ends_with(".safetensors") && !name.starts_with("adapter_model") {
            st.push(e.path());
        } else if name.ends_with(".bin")
            && !name.starts_with("adapter_model")
            && !name.starts_with("training_args")
            && !name.starts_with("non_lora_trainables")
            && !name.starts_with("mm_projector")
        {
            bins.push(e.path());
        }
    }
    st.sort();
    bins.sort();
    let files = if st.is_empty() { bins } else { st };
    if files.is_empty() {
        return Err(MlError::NotAModel {
            path: dir.to_path_buf(),
            message: "no *.safetensors or *.bin weight files".into(),
        });
    }
    for f in &files {
        check_inside(dir, f)?;
    }
    Ok(files)
}

/// Which on-disk layout a model uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Layout {
    /// llava-hf, hub layout: `language_model.model.*`, `vision_tower.vision_model.*`.
    HfOld,
    /// llava-hf, transformers ≥ 4.52 in-memory names: `model.language_model.*`, ….
    HfNew,
    /// CoIN / liuhaotian: LLaMA dir + CLIP dir + projector file.
    Split,
}

/// Where each part of the model lives inside the [`TensorStore`].
#[derive(Clone, Debug)]
pub struct Prefixes {
    /// The LLaMA body (`embed_tokens`, `layers`, `norm`).
    pub llm: String,
    /// `lm_head` (the full tensor name of its weight).
    pub lm_head: String,
    /// The CLIP vision transformer (`embeddings`, `pre_layrnorm`, `encoder`).
    pub vision: String,
    /// The projector's two linears (names of the first and second linear).
    pub projector: [String; 2],
}

/// Resolve the prefixes of a llava-hf checkpoint (either key layout; the vision tower with or
/// without the `vision_model.` level).
pub fn hf_prefixes(store: &TensorStore, dir: &Path) -> Result<(Layout, Prefixes)> {
    let (layout, llm, lm_head, proj) = if store.contains("language_model.model.embed_tokens.weight")
    {
        (
            Layout::HfOld,
            "language_model.model",
            "language_model.lm_head.weight",
            "multi_modal_projector",
        )
    } else if store.contains("model.language_model.embed_tokens.weight") {
        (
            Layout::HfNew,
            "model.language_model",
            "lm_head.weight",
            "model.multi_modal_projector",
        )
    } else {
        return Err(MlError::NotAModel {
            path: dir.to_path_buf(),
            message: "found neither 'language_model.model.embed_tokens.weight' nor \
                      'model.language_model.embed_tokens.weight'"
                .into(),
        });
    };
    let vision_candidates = [
        "vision_tower.vision_model",
        "model.vision_tower.vision_model",
        "model.vision_tower",
        "vision_tower",
    ];
    let vision = vision_candidates
        .iter()
        .find(|p| store.contains(&format!("{p}.embeddings.class_embedding")))
        .ok_or_else(|| MlError::MissingTensor {
            name: "vision_tower.vision_model.embeddings.class_embedding".into(),
            source_desc: store.desc.clone(),
        })?;
    Ok((
        layout,
        Prefixes {
            llm: llm.into(),
            lm_head: lm_head.into(),
            vision: (*vision).into(),
            projector: [format!("{proj}.linear_1"), format!("{proj}.linear_2")],
        },
    ))
}

/// The CoIN split setup on disk.
#[derive(Clone, Debug)]
pub struct SplitPaths {
    /// Vicuna/LLaMA directory (config.json, weights, tokenizer.json); a liuhaotian llava dir works
    /// too (its weights may hold `model.mm_projector.*`).
    pub llm: PathBuf,
    /// CLIP directory (config.json with a vision config, weights with `vision_model.*`).
    pub vision: PathBuf,
    /// Projector file (`mm_projector.bin` or `.safetensors`); `None` to find
    /// `model.mm_projector.*` in the LLM weights or `mm_projector.{bin,safetensors}` in its dir.
    pub projector: Option<PathBuf>,
}

/// Load the split setup's tensors and config.
pub fn load_split(
    paths: &SplitPaths,
    device: &Device,
    dtype: DType,
) -> Result<(LlavaConfig, TensorStore, Prefixes)> {
    let llm_cfg_path = paths.llm.join("config.json");
    let clip_cfg_path = paths.vision.join("config.json");
    let config = LlavaConfig::from_split(
        &read_json(&llm_cfg_path)?,
        &llm_cfg_path,
        &read_json(&clip_cfg_path)?,
        &clip_cfg_path,
    )?;
    let mut files = checkpoint_files(&paths.llm)?;
    let mut store = TensorStore::new(describe(&files));
    for f in files.drain(..) {
        store.add_file(&f, device, dtype, "")?;
    }
    for f in checkpoint_files(&paths.vision)? {
        // CLIPModel files carry `vision_model.*` (and a text tower we ignore); a bare
        // CLIPVisionModel may omit the `vision_model.` level.
        store.add_file(&f, device, dtype, "clip.")?;
    }
    let vision = if store.contains("clip.vision_model.embeddings.class_embedding") {
        "clip.vision_model"
    } else if store.contains("clip.embeddings.class_embedding") {
        "clip"
    } else {
        return Err(MlError::MissingTensor {
            name: "vision_model.embeddings.class_embedding".into(),
            source_desc: format!("the CLIP directory '{}'", paths.vision.display()),
        });
    };
    let proj_file = match &paths.projector {
        Some(p) => Some(p.clone()),
        None if store.contains("model.mm_projector.0.weight") => None,
        None => ["mm_projector.safetensors", "mm_projector.bin"]
            .iter()
            .map(|n| paths.llm.join(n))
            .find(|p| p.exists())
            .map(Some)
            .ok_or_else(|| MlError::MissingTensor {
                name: "model.mm_projector.0.weight".into(),
                source_desc: format!(
                    "'{}' (give the projector file, e.g. mm_projector.bin)",
                    paths.llm.display()
                ),
            })?,
    };
    if let Some(p) = proj_file {
        if paths.projector.is_none() {
            check_inside(&paths.llm, &p)?;
        }
        for (name, t) in read_tensor_file(&p)? {
            // Accept `model.mm_projector.N.*`, `mm_projector.N.*`, `base_model.model.model.mm_projector.N.*`;
            // anything else is refused, as LLaVA's strict load of the projector refuses it.
            let key = projector_key(&name).ok_or_else(|| MlError::Parse {
                path: p.clone(),
                message: format!(
                    "the tensor '{}' is not one of an mlp2x_gelu projector's \
                     (mm_projector.{{0,2}}.{{weight,bias}}); give the stage-1 mm_projector.bin",
                    name.escape_debug()
                ),
            })?;
            let t = if t.dtype().is_float() {
                t.to_dtype(dtype)?
            } else {
                t
            };
            store.insert(key, t.to_device(device)?);
        }
        store.desc = format!("{}, '{}'", store.desc, p.display());
    }
    let lm_head = if store.contains("lm_head.weight") || !config.text.tie_word_embeddings {
        "lm_head.weight"
    } else {
        "model.embed_tokens.weight"
    };
    Ok((
        config,
        store,
        Prefixes {
            llm: "model".into(),
            lm_head: lm_head.into(),
            vision: vision.into(),
            projector: ["model.mm_projector.0".into(), "model.mm_projector.2".into()],
        },
    ))
}

/// The store name of a projector-file tensor (`model.mm_projector.{0,2}.{weight,bias}`), or
/// `None` for a tensor a projector file should not hold.
fn projector_key(name: &str) -> Option<String> {
    let i = name.find("mm_projector.")?;
    let (prefix, rest) = (&name[..i], &name[i + "mm_projector.".len()..]);
    let prefix_ok = prefix.is_empty() || prefix.ends_with("model.");
    let known = ["0.weight", "0.bias", "2.weight", "2.bias"].contains(&rest);
    (prefix_ok && known).then(|| format!("model.mm_projector.{rest}"))
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::ml::train::torch_save::torch_save_bytes;

    #[test]
    fn projector_files_hold_only_the_projector() {
        for ok in [
            "model.mm_projector.0.weight",
            "mm_projector.2.bias",
            "base_model.model.model.mm_projector.2.weight",
        ] {
            assert!(projector_key(ok).is_some(), "{ok}");
        }
        assert_eq!(
            projector_key("mm_projector.0.bias").as_deref(),
            Some("model.mm_projector.0.bias")
        );
        for bad in [
            "model.mm_projector.1.weight",
            "model.mm_projector.extra.weight",
            "model.embed_tokens.weight",
            "xmm_projector.0.weight",
            "model.mm_projector.0.weight.extra",
        ] {
            assert!(projector_key(bad).is_none(), "{bad}");
        }
    }

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(rel)
    }

    fn bits(t: &Tensor) -> Vec<u8> {
        tensor_bytes(t).expect("bytes").1
    }

    /// coin's reader and candle's give the same names, dtypes, shapes and bits.
    fn assert_same_as_candle(file: &Path) -> usize {
        let ours = read_tensor_file(file).expect("coin reads it");
        let mut theirs = candle_core::pickle::read_all(file).expect("candle reads it");
        theirs.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(ours.len(), theirs.len(), "{}", file.display());
        for ((n, a), (m, b)) in ours.iter().zip(&theirs) {
            assert_eq!(n, m);
            assert_eq!((a.dtype(), a.dims()), (b.dtype(), b.dims()), "{n}");
            assert_eq!(bits(a), bits(b), "{n}");
        }
        ours.len()
    }

    #[test]
    fn the_real_torch_fixtures_read_bit_identically_to_candle() {
        for (rel, n) in [
            ("parity/mm_projector.bin", 4),
            ("train/moelora/adapter_model.bin", 238),
            ("train/moelora/non_lora_trainables.bin", 4),
        ] {
            assert_eq!(assert_same_as_candle(&fixture(rel)), n, "{rel}");
        }
    }

    #[test]
    fn torch_save_files_of_every_dtype_read_bit_identically_to_candle() {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 60.0, &dev)
            .and_then(|t| t.affine(0.37, -5.0))
            .and_then(|t| t.reshape((3, 4, 5)))
            .expect("a");
        let tensors = vec![
            ("f32".to_string(), a.clone()),
            ("f64".into(), a.to_dtype(DType::F64).expect("f64")),
            ("bf16".into(), a.to_dtype(DType::BF16).expect("bf16")),
            ("f16".into(), a.to_dtype(DType::F16).expect("f16")),
            (
                "i64".into(),
                Tensor::new(&[-3i64, 0, 1 << 40], &dev).expect("i64"),
            ),
            ("u8".into(), Tensor::new(&[0u8, 7, 255], &dev).expect("u8")),
            ("scalar".into(), Tensor::new(2.5f32, &dev).expect("scalar")),
            (
                "empty".into(),
                Tensor::zeros((0, 3), DType::F32, &dev).expect("empty"),
            ),
        ];
        let t = tempfile::tempdir().expect("tmp");
        let f = t.path().join("adapter_model.bin");
        std::fs::write(&f, torch_save_bytes(&tensors).expect("writes")).expect("w");
        let ours = read_tensor_file(&f).expect("reads");
        for (name, want) in &tensors {
            let (_, got) = ours.iter().find(|(n, _)| n == name).expect("name");
            assert_eq!(
                (got.dtype(), got.dims()),
                (want.dtype(), want.dims()),
                "{name}"
            );
            assert_eq!(bits(got), bits(want), "{name}");
        }
        // candle's reader cannot read the 0-element tensor; compare the others with it.
        let others: Vec<_> = tensors.into_iter().filter(|(n, _)| n != "empty").collect();
        std::fs::write(&f, torch_save_bytes(&others).expect("writes")).expect("w");
        assert_same_as_candle(&f);
    }

    #[test]
    fn non_finite_weights_are_refused_naming_the_tensor() {
        let dev = Device::Cpu;
        let t = tempfile::tempdir().expect("tmp");
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            for (bad, what) in [(f32::NAN, "NaN"), (f32::NEG_INFINITY, "an infinity")] {
                let mut v = vec![0.5f32; 3000];
                v[2345] = bad;
                let x = Tensor::from_vec(v, (3, 1000), &dev)
                    .and_then(|x| x.to_dtype(dtype))
                    .expect("x");
                let tensors = vec![
                    (
                        "fine".to_string(),
                        Tensor::ones(4, dtype, &dev).expect("ones"),
                    ),
                    ("layers.0.w".to_string(), x),
                ];
                let st = t.path().join("model.safetensors");
                write_safetensors(&st, &tensors).expect("w");
                let bin = t.path().join("pytorch_model.bin");
                std::fs::write(&bin, torch_save_bytes(&tensors).expect("b")).expect("w");
                for f in [&st, &bin] {
                    let e = read_tensor_file(f).expect_err("refused");
                    assert!(
                        matches!(&e, MlError::NonFinite { name, index: 2345, value, .. }
                            if name == "layers.0.w" && *value == what),
                        "{dtype:?} {}: {e}",
                        f.display()
                    );
                    assert!(e.to_string().contains("'layers.0.w'"), "{e}");
                }
            }
        }
        // The parallel scan of a large buffer finds the first bad element of a later chunk.
        let mut big = vec![0u8; 3 << 20];
        big[(2 << 20) + 8..(2 << 20) + 12].copy_from_slice(&f32::INFINITY.to_le_bytes());
        big[(2 << 20) + 16..(2 << 20) + 20].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(
            first_non_finite(DType::F32, &big),
            Some(((2 << 20) / 4 + 2, "an infinity"))
        );
        assert_eq!(first_non_finite(DType::I64, &[0xff; 16]), None);
    }

    #[test]
    fn a_replaced_bin_loads_its_new_weights_and_nothing_is_written_beside_it() {
        let dev = Device::Cpu;
        let t = tempfile::tempdir().expect("tmp");
        let f = t.path().join("adapter_model.bin");
        let save = |v: f32| {
            let x = Tensor::full(v, (2, 2), &dev).expect("x");
            std::fs::write(&f, torch_save_bytes(&[("w".into(), x)]).expect("b")).expect("w");
        };
        let first = |f: &Path| -> f32 {
            read_tensor_file(f).expect("reads")[0]
                .1
                .flatten_all()
                .and_then(|x| x.to_vec1::<f32>())
                .expect("v")[0]
        };
        save(1.0);
        assert_eq!(first(&f), 1.0);
        // Other weights, with a modification time older than the first file's.
        save(2.0);
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        std::fs::File::options()
            .write(true)
            .open(&f)
            .and_then(|h| h.set_modified(old))
            .expect("mtime");
        assert_eq!(first(&f), 2.0);
        let names: Vec<_> = std::fs::read_dir(t.path())
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(
            names,
            ["adapter_model.bin"],
            "nothing written beside the .bin"
        );
    }

    #[test]
    fn shards_that_leave_the_model_folder_are_refused() {
        let dev = Device::Cpu;
        let t = tempfile::tempdir().expect("tmp");
        let dir = t.path().join("model");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(&dir).expect("d");
        std::fs::create_dir_all(&outside).expect("d");
        let x = vec![(
            "w".to_string(),
            Tensor::ones(2, DType::F32, &dev).expect("x"),
        )];
        write_safetensors(&outside.join("x.safetensors"), &x).expect("w");
        std::fs::write(outside.join("x.bin"), torch_save_bytes(&x).expect("b")).expect("w");
        write_safetensors(&dir.join("model-1.safetensors"), &x).expect("w");
        let index = |file: &str, name: &str| {
            std::fs::write(
                dir.join(file),
                serde_json::json!({"weight_map": {"w": name}}).to_string(),
            )
            .expect("w")
        };
        for (file, name) in [
            ("pytorch_model.bin.index.json", "../outside/x.bin"),
            ("model.safetensors.index.json", "../outside/x.safetensors"),
            ("model.safetensors.index.json", "/etc/passwd"),
            (
                "model.safetensors.index.json",
                "a/../../outside/x.safetensors",
            ),
            ("model.safetensors.index.json", "bad\u{1b}[2Jname"),
        ] {
            index(file, name);
            let e = checkpoint_files(&dir).expect_err("refused");
            assert!(matches!(&e, MlError::UnsafeShard { .. }), "{name}: {e}");
            assert!(e.to_string().contains(&escape_name(name)), "{e}");
            std::fs::remove_file(dir.join(file)).expect("rm");
        }
        // A link inside the folder that points out of it: refused, through the index or found.
        std::os::unix::fs::symlink(
            outside.join("x.safetensors"),
            dir.join("model-2.safetensors"),
        )
        .expect("link");
        index("model.safetensors.index.json", "model-2.safetensors");
        let e = checkpoint_files(&dir).expect_err("refused");
        assert!(matches!(&e, MlError::OutsideFolder { .. }), "{e}");
        std::fs::remove_file(dir.join("model.safetensors.index.json")).expect("rm");
        let e = checkpoint_files(&dir).expect_err("refused");
        assert!(e.to_string().contains("resolves outside the folder"), "{e}");
        // A link to a device is not a regular file.
        std::fs::remove_file(dir.join("model-2.safetensors")).expect("rm");
        std::os::unix::fs::symlink("/dev/zero", dir.join("model-2.safetensors")).expect("link");
        let e = read_tensor_file(&dir.join("model-2.safetensors")).expect_err("refused");
        assert!(e.to_string().contains("is not a regular file"), "{e}");
        std::fs::remove_file(dir.join("model-2.safetensors")).expect("rm");
        // Links inside the folder, and a Hugging Face cache snapshot's links into its blobs.
        std::os::unix::fs::symlink(
            dir.join("model-1.safetensors"),
            dir.join("model-3.safetensors"),
        )
        .expect("link");
        assert_eq!(checkpoint_files(&dir).expect("ok").len(), 2);
        let repo = t.path().join("models--x--y");
        let snap = repo.join("snapshots/abc");
        std::fs::create_dir_all(&snap).expect("d");
        std::fs::create_dir_all(repo.join("blobs")).expect("d");
        write_safetensors(&repo.join("blobs/0123"), &x).expect("w");
        std::os::unix::fs::symlink("../../blobs/0123", snap.join("model.safetensors")).expect("l");
        assert_eq!(checkpoint_files(&snap).expect("hf cache").len(), 1);
    }
}
