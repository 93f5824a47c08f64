//! Activation checkpointing per decoder layer, and per vision tower layer when the tower
//! trains: gradients of a batch's objective without keeping every layer's activations alive at
//! once.
//!
//! Without it, candle's backward needs the graph of the whole forward: every intermediate of
//! every layer (attention scores and probabilities, the MLP's wide activations, the adapters'
//! inputs) stays alive until the backward has passed it; a trained tower's graph (LLaVA's 23
//! layers of 577 positions per image) stays alive through the decoder's forward and backward.
//! With it ([`batch_gradients`] with `checkpointed` = k > 0 decoder layers; all of them for
//! `runtime.checkpointing = "on"`, as many as the free memory asks for under `auto`:
//! [`layers_to_checkpoint`]):
//!
//! 1. the tower ([`TowerTape`]) runs layer by layer keeping only each layer's input, detached,
//!    and its selected layer's output (LLaVA's `hidden_states[-2]`: the layers after it are not
//!    loaded) made a fresh tracked input of the projector when any part of the tower trains;
//!    a frozen tower keeps nothing (its forward has no graph either way);
//! 2. the forward of the first k decoder layers keeps only each layer's input, detached (no
//!    graph); each layer's graph is dropped as soon as its output is taken;
//! 3. the remaining layers and the loss head (final norm, `lm_head`, the caller's objective:
//!    masked cross-entropy and a method's outputs term) run with their graph on layer k−1's
//!    output made a fresh tracked input, and their backward gives the parameters' gradients
//!    there and `g_k`, the gradient of that input;
//! 4. the checkpointed decoder layers are walked in reverse: layer `i` is recomputed from its saved input
//!    made a fresh tracked input (`Var::from_tensor`), the backward of `sum(out ⊙ g_{i+1})`
//!    gives its parameters' gradients (accumulated into one [`GradStore`]) and `g_i`, and the
//!    layer's graph is dropped before the next;
//! 5. the embedding side (projector, trainable embeddings) gets its gradients from one more
//!    backward, of `sum(x_0 ⊙ g_0)` through the embeddings' own graph, which also gives the
//!    gradient of the tower's output;
//! 6. a trained tower's layers are walked in reverse the same way, then its embeddings (patch
//!    and position embeddings, CLS, `pre_layrnorm`) are recomputed from the pixels and get the
//!    backward of `sum(e ⊙ g_emb)`.
//!
//! The recompute draws the forward's dropout masks: on the CPU the row-keyed masks
//! ([`super::dropout::with_rows`]) are a function of the call count, which is saved before each
//! layer's forward and restored before its recompute; on a GPU the device generator is re-seeded
//! before every layer, decoder and tower (in both modes, so checkpointing does not change the
//! masks). The tower has no dropout (adapters never target it), but it is handled alike.
//! The gradients equal the plain pass's (tests: `checkpoint_tests`), so the setting is not part
//! of the training key.
//!
//! Peak memory then holds the saved layer inputs (decoder layers × b·t·hidden, tower layers ×
//! images·577·1024 at LLaVA size), one layer's graph and the head's (logits are b·t·vocab);
//! docs/training.md has what was measured.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use super::batch::{embed_batch, prepare_batch, BatchInputs, TrainExample};
use super::dropout;
use crate::ml::llava::Llava;
use crate::ml::runtime::Checkpointing;
use crate::ml::{MlError, Result};

/// Seeds of the GPU's dropout masks of decoder layer `i` are salted with this plus `i`.
const LAYER_SALT: u64 = 1 << 40;
/// Seeds of the GPU's dropout masks of vision tower layer `i` are salted with this plus `i`.
const TOWER_SALT: u64 = 1 << 41;

/// On a GPU inside a trainer's row context, re-seed the device generator for decoder layer `i`
/// (its dropout masks are then a function of the step, the rows and the layer).
fn seed_layer(device: &Device, i: usize) -> Result<()> {
    seed_salted(device, LAYER_SALT + i as u64)
}

/// [`seed_layer`] for vision tower layer `i`.
fn seed_tower_layer(device: &Device, i: usize) -> Result<()> {
    seed_salted(device, TOWER_SALT + i as u64)
}

