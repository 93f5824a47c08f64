//! Activation checkpointing per decoder layer: gradients of a batch's objective without
//! keeping every layer's activations alive at once.
//!
//! Without it, candle's backward needs the graph of the whole forward: every intermediate of
//! every layer (attention scores and probabilities, the MLP's wide activations, the adapters'
//! inputs) stays alive until the backward has passed it. With it ([`batch_gradients`] with
//! `checkpointed`):
//!
//! 1. the forward keeps only each layer's input, detached (no graph); each layer's graph is
//!    dropped as soon as its output is taken;
//! 2. the loss head (final norm, `lm_head`, the caller's objective: masked cross-entropy and a
//!    method's outputs term) runs on the last layer's output made a fresh tracked input, and its
//!    backward gives the parameters' gradients there and `g_L`, the gradient of that input;
//! 3. the layers are walked in reverse: layer `i` is recomputed from its saved input made a
//!    fresh tracked input (`Var::from_tensor`), the backward of `sum(out ⊙ g_{i+1})` gives its
//!    parameters' gradients (accumulated into one [`GradStore`]) and `g_i`, and the layer's
//!    graph is dropped before the next;
//! 4. the embedding side (projector, a trained tower, trainable embeddings) gets its gradients
//!    from one more backward, of `sum(x_0 ⊙ g_0)` through the embeddings' own graph.
//!
//! The recompute draws the forward's dropout masks: on the CPU the row-keyed masks
//! ([`super::dropout::with_rows`]) are a function of the call count, which is saved before each
//! layer's forward and restored before its recompute; on a GPU the device generator is re-seeded
//! before every layer (in both modes, so checkpointing does not change the masks). The
//! gradients equal the plain pass's (tests: `checkpoint_tests`), so the setting is not part of
//! the training key.
//!
//! Peak memory then holds the saved layer inputs (layers × b·t·hidden), one layer's graph and
//! the head's (logits are b·t·vocab); docs/training.md has what was measured.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use super::batch::{prepare_batch, BatchInputs, TrainExample};
use super::dropout;
use crate::ml::llava::Llava;
use crate::ml::runtime::Checkpointing;
use crate::ml::{MlError, Result};

/// Seeds of the GPU's dropout masks of layer `i` are salted with this plus `i`.
const LAYER_SALT: u64 = 1 << 40;

/// On a GPU inside a trainer's row context, re-seed the device generator for layer `i` (its
/// dropout masks are then a function of the step, the rows and the layer).
fn seed_layer(device: &Device, i: usize) -> Result<()> {
    if device.is_cpu() {
        return Ok(());
    }
    if let Some(seed) = dropout::row_seed(LAYER_SALT + i as u64) {
        device.set_seed(seed)?;
    }
    Ok(())
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

/// A rough estimate of the bytes the plain (un-checkpointed) pass keeps for its backward:
/// per layer about 12 hidden-wide and 4 intermediate-wide tensors per position in the weight
/// dtype, and the attention scores and probabilities (f32) of every head.
pub fn activation_bytes(model: &Llava, rows: usize, positions: usize) -> u64 {
    let c = &model.llm.config;
    let elem = model.llm.embed_tokens.dtype().size_in_bytes() as u64;
    let n = (rows * positions) as u64;
    let per_layer = elem * n * (12 * c.hidden_size as u64 + 4 * c.intermediate_size as u64)
        + 8 * (rows * c.num_attention_heads) as u64 * (positions * positions) as u64;
    per_layer * c.num_hidden_layers as u64
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

/// `auto`'s rule: checkpoint when the plain pass's activations (`activation`, the estimate of
/// every shard running at once) would take more than half of the `free` memory. Checkpointing
/// costs a second forward of every layer (1.2–1.7× the step time, docs/training.md), so it is
/// used where the plain pass would not fit or would crowd the machine, not where it merely
/// saves memory that is there anyway. Unknown free memory: off.
pub fn pays(activation: u64, free: Option<u64>) -> bool {
    free.is_some_and(|f| activation > f / 2)
}

/// Resolve a [`Checkpointing`] setting for a micro-batch run as `shards` shards at once, each
/// of at most `rows` rows of at most `positions` positions: `auto` asks [`pays`] with the
/// device's free memory now.
pub fn resolve(
    setting: Checkpointing,
    model: &Llava,
    shards: usize,
    rows: usize,
    positions: usize,
) -> bool {
    match setting {
        Checkpointing::On => true,
        Checkpointing::Off => false,
        Checkpointing::Auto => {
            let activation =
                activation_bytes(model, rows, positions).saturating_mul(shards.max(1) as u64);
            pays(activation, free_bytes(&model.device))
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
/// to differentiate and a value of its own (the losses to report). With `checkpointed` the
/// layers are recomputed in the backward (module docs); the gradients are the same.
pub fn batch_gradients<T>(
    model: &Llava,
    vars: &[(String, Var)],
    examples: &[TrainExample],
    pixels: &[Tensor],
    checkpointed: bool,
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
    let inputs = prepare_batch(model, examples, pixels)?;
    if !checkpointed {
        let hidden = decoder(model, &inputs)?;
        let logits = model.llm.logits(&hidden)?;
        let (objective, value) = head(&logits, &inputs.labels)?;
        let mut grads = objective.backward()?;
        strip(&mut grads);
        return Ok((grads, value));
    }
    let llm = &model.llm;
    let dev = &model.device;
    let (b, s, h) = inputs.embeds.dims3()?;
    let (cos, sin) = llm.rope(&inputs.positions)?;
    let x0 = inputs.embeds.reshape((b * s, h))?;
    // Forward: keep each layer's input (detached) and the dropout call count before it.
    let mut saved: Vec<(Tensor, Option<u64>)> = Vec::with_capacity(llm.layers.len());
    let mut x = x0.detach();
    for (i, layer) in llm.layers.iter().enumerate() {
        let calls = dropout::row_calls();
        seed_layer(dev, i)?;
        // The output's graph (this layer's activations) is dropped here: only its values go on.
        let out = layer
            .forward(&x, (b, s), &cos, &sin, &inputs.mask, None)?
            .detach();
        saved.push((x, calls));
        x = out;
    }
    let end_calls = dropout::row_calls();
    // The head on the last layer's output as a fresh tracked input.
    let top = Var::from_tensor(&x)?;
    drop(x);
    let (mut grads, value, mut g) = {
        let hidden = llm.norm.forward(top.as_tensor())?.reshape((b, s, h))?;
        let logits = llm.logits(&hidden)?;
        let (objective, value) = head(&logits, &inputs.labels)?;
        let mut grads = objective.backward()?;
        let g = grads
            .remove(top.as_tensor())
            .ok_or_else(|| no_gradient("the last decoder layer's output"))?;
        strip(&mut grads);
        (grads, value, g)
    };
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
    dropout::set_row_calls(end_calls);
    // The embedding side: projector (and tower), trainable embeddings.
    if x0.track_op() {
        let mut side = (x0 * g)?.sum_all()?.backward()?;
        strip(&mut side);
        grads.extend(side)?;
    }
    Ok((grads, value))
}

fn no_gradient(what: &str) -> MlError {
    MlError::Input(format!(
        "activation checkpointing: no gradient reached {what} (an op without a backward on the \
         decoder path?); set runtime.checkpointing = \"off\" and report this"
    ))
}
