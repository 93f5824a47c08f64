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
use serde_json::Value;

use super::config::{read_json, LlavaConfig};
use super::{MlError, Result};
use crate::store::fsutil::write_atomic;

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

/// Read every tensor of a `.safetensors` file or a PyTorch zip `.bin` (on the CPU, as stored).
/// A `.bin` is converted once to a sibling `<name>.coin.safetensors` (when the directory is
/// writable) and that file is read on later loads.
pub fn read_tensor_file(file: &Path) -> Result<Vec<(String, Tensor)>> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.ends_with(".safetensors") {
        let bytes = std::fs::read(file).map_err(|source| MlError::Read {
            path: file.to_path_buf(),
            source,
        })?;
        let map = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
            MlError::Parse {
                path: file.to_path_buf(),
                message: format!("not a safetensors file: {e}"),
            }
        })?;
        let mut v: Vec<(String, Tensor)> = map.into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        return Ok(v);
    }
    let cache = file.with_file_name(format!("{name}.coin.safetensors"));
    if let (Ok(c), Ok(o)) = (std::fs::metadata(&cache), std::fs::metadata(file)) {
        if let (Ok(ct), Ok(ot)) = (c.modified(), o.modified()) {
            if ct >= ot {
                return read_tensor_file(&cache);
            }
        }
    }
    if !file.exists() {
        return Err(MlError::Read {
            path: file.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let tensors = candle_core::pickle::read_all(file).map_err(|e| MlError::Parse {
        path: file.to_path_buf(),
        message: format!("not a PyTorch zip checkpoint readable by candle: {e}"),
    })?;
    // Best effort: a read-only model directory simply converts again next time.
    let _ = write_safetensors(&cache, &tensors);
    Ok(tensors)
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
    let mut h =
        serde_json::to_vec(&Value::Object(header)).map_err(|e| MlError::Input(e.to_string()))?;
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

/// The checkpoint files of a model directory: the shards named by
/// `model.safetensors.index.json` (or `pytorch_model.bin.index.json`), else every
/// `*.safetensors`, else every `pytorch_model*.bin` / `*.bin` weight file.
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
            let mut files: Vec<String> = map
                .values()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
            files.sort();
            files.dedup();
            let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
            for f in &files {
                if !f.exists() {
                    return Err(MlError::NotAModel {
                        path: dir.to_path_buf(),
                        message: format!("the shard '{}' named by {index} is missing", f.display()),
                    });
                }
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
    if !st.is_empty() {
        return Ok(st);
    }
    if !bins.is_empty() {
        return Ok(bins);
    }
    Err(MlError::NotAModel {
        path: dir.to_path_buf(),
        message: "no *.safetensors or *.bin weight files".into(),
    })
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
        for (name, t) in read_tensor_file(&p)? {
            // Accept `model.mm_projector.N.*`, `mm_projector.N.*`, `base_model.model.model.mm_projector.N.*`.
            let Some(i) = name.find("mm_projector.") else {
                continue;
            };
            let key = format!("model.{}", &name[i..]);
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