fn seed_salted(device: &Device, salt: u64) -> Result<()> {
    if device.is_cpu() {
        return Ok(());
    }
    if let Some(seed) = dropout::row_seed(salt) {
        device.set_seed(seed)?;
    }
    Ok(())
}

/// Projected image features (n, image_seq_len, hidden) of pixels (n, 3, H, W), with the graph
/// (the plain training forward; the tower's layers seeded as in [`TowerTape::forward`]).
pub fn image_features(model: &Llava, pixels: &Tensor) -> Result<Tensor> {
    let v = &model.vision;
    let mut x = v.embed(pixels)?;
    for (i, layer) in v.layers.iter().enumerate() {
        seed_tower_layer(&model.device, i)?;
        x = layer.forward(&x)?;
    }
    let f = v.select(&x, model.config.feature_select)?;
    Ok(model.projector.forward(&f)?)
}

/// The checkpointed forward of the vision tower: each layer's input kept detached, from the
/// first layer the gradient must pass (the first whose input or parameters are tracked) on,
/// and the selected layer's output made a fresh tracked input of the projector.
pub(crate) struct TowerTape {
    /// The stacked pixel values (n, 3, H, W), for the embeddings' recompute.
    pixels: Tensor,
    /// The dropout call count before the embeddings, and whether they are trained.
    embed: (Option<u64>, bool),
    /// Per layer: its detached input and the dropout call count before it, `None` for the
    /// leading layers no gradient passes (a frozen tower has none).
    saved: Vec<Option<(Tensor, Option<u64>)>>,
    /// The last layer's output (n, positions, d): a fresh tracked input when any part of the
    /// tower trains, else detached.
    out: TowerOut,
}

