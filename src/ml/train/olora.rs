//! O-LoRA (Wang et al., "Orthogonal Subspace Learning for Language Model Continual Learning",
//! Findings of EMNLP 2023): every task trains a new LoRA of its own while the earlier tasks'
//! LoRAs stay frozen, and a penalty keeps the new down projection orthogonal to theirs.
//!
//! - Training task t ([`attach_olora`]): each target linear carries
//!   [`Adapter::Olora`]: the parent's whole adapter (all earlier tasks, rank R) frozen, plus a
//!   fresh LoRA of rank r, the only adapter vars (the projector is trained as usual).
//! - Objective ([`OloraPenalty`], a [`Regularizer`] parameters term per optimiser step):
//!   `λ1 · Σ_modules Σ |A_frozen · A_newᵀ| + λ2 · Σ (A_new² + B_new²)`. `A_frozen` is the row
//!   stack of the earlier tasks' A (coin stores A as r × in), so the first sum is
//!   `Σ_s ‖A_s A_newᵀ‖₁` over the earlier tasks s, the paper's orthogonality term as its code
//!   computes it (sum of absolute entries).
//! - Checkpoint ([`write_olora`]): `adapter_model.safetensors` + `adapter_config.json` hold the
//!   exact concatenation [frozen; new] (rank R + r, [`Lora::concat`]), a plain LoRA that every
//!   reader (eval, `coin checkout`, PEFT, CoIN) uses whole. `olora.safetensors` holds each
//!   task's own factors as separate tensors (`<task>.<linear>.lora_A.weight`, `…lora_B.weight`)
//!   and `olora.json` the tasks in order with their ranks: the earlier tasks' tensors are copied
//!   unchanged from the parent, so the store keeps them once and `coin diff` shows only the new
//!   task's tensors added.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::params::{AdapterKind, AdapterSettings, TrainableParams};
use super::save::{adapter_config, saved_tensors};
use super::trainer::Regularizer;
use crate::ml::linear::{matmul_t, Adapter, Lora};
use crate::ml::llama::compute_dtype;
use crate::ml::llava::Llava;
use crate::ml::load::{read_tensor_file, write_safetensors};
use crate::ml::peft::PeftAdapter;
use crate::ml::{MlError, Result};
use crate::store::fsutil::write_atomic;

/// The per-task factors of an O-LoRA checkpoint.
pub const OLORA_TENSORS: &str = "olora.safetensors";
/// The tasks of an O-LoRA checkpoint, in training order.
pub const OLORA_INDEX: &str = "olora.json";
const INDEX_FORMAT: &str = "coin.olora.v1";

/// One task's adapter in an O-LoRA stack.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OloraTask {
    /// The task name.
    pub task: String,
    /// The prefix of its tensors in `olora.safetensors` (the task name; `<task>~<n>` when a
    /// task was trained more than once on the branch).
    pub key: String,
    /// Its rank r.
    pub rank: usize,
    /// Its `lora_alpha` (its scale is α / r).
    pub alpha: f64,
}

/// `olora.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OloraIndex {
    /// `coin.olora.v1`.
    pub format: String,
    /// The tasks, oldest first; their rank ranges in the concatenated adapter follow this order.
    pub tasks: Vec<OloraTask>,
}

/// What an O-LoRA step carries over from its parent: the earlier tasks and the frozen adapter.
#[derive(Debug)]
pub struct OloraStack {
    /// The earlier tasks (empty at a first step).
    pub earlier: Vec<OloraTask>,
    /// The earlier tasks' own tensors, as read from the parent (written back unchanged).
    pub earlier_tensors: Vec<(String, Tensor)>,
    /// The frozen (concatenated) adapter of each adapted linear, by canonical name.
    pub frozen: BTreeMap<String, Lora>,
}

impl OloraStack {
    /// The frozen rank R (0 at a first step).
    pub fn frozen_rank(&self) -> usize {
        self.earlier.iter().map(|t| t.rank).sum()
    }
}

fn mismatch(path: &Path, message: String) -> MlError {
    MlError::AdapterMismatch {
        path: path.to_path_buf(),
        message,
    }
}

