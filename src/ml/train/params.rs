//! Trainable parameters: LoRA / MoELoRA adapters attached to the LLM's target linears and the
//! projector, every one a named `candle_core::Var`, in f32 whatever the model's dtype (AdamW
//! keeps its moments in the var's dtype), or f64 for an f64 model (gradient checks).
//!
//! Names (used for gradients, optimiser state and saving):
//! - LoRA: `{linear}.lora_A.weight` (r × in), `{linear}.lora_B.weight` (out × r);
//! - MoELoRA: `{linear}.lora_A.experts` (E·r/E × in, expert e = rows e·r/E..),
//!   `{linear}.lora_B.experts` (out × E·r/E, expert e = columns e·r/E..),
//!   `{linear}.lora_router.weight` (E × in);
//! - projector: `multi_modal_projector.linear_{1,2}.{weight,bias}`;
//!
//! where `{linear}` is the canonical name of [`Llava::linears_mut`], e.g.
//! `language_model.layers.3.self_attn.q_proj`. Only `language_model.layers.*` linears are
//! targets: never the vision tower, the projector (trained in full instead) or `lm_head`.
//!
//! [`TrainableParams::attach`] starts fresh adapters; [`TrainableParams::attach_from`] starts
//! from a saved adapter directory (the previous task's adapter and projector, CoIN chaining).

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::ml::linear::{Adapter, Lora, MoeLora};
use crate::ml::llama::compute_dtype;
use crate::ml::llava::Llava;
use crate::ml::load::Layout;
use crate::ml::peft::PeftAdapter;
use crate::ml::rng::Rng;
use crate::ml::{MlError, Result};

use super::dropout::Dropout;

/// LLaVA's `find_all_linear_names` targets: every linear of the LLM's decoder layers.
pub const DEFAULT_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Which adapter to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterKind {
    /// Plain LoRA (PEFT init: A Kaiming-uniform(a = √5), B = 0).
    Lora,
    /// CoIN's MoELoRA with this many experts of rank r / E (init A ~ N(0, 0.01²), B = 0,
    /// router Kaiming-uniform(a = √5) as torch's `nn.Linear`).
    MoeLora {
        /// Number of experts E (must divide r).
        experts: usize,
    },
}

/// Adapter hyper-parameters (defaults: CoIN's r 128, α 256, dropout 0.05, all seven targets,
/// projector trained).
#[derive(Clone, Debug)]
pub struct AdapterSettings {
    /// LoRA or MoELoRA.
    pub kind: AdapterKind,
    /// Total rank r.
    pub r: usize,
    /// `lora_alpha`; the scale is α / r.
    pub alpha: f64,
    /// Dropout probability on the adapter input.
    pub dropout: f64,
    /// Linear names (last component, e.g. `q_proj`) of the decoder layers to adapt.
    pub targets: Vec<String>,
    /// Seed of the initialisation and of the dropout masks.
    pub seed: u64,
    /// Whether the projector's weights and biases are trained (in full).
    pub train_projector: bool,
}

impl Default for AdapterSettings {
    fn default() -> Self {
        AdapterSettings {
            kind: AdapterKind::Lora,
            r: 128,
            alpha: 256.0,
            dropout: 0.05,
            targets: DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
            seed: 0,
            train_projector: true,
        }
    }
}

/// Every trainable `Var` of a model, by name, plus the dropout shared by its adapters.
#[derive(Debug)]
pub struct TrainableParams {
    /// (name, var) in attachment order.
    pub vars: Vec<(String, Var)>,
    /// The adapters' shared dropout (switch with [`TrainableParams::set_training`]).
    pub dropout: Dropout,
    /// The settings they were made with.
    pub settings: AdapterSettings,
    /// The layout of the model they are attached to (decides the saved key names, see
    /// [`super::save`]).
    pub layout: Layout,
}

fn var_from(values: Vec<f32>, shape: (usize, usize), device: &Device, dtype: DType) -> Result<Var> {
    Ok(Var::from_tensor(
        &Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?,
    )?)
}

/// torch's `kaiming_uniform_(a = √5)` on a (rows × fan_in) weight: U(−1/√fan_in, 1/√fan_in).
fn kaiming_uniform(rng: &mut Rng, rows: usize, fan_in: usize) -> Vec<f32> {
    uniform_values(rng, rows * fan_in, 1.0 / (fan_in as f64).sqrt())
}

/// `n` values from U(−bound, bound).
fn uniform_values(rng: &mut Rng, n: usize, bound: f64) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
        .collect()
}