#[cfg(test)]
thread_local! {
    /// Tower layers recomputed by [`batch_gradients`] on this thread (tests).
    pub(crate) static TOWER_RECOMPUTES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The tower's last layer output.
enum TowerOut {
    /// A fresh tracked input of the projector (some part of the tower trains).
    Tracked(Var),
    /// Detached (the tower is frozen).
    Frozen(Tensor),
}

impl TowerTape {
    /// Run the tower layer by layer on `pixels` (n, 3, H, W), keeping no layer's graph.
    pub(crate) fn forward(model: &Llava, pixels: &Tensor) -> Result<Self> {
        let v = &model.vision;
        let embed_calls = dropout::row_calls();
        let e = v.embed(pixels)?;
        let embed_trains = e.track_op();
        let mut needed = embed_trains;
        let mut x = e.detach();
        drop(e);
        let mut saved = Vec::with_capacity(v.layers.len());
        for (i, layer) in v.layers.iter().enumerate() {
            let calls = dropout::row_calls();
            seed_tower_layer(&model.device, i)?;
            let out = layer.forward(&x)?;
            needed |= out.track_op();
            // The output's graph (this layer's activations) is dropped here.
            let out = out.detach();
            saved.push(needed.then_some((x, calls)));
            x = out;
        }
        let out = if needed {
            TowerOut::Tracked(Var::from_tensor(&x)?)
        } else {
            TowerOut::Frozen(x)
        };
        Ok(TowerTape {
            pixels: pixels.clone(),
            embed: (embed_calls, embed_trains),
            saved,
            out,
        })
    }

    /// The selected features (n, image_seq_len, d) for the projector: tracked from
    /// [`TowerTape::output`] when the tower trains.
    pub(crate) fn features(&self, model: &Llava) -> Result<Tensor> {
        let x = match &self.out {
            TowerOut::Tracked(var) => var.as_tensor(),
            TowerOut::Frozen(t) => t,
        };
        Ok(model.vision.select(x, model.config.feature_select)?)
    }

    /// The tracked output whose gradient [`TowerTape::backward`] needs (`None`: the tower is
    /// frozen).
    pub(crate) fn output(&self) -> Option<&Var> {
        match &self.out {
            TowerOut::Tracked(var) => Some(var),
            TowerOut::Frozen(_) => None,
        }
    }

    /// The kept layer inputs (those [`TowerTape::backward`] recomputes), first layer first.
    #[cfg(test)]
    pub(crate) fn saved_inputs(&self) -> Vec<&Tensor> {
        self.saved.iter().flatten().map(|(t, _)| t).collect()
    }

    /// The tower's gradients given `g`, the gradient of [`TowerTape::output`]: the layers are
    /// recomputed in reverse from their saved inputs as fresh tracked inputs, each layer's
    /// graph dropped before the next, then the embeddings; `keep` strips a store to the
    /// trained vars' gradients. Returns the gradients and the number of layers recomputed.
    pub(crate) fn backward(
        mut self,
        model: &Llava,
        mut g: Tensor,
        keep: impl Fn(&mut GradStore),
    ) -> Result<(GradStore, usize)> {
        let layers = &model.vision.layers;
        let mut grads = GradStore::default();
        let mut recomputed = 0;
        drop(self.out);
        while let Some(Some((input, calls))) = self.saved.pop() {
            let i = self.saved.len();
            dropout::set_row_calls(calls);
            seed_tower_layer(&model.device, i)?;
            let var = Var::from_tensor(&input)?;
            drop(input);
            let mut layer_grads = {
                let out = layers[i].forward(var.as_tensor())?;
                (out * &g)?.sum_all()?.backward()?
            };
            g = layer_grads
                .remove(var.as_tensor())
                .ok_or_else(|| no_gradient(&format!("vision tower layer {i}'s input")))?;
            keep(&mut layer_grads);
            grads.extend(layer_grads)?;
            recomputed += 1;
        }
        let (calls, trains) = self.embed;
        if trains {
            dropout::set_row_calls(calls);
            let e = model.vision.embed(&self.pixels)?;
            let mut side = (e * g)?.sum_all()?.backward()?;
            keep(&mut side);
            grads.extend(side)?;
        }
        Ok((grads, recomputed))
    }
}

/// The decoder's final-normed hidden states (b, t, hidden) of a prepared batch, with the graph
/// (the plain, un-checkpointed training forward).
pub fn decoder(model: &Llava, inputs: &BatchInputs) -> Result<Tensor> {
    let llm = &model.llm;
    let (b, s, h) = inputs.embeds.dims3()?;
    let (cos, sin) = llm.rope(&inputs.positions)?;
    let mut x = inputs.embeds.reshape((b * s, h))?;
    for (i, layer) in llm.layers.iter().enumerate() {
        seed_layer(&model.device, i)?;
        x = layer.forward(&x, (b, s), &cos, &sin, &inputs.mask, None)?;
    }
    Ok(llm.norm.forward(&x)?.reshape((b, s, h))?)
}

/// An estimate of the bytes the plain (un-checkpointed) pass keeps for its backward: per layer
/// about 18 hidden-wide and 8 intermediate-wide tensors per position in the weight dtype (the
/// layer's inputs to its norms, projections, adapters and dropout masks), and, where the
/// attention is the composed ops ([`keeps_scores`]), 12 bytes per score of every head (scores,
/// probabilities, the masked sum). Calibrated on the 1b model (width 2048, MLP 5632, f32, 528
/// positions a row; docs/benchmarks.md): 175 MB per layer and row measured with the blocked
/// attention (the estimate: 173 MB), 95 MB more with the composed attention (estimate: 107 MB).
pub fn activation_bytes(model: &Llava, rows: usize, positions: usize) -> u64 {
    let c = &model.llm.config;
    let elem = model.llm.embed_tokens.dtype().size_in_bytes() as u64;
    let n = (rows * positions) as u64;
    let mut per_layer = elem * n * (18 * c.hidden_size as u64 + 8 * c.intermediate_size as u64);
    if keeps_scores(model) {
        per_layer += 12 * (rows * c.num_attention_heads) as u64 * (positions * positions) as u64;
    }
    per_layer * c.num_hidden_layers as u64
}

/// Whether the decoder's attention keeps its (s × t) scores for the backward on the model's
/// device and dtype under the calling thread's kernels: the composed ops do, the blocked op
/// ([`crate::ml::flash`], `runtime.kernels = "on"`) does not.
pub fn keeps_scores(model: &Llava) -> bool {
    let c = &model.llm.config;
    let head_dim = c.hidden_size / c.num_attention_heads.max(1);
    let dtype = model.llm.embed_tokens.dtype();
    match Tensor::zeros((1, 1, 1, head_dim), dtype, &model.device) {
        Ok(q) => !crate::ml::llama::flash_enabled(&q),
        Err(_) => true,
    }
}

/// Bytes free for a step's activations on `device`: the kernel's `MemAvailable` on a Linux
/// CPU, the free memory of a GPU; `None` where it cannot be told.
pub fn free_bytes(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => {
            let text = std::fs::read_to_string("/proc/meminfo").ok()?;
            mem_available(&text)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free as u64),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub(crate) fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// `auto`'s rule: how many decoder layers (the first ones) to checkpoint so that the plain
/// pass's activations of the rest fit in half of the `free` memory. `activation` is the
/// estimate for every shard running at once, spread evenly over `layers` layers. Each
/// checkpointed layer costs a second forward in the backward (a full checkpointing step takes
/// about 1.4× the plain one on the CPU, docs/training.md), so only the excess is checkpointed,
/// and nothing where the plain pass fits; one more layer than the excess covers the saved inputs
/// and the one layer's graph a recompute holds. Unknown free memory: none.
pub fn layers_to_checkpoint(activation: u64, layers: usize, free: Option<u64>) -> usize {
    let Some(free) = free else { return 0 };
    let budget = free / 2;
    if activation <= budget || layers == 0 {
        return 0;
    }
    let per_layer = (activation / layers as u64).max(1);
    let excess = (activation - budget).div_ceil(per_layer);
    (excess as usize).saturating_add(1).min(layers)
}

/// Resolve a [`Checkpointing`] setting for a micro-batch run as `shards` shards at once, each
/// of at most `rows` rows of at most `positions` positions, to the number of decoder layers
/// (the first ones) [`batch_gradients`] checkpoints: all for `on`, none for `off`, and for
/// `auto` what [`layers_to_checkpoint`] says with the device's free memory now.
pub fn resolve(
    setting: Checkpointing,
    model: &Llava,
    shards: usize,
    rows: usize,
    positions: usize,
) -> usize {
    let layers = model.llm.layers.len();
    match setting {
        Checkpointing::On => layers,
        Checkpointing::Off => 0,
        Checkpointing::Auto => {
            let activation =
                activation_bytes(model, rows, positions).saturating_mul(shards.max(1) as u64);
            layers_to_checkpoint(activation, layers, free_bytes(&model.device))
        }
    }
}

/// Gradients of a batch's objective with respect to `vars` (those the graph reaches).
///
/// Only the vars' gradients are kept: candle's backward also leaves gradients for untracked
/// inputs of ops (a dropout mask, a broadcast mask view) in its store, which would otherwise
/// stay alive, layer after layer, until the store is dropped.
///
/// `head` gets the logits (b, t, vocab) and the padded labels and returns the scalar objective
/// to differentiate and a value of its own (the losses to report). With `checkpointed` = k > 0
/// the first k decoder layers (all, for k ≥ their count) and a trained tower are recomputed in
/// the backward (module docs); the gradients are the same.
pub fn batch_gradients<T>(
    model: &Llava,
    vars: &[(String, Var)],
    examples: &[TrainExample],
    pixels: &[Tensor],
    checkpointed: usize,
    head: impl FnOnce(&Tensor, &[Vec<i64>]) -> Result<(Tensor, T)>,
) -> Result<(GradStore, T)> {
    // Move the vars' gradients into a fresh store; the rest is dropped with the old one.
    let strip = |store: &mut GradStore| {
        let mut only = GradStore::default();
        for (_, v) in vars {
            if let Some(g) = store.remove(v.as_tensor()) {
                only.insert(v.as_tensor(), g);
            }
        }
        *store = only;
    };
    if checkpointed == 0 {
        let inputs = prepare_batch(model, examples, pixels)?;
        let hidden = decoder(model, &inputs)?;
        let logits = model.llm.logits(&hidden)?;
        let (objective, value) = head(&logits, &inputs.labels)?;
        let mut grads = objective.backward()?;
        strip(&mut grads);
        return Ok((grads, value));
    }
    // The tower layer by layer (its graph not kept), the projector on its output.
    let tower = if pixels.is_empty() {
        None
    } else {
        Some(TowerTape::forward(model, &Tensor::stack(pixels, 0)?)?)
    };
    let features = match &tower {
        Some(t) => Some(model.projector.forward(&t.features(model)?)?),
        None => None,
    };
    let inputs = embed_batch(model, examples, features)?;
    let llm = &model.llm;
    let dev = &model.device;
    let (b, s, h) = inputs.embeds.dims3()?;
    let (cos, sin) = llm.rope(&inputs.positions)?;
    let x0 = inputs.embeds.reshape((b * s, h))?;
    // Forward through the checkpointed layers: keep each one's input (detached) and the
    // dropout call count before it.
    let k = checkpointed.min(llm.layers.len());
    let mut saved: Vec<(Tensor, Option<u64>)> = Vec::with_capacity(k);
    let mut x = x0.detach();
    for (i, layer) in llm.layers.iter().enumerate().take(k) {
        let calls = dropout::row_calls();
        seed_layer(dev, i)?;
        // The output's graph (this layer's activations) is dropped here: only its values go on.
        let out = layer
            .forward(&x, (b, s), &cos, &sin, &inputs.mask, None)?
            .detach();
        saved.push((x, calls));
        x = out;
    }
    // The layers not checkpointed and the head, with their graph, on the last checkpointed
    // layer's output as a fresh tracked input.
    let top = Var::from_tensor(&x)?;
    drop(x);
    let (mut grads, value, mut g) = {
        let mut y = top.as_tensor().clone();
        for (i, layer) in llm.layers.iter().enumerate().skip(k) {
            seed_layer(dev, i)?;
            y = layer.forward(&y, (b, s), &cos, &sin, &inputs.mask, None)?;
        }
        let hidden = llm.norm.forward(&y)?.reshape((b, s, h))?;
        drop(y);
        let logits = llm.logits(&hidden)?;
        let (objective, value) = head(&logits, &inputs.labels)?;
        let mut grads = objective.backward()?;
        let g = grads
            .remove(top.as_tensor())
            .ok_or_else(|| no_gradient(&format!("decoder layer {k}'s input")))?;
        strip(&mut grads);
        (grads, value, g)
    };
    let end_calls = dropout::row_calls();
    drop(top);
    // Backward through the layers in reverse, one layer's graph alive at a time.
    while let Some((input, calls)) = saved.pop() {
        let i = saved.len();
        dropout::set_row_calls(calls);
        seed_layer(dev, i)?;
        let var = Var::from_tensor(&input)?;
        drop(input);
        let layer_grads = {
            let out =
                llm.layers[i].forward(var.as_tensor(), (b, s), &cos, &sin, &inputs.mask, None)?;
            (out * &g)?.sum_all()?.backward()?
        };
        let mut layer_grads = layer_grads;
        g = layer_grads
            .remove(var.as_tensor())
            .ok_or_else(|| no_gradient(&format!("decoder layer {i}'s input")))?;
        strip(&mut layer_grads);
        grads.extend(layer_grads)?;
    }
    // The embedding side: projector, trainable embeddings and the gradient of a trained
    // tower's output.
    let mut g_tower = None;
    if x0.track_op() {
        let mut side = (x0 * g)?.sum_all()?.backward()?;
        if let Some(out) = tower.as_ref().and_then(TowerTape::output) {
            g_tower = side.remove(out.as_tensor());
        }
        strip(&mut side);
        grads.extend(side)?;
    }
    // The tower in reverse, one layer's graph alive at a time.
    if let Some(tower) = tower {
        if tower.output().is_some() {
            let g = g_tower.ok_or_else(|| no_gradient("the vision tower's output"))?;
            let (tower_grads, _recomputed) = tower.backward(model, g, strip)?;
            #[cfg(test)]
            TOWER_RECOMPUTES.with(|c| c.set(c.get() + _recomputed));
            grads.extend(tower_grads)?;
        }
    }
    dropout::set_row_calls(end_calls);
    Ok((grads, value))
}

fn no_gradient(what: &str) -> MlError {
    MlError::Input(format!(
        "activation checkpointing: no gradient reached {what} (an op without a backward on the \
         decoder path?); set runtime.checkpointing = \"off\" and report this"
    ))
}