/// Read a parent's `olora.json`, when it has one.
pub fn read_index(dir: &Path) -> Result<Option<OloraIndex>> {
    let path = dir.join(OLORA_INDEX);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(MlError::Read { path, source }),
    };
    let index: OloraIndex = serde_json::from_str(&text).map_err(|e| MlError::Parse {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if index.format != INDEX_FORMAT {
        return Err(MlError::Parse {
            path,
            message: format!(
                "unknown format '{}' (this coin reads {INDEX_FORMAT})",
                index.format
            ),
        });
    }
    Ok(Some(index))
}

/// The seed of task k's new adapter: the configured seed for the first task, a different one
/// for each later task (the same seed would start every task's A equal, far from orthogonal).
fn task_seed(seed: u64, earlier: usize) -> u64 {
    if earlier == 0 {
        seed
    } else {
        seed ^ (earlier as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

/// Attach an O-LoRA step's adapters to `model`: a fresh trainable LoRA of `settings` (which
/// must be plain LoRA) on every target, stacked on the parent's adapter (`parent`: its
/// checked-out folder, and the task it trained, which names its adapter when the parent has no
/// `olora.json`), frozen; the projector starts from the parent's, as
/// [`TrainableParams::attach_from`] does. A parent with MoELoRA, other targets or other
/// shapes is refused; the model is then left without adapters and with its own projector.
pub fn attach_olora(
    model: &mut Llava,
    settings: &AdapterSettings,
    parent: Option<(&Path, &str)>,
) -> Result<(TrainableParams, OloraStack)> {
    if settings.kind != AdapterKind::Lora {
        return Err(MlError::Input(
            "O-LoRA stacks plain LoRA adapters: set train.method = \"lora\" (MoELoRA's router \
             mixes its experts per token, so its subspaces do not stack)"
                .into(),
        ));
    }
    let Some((dir, parent_task)) = parent else {
        let params = TrainableParams::attach(model, settings)?;
        let stack = OloraStack {
            earlier: Vec::new(),
            earlier_tensors: Vec::new(),
            frozen: BTreeMap::new(),
        };
        return Ok((params, stack));
    };
    let dtype = compute_dtype(model.dtype);
    let saved = PeftAdapter::load(dir, &model.device, dtype)?;
    let cfg_path = dir.join("adapter_config.json");
    if let AdapterKind::MoeLora { experts } = saved.kind {
        return Err(mismatch(
            &cfg_path,
            format!(
                "the parent's adapter is MoELoRA ({experts} experts); O-LoRA stacks plain LoRA \
                 adapters, so start the O-LoRA branch from a LoRA checkpoint (or from the base \
                 model with --zero-shot)"
            ),
        ));
    }
    let rank = saved.rank().ok_or_else(|| {
        mismatch(
            &saved.weights_file,
            "its modules have different ranks (rank_pattern); O-LoRA needs one rank".into(),
        )
    })?;
    let (earlier, earlier_tensors) = match read_index(dir)? {
        Some(index) => {
            let total: usize = index.tasks.iter().map(|t| t.rank).sum();
            if total != rank {
                return Err(mismatch(
                    &dir.join(OLORA_INDEX),
                    format!(
                        "its tasks' ranks add up to {total}, but the adapter's rank is {rank}: \
                         the files are not from one O-LoRA step"
                    ),
                ));
            }
            let file = dir.join(OLORA_TENSORS);
            (index.tasks, read_tensor_file(&file)?)
        }
        None => {
            // A parent trained without O-LoRA: its whole adapter is one earlier task.
            let mut tensors = Vec::new();
            for (linear, a) in &saved.layers {
                if let Adapter::Lora(l) = a {
                    tensors.push((format!("{parent_task}.{linear}.lora_A.weight"), l.a.clone()));
                    tensors.push((format!("{parent_task}.{linear}.lora_B.weight"), l.b.clone()));
                }
            }
            let task = OloraTask {
                task: parent_task.to_string(),
                key: parent_task.to_string(),
                rank,
                alpha: saved.alpha,
            };
            (vec![task], tensors)
        }
    };
    let mut s = settings.clone();
    s.seed = task_seed(settings.seed, earlier.len());
    let projector = (
        model.projector.linear_1.clone(),
        model.projector.linear_2.clone(),
    );
    let params = TrainableParams::attach(model, &s)?;
    let result = stack_frozen(model, &params, &saved).and_then(|frozen| {
        params.load_projector(model, &saved)?;
        Ok(frozen)
    });
    match result {
        Ok(frozen) => Ok((
            params,
            OloraStack {
                earlier,
                earlier_tensors,
                frozen,
            },
        )),
        Err(e) => {
            model.clear_adapters();
            (model.projector.linear_1, model.projector.linear_2) = projector;
            Err(e)
        }
    }
}

/// Put the saved adapter under each attached new LoRA, frozen; the saved adapter must adapt
/// exactly the attached linears, with the same shapes.
fn stack_frozen(
    model: &mut Llava,
    params: &TrainableParams,
    saved: &PeftAdapter,
) -> Result<BTreeMap<String, Lora>> {
    let file = &saved.weights_file;
    let key_of = |linear: &str| {
        saved
            .module_keys
            .get(linear)
            .cloned()
            .unwrap_or_else(|| linear.to_string())
    };
    let attached: BTreeSet<&str> = params
        .names()
        .filter_map(|n| n.strip_suffix(".lora_A.weight"))
        .collect();
    if let Some(extra) = saved.layers.keys().find(|l| !attached.contains(l.as_str())) {
        return Err(mismatch(
            file,
            format!(
                "it adapts '{}', which the settings' targets {:?} do not select",
                key_of(extra),
                params.settings.targets
            ),
        ));
    }
    let mut frozen = BTreeMap::new();
    for (name, lin) in model.linears_mut() {
        if !attached.contains(name.as_str()) {
            continue;
        }
        let Some(Adapter::Lora(new)) = lin.adapter.take() else {
            return Err(MlError::Input(format!(
                "the linear '{name}' carries no new LoRA to stack on"
            )));
        };
        let old = match saved.layers.get(&name) {
            Some(Adapter::Lora(l)) => l,
            Some(_) => {
                return Err(mismatch(
                    file,
                    format!("'{}' is not a plain LoRA", key_of(&name)),
                ))
            }
            None => {
                let target = name.rsplit('.').next().unwrap_or(&name);
                return Err(mismatch(
                    file,
                    format!(
                        "it has no adapter for '{name}', which the settings target ('{target}')"
                    ),
                ));
            }
        };
        if old.a.dim(1)? != new.a.dim(1)? || old.b.dim(0)? != new.b.dim(0)? {
            return Err(mismatch(
                file,
                format!(
                    "'{}' is {} × {}, the model's linear {} × {}",
                    key_of(&name),
                    old.b.dim(0)?,
                    old.a.dim(1)?,
                    new.b.dim(0)?,
                    new.a.dim(1)?
                ),
            ));
        }
        let old = Lora {
            a: old.a.to_dtype(new.a.dtype())?,
            b: old.b.to_dtype(new.b.dtype())?,
            scale: old.scale,
            dropout: None,
        };
        frozen.insert(name.clone(), old.clone());
        lin.adapter = Some(Adapter::Olora { frozen: old, new });
    }
    Ok(frozen)
}

/// The O-LoRA objective's extra term (see the module docs), per optimiser step.
#[derive(Debug)]
pub struct OloraPenalty {
    /// Weight of the orthogonality term (the paper's λ1).
    pub lambda1: f64,
    /// Weight of the new adapter's squared L2 norm (λ2).
    pub lambda2: f64,
    /// (var name of a new A, the frozen A of its linear).
    pairs: Vec<(String, Tensor)>,
    /// The var names of the new A and B.
    new_names: Vec<String>,
    /// What the frozen part is (tasks and ranks), for the fingerprint.
    frozen_desc: String,
}

impl OloraPenalty {
    /// The penalty of a step stacked on `stack`, over the new LoRA of `params`.
    pub fn new(lambda1: f64, lambda2: f64, params: &TrainableParams, stack: &OloraStack) -> Self {
        let pairs = stack
            .frozen
            .iter()
            .map(|(linear, l)| (format!("{linear}.lora_A.weight"), l.a.clone()))
            .collect();
        let new_names = params
            .names()
            .filter(|n| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))
            .map(str::to_string)
            .collect();
        let frozen_desc = stack
            .earlier
            .iter()
            .map(|t| format!("{}:{}:{}", t.key, t.rank, t.alpha))
            .collect::<Vec<_>>()
            .join(",");
        OloraPenalty {
            lambda1,
            lambda2,
            pairs,
            new_names,
            frozen_desc,
        }
    }

    fn var<'a>(params: &'a TrainableParams, name: &str) -> Result<&'a Var> {
        params
            .get(name)
            .ok_or_else(|| MlError::Input(format!("O-LoRA: no trainable var '{name}'")))
    }

    /// `Σ_modules Σ |A_frozen · A_newᵀ|` (`None` at a first step: nothing to be orthogonal to).
    pub fn orthogonality(&self, params: &TrainableParams) -> Result<Option<Tensor>> {
        let mut sum: Option<Tensor> = None;
        for (name, frozen_a) in &self.pairs {
            let a = Self::var(params, name)?.as_tensor();
            // A_new · A_frozenᵀ (the transpose of A_frozen · A_newᵀ, the same absolute sum),
            // by the frozen matmul: the frozen factor gets no gradient computed.
            let term = matmul_t(a, frozen_a)?.abs()?.sum_all()?;
            sum = Some(match sum {
                Some(s) => (s + term)?,
                None => term,
            });
        }
        Ok(sum)
    }

    /// `Σ (A_new² + B_new²)` over every new LoRA factor.
    pub fn l2(&self, params: &TrainableParams) -> Result<Option<Tensor>> {
        let mut sum: Option<Tensor> = None;
        for name in &self.new_names {
            let term = Self::var(params, name)?.as_tensor().sqr()?.sum_all()?;
            sum = Some(match sum {
                Some(s) => (s + term)?,
                None => term,
            });
        }
        Ok(sum)
    }
}

impl Regularizer for OloraPenalty {
    fn fingerprint(&self) -> String {
        format!(
            "olora λ1={} λ2={} frozen=[{}]",
            self.lambda1, self.lambda2, self.frozen_desc
        )
    }

    fn params_term(&self, params: &TrainableParams) -> Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        if self.lambda1 != 0.0 {
            if let Some(o) = self.orthogonality(params)? {
                total = Some((o * self.lambda1)?);
            }
        }
        if self.lambda2 != 0.0 {
            if let Some(l) = self.l2(params)? {
                let l = (l * self.lambda2)?;
                total = Some(match total {
                    Some(t) => (t + l)?,
                    None => l,
                });
            }
        }
        Ok(total)
    }
}