impl TrainableParams {
    /// Attach fresh adapters to the target linears of `model` (replacing any adapter) and, with
    /// `train_projector`, turn the projector's tensors into `Var`s (f32).
    pub fn attach(model: &mut Llava, settings: &AdapterSettings) -> Result<Self> {
        let s = settings;
        if s.r == 0 {
            return Err(MlError::Input("the LoRA rank r must be at least 1".into()));
        }
        if let AdapterKind::MoeLora { experts } = s.kind {
            if experts == 0 || !s.r.is_multiple_of(experts) {
                return Err(MlError::Input(format!(
                    "MoELoRA needs the rank r = {} to be a multiple of the expert count {experts}",
                    s.r
                )));
            }
        }
        if !(0.0..1.0).contains(&s.dropout) {
            return Err(MlError::Input(format!(
                "dropout {} is not in [0, 1)",
                s.dropout
            )));
        }
        // Check the targets before touching the model, so an error leaves it unchanged.
        let decoder: Vec<String> = model
            .linears_mut()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.starts_with("language_model.layers."))
            .collect();
        if let Some(t) = s.targets.iter().find(|t| {
            !decoder
                .iter()
                .any(|n| n.rsplit('.').next() == Some(t.as_str()))
        }) {
            return Err(MlError::Input(format!(
                "the adapter target '{t}' matches no linear of the language model"
            )));
        }
        let device = model.device.clone();
        let dtype = compute_dtype(model.dtype);
        let dropout = Dropout::new(s.dropout, s.seed ^ 0xD50F);
        let mut rng = Rng::new(s.seed);
        let scale = s.alpha / s.r as f64;
        let mut vars = Vec::new();
        for (name, lin) in model.linears_mut() {
            if name.starts_with("multi_modal_projector.") && s.train_projector {
                let w = Var::from_tensor(&lin.weight.to_dtype(dtype)?)?;
                lin.weight = w.as_tensor().clone();
                vars.push((format!("{name}.weight"), w));
                if let Some(b) = &lin.bias {
                    let b = Var::from_tensor(&b.to_dtype(dtype)?)?;
                    lin.bias = Some(b.as_tensor().clone());
                    vars.push((format!("{name}.bias"), b));
                }
                continue;
            }
            if !name.starts_with("language_model.layers.") {
                continue;
            }
            let last = name.rsplit('.').next().unwrap_or("");
            if !s.targets.iter().any(|t| t == last) {
                continue;
            }
            let (out_f, in_f) = lin.weight.dims2()?;
            let b = var_from(vec![0.0; out_f * s.r], (out_f, s.r), &device, dtype)?;
            let drop = (s.dropout > 0.0).then(|| dropout.clone());
            match s.kind {
                AdapterKind::Lora => {
                    let a = var_from(
                        kaiming_uniform(&mut rng, s.r, in_f),
                        (s.r, in_f),
                        &device,
                        dtype,
                    )?;
                    lin.adapter = Some(Adapter::Lora(Lora {
                        a: a.as_tensor().clone(),
                        b: b.as_tensor().clone(),
                        scale,
                        dropout: drop,
                    }));
                    vars.push((format!("{name}.lora_A.weight"), a));
                    vars.push((format!("{name}.lora_B.weight"), b));
                }
                AdapterKind::MoeLora { experts } => {
                    let a = var_from(
                        rng.normal_vec(s.r * in_f, 0.01),
                        (s.r, in_f),
                        &device,
                        dtype,
                    )?;
                    let router = var_from(
                        kaiming_uniform(&mut rng, experts, in_f),
                        (experts, in_f),
                        &device,
                        dtype,
                    )?;
                    lin.adapter = Some(Adapter::MoeLora(MoeLora {
                        a: a.as_tensor().clone(),
                        b: b.as_tensor().clone(),
                        router: router.as_tensor().clone(),
                        experts,
                        scale,
                        dropout: drop,
                    }));
                    vars.push((format!("{name}.lora_A.experts"), a));
                    vars.push((format!("{name}.lora_B.experts"), b));
                    vars.push((format!("{name}.lora_router.weight"), router));
                }
            }
        }
        Ok(TrainableParams {
            vars,
            dropout,
            settings: s.clone(),
            layout: model.layout,
        })
    }

    /// Attach adapters initialised from a saved adapter directory (LoRA or MoELoRA, any key
    /// layout, safetensors or `.bin`), as trainable vars in f32 (f64 for an f64 model). The
    /// directory's `non_lora_trainables.*` projector, when present, initialises the projector
    /// vars (or, with `train_projector` off, replaces the model's frozen projector); without
    /// one the model's projector is kept.
    ///
    /// The directory must match `settings`: the same kind and expert count, r and `lora_alpha`,
    /// and exactly one adapter for every linear the targets select (no more). A mismatch is an
    /// [`MlError::AdapterMismatch`] naming the file and the tensor or config key; the model is
    /// then left without adapters and with its own (frozen) projector.
    pub fn attach_from(model: &mut Llava, settings: &AdapterSettings, dir: &Path) -> Result<Self> {
        let dtype = compute_dtype(model.dtype);
        let saved = PeftAdapter::load(dir, &model.device, dtype)?;
        let cfg_path = dir.join("adapter_config.json");
        let mismatch = |path: &Path, message: String| MlError::AdapterMismatch {
            path: path.to_path_buf(),
            message,
        };
        let kind_name = |k: AdapterKind| match k {
            AdapterKind::Lora => "LoRA".to_string(),
            AdapterKind::MoeLora { experts } => format!("MoELoRA with {experts} experts"),
        };
        if saved.kind != settings.kind {
            return Err(mismatch(
                &cfg_path,
                format!(
                    "it is {} (peft_type/expert_num), the settings ask for {}",
                    kind_name(saved.kind),
                    kind_name(settings.kind)
                ),
            ));
        }
        if let Some(r) = saved.rank().filter(|&r| r != settings.r) {
            return Err(mismatch(
                &saved.weights_file,
                format!("its rank r is {r}, the settings' r is {}", settings.r),
            ));
        }
        if saved.alpha != settings.alpha {
            return Err(mismatch(
                &cfg_path,
                format!(
                    "lora_alpha is {}, the settings' alpha is {} (the scale α/r would change)",
                    saved.alpha, settings.alpha
                ),
            ));
        }
        let projector = (
            model.projector.linear_1.clone(),
            model.projector.linear_2.clone(),
        );
        let params = Self::attach(model, settings)?;
        let result = params.load_values(model, &saved);
        if result.is_err() {
            model.clear_adapters();
            (model.projector.linear_1, model.projector.linear_2) = projector;
        }
        result.map(|()| params)
    }

    /// Give the projector a fresh start, as torch's `nn.Linear` initialises one: each weight
    /// Kaiming-uniform(a = √5) and each bias U(−1/√fan_in, 1/√fan_in), drawn from `seed`.
    /// This is what CoIN's tasks after the first train from (`train.projector_init =
    /// "as-coin"`): CoIN builds a new projector and its load of the previous task's matches no
    /// key. A trained projector's vars are set in place (so the optimiser keeps them); a
    /// frozen projector's tensors are replaced.
    pub fn reinit_projector(&self, model: &mut Llava, seed: u64) -> Result<()> {
        let mut rng = Rng::new(seed ^ 0x9E3C_70A1);
        let device = model.device.clone();
        let linears = [
            (
                "multi_modal_projector.linear_1",
                &mut model.projector.linear_1,
            ),
            (
                "multi_modal_projector.linear_2",
                &mut model.projector.linear_2,
            ),
        ];
        for (name, lin) in linears {
            let (out_f, in_f) = lin.weight.dims2()?;
            let weight = Tensor::from_vec(
                kaiming_uniform(&mut rng, out_f, in_f),
                (out_f, in_f),
                &device,
            )?;
            let bias = Tensor::from_vec(
                uniform_values(&mut rng, out_f, 1.0 / (in_f as f64).sqrt()),
                out_f,
                &device,
            )?;
            match self.get(&format!("{name}.weight")) {
                Some(var) => var.set(&weight.to_dtype(var.dtype())?)?,
                None => lin.weight = weight.to_dtype(lin.weight.dtype())?,
            }
            if let Some(old) = &lin.bias {
                match self.get(&format!("{name}.bias")) {
                    Some(var) => var.set(&bias.to_dtype(var.dtype())?)?,
                    None => lin.bias = Some(bias.to_dtype(old.dtype())?),
                }
            }
        }
        Ok(())
    }

    /// Set every adapter var (and the projector) from `saved`, checking that the adapted
    /// linears are exactly the attached ones.
    fn load_values(&self, model: &mut Llava, saved: &PeftAdapter) -> Result<()> {
        let file = &saved.weights_file;
        let mismatch = |message: String| MlError::AdapterMismatch {
            path: file.clone(),
            message,
        };
        let key_of = |linear: &str| {
            saved
                .module_keys
                .get(linear)
                .cloned()
                .unwrap_or_else(|| linear.to_string())
        };
        let mut attached = BTreeSet::new();
        for (name, var) in &self.vars {
            if name.starts_with("multi_modal_projector.") {
                continue;
            }
            let (linear, what) = name
                .rsplit_once(".lora_")
                .map(|(l, w)| (l, format!("lora_{w}")))
                .ok_or_else(|| MlError::Input(format!("unexpected trainable var '{name}'")))?;
            attached.insert(linear.to_string());
            let adapter = saved.layers.get(linear).ok_or_else(|| {
                let target = linear.rsplit('.').next().unwrap_or(linear);
                mismatch(format!(
                    "it has no adapter for '{linear}', which the settings target ('{target}')"
                ))
            })?;
            let scale = match adapter {
                Adapter::Lora(l) | Adapter::Olora { new: l, .. } => l.scale,
                Adapter::MoeLora(m) => m.scale,
            };
            let want_scale = self.settings.alpha / self.settings.r as f64;
            if (scale - want_scale).abs() > 1e-12 * want_scale.abs() {
                return Err(mismatch(format!(
                    "'{}' has the scale {scale} (use_rslora / alpha_pattern?), the settings α/r = {want_scale}",
                    key_of(linear)
                )));
            }
            let value = match (adapter, what.as_str()) {
                (Adapter::Lora(l), "lora_A.weight") => &l.a,
                (Adapter::Lora(l), "lora_B.weight") => &l.b,
                (Adapter::MoeLora(m), "lora_A.experts") => &m.a,
                (Adapter::MoeLora(m), "lora_B.experts") => &m.b,
                (Adapter::MoeLora(m), "lora_router.weight") => &m.router,
                _ => {
                    return Err(mismatch(format!(
                        "the adapter of '{}' does not fit the var '{name}'",
                        key_of(linear)
                    )))
                }
            };
            if value.dims() != var.dims() {
                return Err(mismatch(format!(
                    "'{}' ({what}) has shape {:?}, the settings need {:?}",
                    key_of(linear),
                    value.dims(),
                    var.dims()
                )));
            }
            var.set(&value.to_dtype(var.dtype())?)?;
        }
        if let Some(extra) = saved.layers.keys().find(|l| !attached.contains(*l)) {
            return Err(mismatch(format!(
                "it adapts '{}', which the settings' targets {:?} do not select",
                key_of(extra),
                self.settings.targets
            )));
        }
        self.load_projector(model, saved)
    }

    /// Set the projector from `saved`'s trained projector, when it has one: the projector vars
    /// when the projector is trained, else the model's frozen projector.
    pub(crate) fn load_projector(&self, model: &mut Llava, saved: &PeftAdapter) -> Result<()> {
        if let Some(p) = &saved.projector {
            if self.settings.train_projector {
                for (name, var) in self
                    .vars
                    .iter()
                    .filter(|(n, _)| n.starts_with("multi_modal_projector."))
                {
                    let t = p
                        .tensors
                        .get(name)
                        .ok_or_else(|| MlError::AdapterMismatch {
                            path: p.file.clone(),
                            message: format!("it has no '{name}', which the model's projector has"),
                        })?;
                    if t.dims() != var.dims() {
                        return Err(MlError::AdapterMismatch {
                            path: p.file.clone(),
                            message: format!(
                                "'{name}' has shape {:?}, the model's projector {:?}",
                                t.dims(),
                                var.dims()
                            ),
                        });
                    }
                    var.set(&t.to_dtype(var.dtype())?)?;
                }
            } else {
                p.replace_in(model, model.dtype)?;
            }
        }
        Ok(())
    }

    /// The names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.iter().map(|(n, _)| n.as_str())
    }

    /// The var of a name.
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Just the vars (for an optimiser).
    pub fn all_vars(&self) -> Vec<Var> {
        self.vars.iter().map(|(_, v)| v.clone()).collect()
    }

    /// Total number of trainable scalars.
    pub fn num_elements(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Training mode (dropout on) or eval mode (dropout off).
    pub fn set_training(&self, training: bool) {
        self.dropout.set_training(training);
    }

    /// The names of vars that `grads` holds no gradient for (empty when all are reached).
    pub fn missing_gradients(&self, grads: &candle_core::backprop::GradStore) -> Vec<String> {
        self.vars
            .iter()
            .filter(|(_, v)| grads.get(v.as_tensor()).is_none())
            .map(|(n, _)| n.clone())
            .collect()
    }
}