/// What [`write_olora`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct OloraSaved {
    /// Every task, oldest first (the new one last).
    pub tasks: Vec<OloraTask>,
    /// The concatenated adapter's rank.
    pub total_rank: usize,
}

/// After an O-LoRA step, with the new adapter already saved in `dir` by
/// [`super::save::save_adapter`]: replace `adapter_model.safetensors` and
/// `adapter_config.json` with the concatenation [frozen; new] (when there is a frozen part) and
/// write `olora.safetensors` and `olora.json` with every task's own factors.
pub fn write_olora(
    params: &TrainableParams,
    stack: &OloraStack,
    task: &str,
    dir: &Path,
    base_model: &str,
) -> Result<OloraSaved> {
    let s = &params.settings;
    let taken: BTreeSet<&str> = stack.earlier.iter().map(|t| t.key.as_str()).collect();
    let key = (1..)
        .map(|n| {
            if n == 1 {
                task.to_string()
            } else {
                format!("{task}~{n}")
            }
        })
        .find(|k| !taken.contains(k.as_str()))
        .unwrap_or_else(|| task.to_string());
    let mut tensors = stack.earlier_tensors.clone();
    let mut concat = Vec::new();
    let new_scale = s.alpha / s.r as f64;
    let mut cat_scale = new_scale;
    for (name, var) in &params.vars {
        let Some(linear) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let b_name = format!("{linear}.lora_B.weight");
        let b = params
            .get(&b_name)
            .ok_or_else(|| MlError::Input(format!("O-LoRA: no trainable var '{b_name}'")))?;
        let (a, b) = (var.as_tensor().clone(), b.as_tensor().clone());
        tensors.push((format!("{key}.{linear}.lora_A.weight"), a.clone()));
        tensors.push((format!("{key}.{linear}.lora_B.weight"), b.clone()));
        if let Some(frozen) = stack.frozen.get(linear) {
            let new = Lora {
                a,
                b,
                scale: new_scale,
                dropout: None,
            };
            let l = frozen.concat(&new)?;
            cat_scale = l.scale;
            for (part, t) in [("lora_A.weight", l.a), ("lora_B.weight", l.b)] {
                concat.extend(saved_tensors(
                    &format!("{linear}.{part}"),
                    &t,
                    AdapterKind::Lora,
                    params.layout,
                )?);
            }
        }
    }
    let total_rank = stack.frozen_rank() + s.r;
    if !stack.frozen.is_empty() {
        write_safetensors(&dir.join("adapter_model.safetensors"), &concat)?;
        let mut cfg = adapter_config(params, base_model);
        cfg.r = Some(total_rank);
        cfg.lora_alpha = Some(cat_scale * total_rank as f64);
        write_json(&dir.join("adapter_config.json"), &cfg, "the adapter config")?;
    }
    write_safetensors(&dir.join(OLORA_TENSORS), &tensors)?;
    let mut tasks = stack.earlier.clone();
    tasks.push(OloraTask {
        task: task.to_string(),
        key,
        rank: s.r,
        alpha: s.alpha,
    });
    let index = OloraIndex {
        format: INDEX_FORMAT.into(),
        tasks: tasks.clone(),
    };
    write_json(&dir.join(OLORA_INDEX), &index, "the O-LoRA index")?;
    Ok(OloraSaved { tasks, total_rank })
}

fn write_json<T: Serialize>(path: &Path, value: &T, what: &'static str) -> Result<()> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|source| MlError::Encode { what, source })?;
    text.push('\n');
    write_atomic(path, text).map_err(|source| MlError::Write {
        path: path.to_path_buf(),
        source,
    })
}
