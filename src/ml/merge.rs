//! Merging two LoRA adapters exactly (`coin merge`, docs/merge.md).
//!
//! A LoRA module adds ΔW = s·B·A (s = α/r). The weighted sum of two adapters' updates,
//! ΔW = w₁·s₁·B₁A₁ + w₂·s₂·B₂A₂, is itself a LoRA update of rank r₁ + r₂: stack the down
//! projections, A = [A₁; A₂], and put the up projections side by side with their factors folded
//! in, B = [c₁·B₁, c₂·B₂] with cᵢ = wᵢ·sᵢ / s for one common scale s. Then s·B·A is the sum
//! exactly: no SVD, no truncation. coin takes s = s₁ (so α = s₁·(r₁ + r₂)): two adapters of
//! r = 8, α = 16 merge into r = 16, α = 32.
//!
//! The trained projector (`non_lora_trainables`), a full weight, is the weighted average of the
//! two, with the weights normalised to sum 1.
//!
//! TIES ([`FactorMerge::Ties`]) is the factor-wise variant that PEFT's `add_weighted_adapter`
//! (`combination_type="ties"`) makes: TIES-Merging (Yadav et al., NeurIPS 2023) applied to the
//! two `lora_A` matrices and, separately, to the two `lora_B` matrices, each input's weight and
//! scale folded into its factors as √|wᵢ·sᵢ| (the sign of wᵢ·sᵢ on A). It needs equal ranks,
//! keeps the rank r and writes α = r (s = 1). Its ΔW = B·A is NOT the TIES of the inputs' ΔWs
//! (trimming and sign election act on factor entries, and B·A mixes them); docs/merge.md.
//!
//! The output is the layout coin's trainer saves ([`super::train::save`]): `adapter_config.json`
//! (the first adapter's, with the new `r` and `lora_alpha`), `adapter_model.safetensors` under
//! the first adapter's module keys, and `non_lora_trainables.safetensors` when both inputs have
//! a projector. MoELoRA is refused: its router mixes experts per token, so two MoELoRA
//! adapters do not add up to one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::linear::{Adapter, Lora};
use super::load::{write_safetensors, Layout};
use super::peft::{AdapterConfig, PeftAdapter};
use super::train::params::AdapterKind;
use super::train::save::saved_tensors;
use super::{MlError, Result};
use crate::store::fsutil::write_atomic;

/// What [`merge_lora`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct MergedAdapter {
    /// The merged rank: r₁ + r₂ (exact merge), r (TIES).
    pub rank: usize,
    /// The common scale s (= α / r of the merged adapter).
    pub scale: f64,
    /// How many modules carry an adapter.
    pub modules: usize,
    /// Whether a merged projector was written.
    pub projector: bool,
}

/// How [`merge_lora`] combines the modules' factors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FactorMerge {
    /// Exact: the ranks stacked (r₁ + r₂), ΔW = w₁·ΔW₁ + w₂·ΔW₂.
    Concat,
    /// TIES on the A factors and on the B factors (equal ranks; see [`ties`]), each input
    /// trimmed to its `density` share of entries of largest magnitude.
    Ties {
        /// The share of each factor's entries kept (0 < density ≤ 1).
        density: f64,
    },
}

/// Keep the ⌊`density`·n⌋ entries of `values` of largest magnitude (among equal magnitudes the
/// earlier position wins) and zero the rest: TIES' trim step.
pub fn trim_top(values: &[f32], density: f64) -> Vec<f32> {
    let k = ((density * values.len() as f64).floor() as usize).min(values.len());
    let mut order: Vec<usize> = (0..values.len()).collect();
    // Stable: equal magnitudes keep their order.
    order.sort_by(|&i, &j| values[j].abs().total_cmp(&values[i].abs()));
    let mut out = vec![0.0f32; values.len()];
    for &i in &order[..k] {
        out[i] = values[i];
    }
    out
}

/// TIES-Merging (Yadav et al., NeurIPS 2023) of equally long `inputs`, as PEFT's `ties` merge
/// utility orders it: trim each input ([`trim_top`]); elect each entry's sign as the sign of
/// the sum of the trimmed values (+ when the sum is 0); the result is the mean, over the
/// inputs whose trimmed entry is non-zero with the elected sign, of that entry times the
/// input's weight (0 where no input agrees).
pub fn ties(inputs: &[&[f32]], weights: &[f64], density: f64) -> Vec<f32> {
    let trimmed: Vec<Vec<f32>> = inputs.iter().map(|v| trim_top(v, density)).collect();
    let n = inputs.first().map_or(0, |v| v.len());
    (0..n)
        .map(|e| {
            let sum: f64 = trimmed.iter().map(|t| f64::from(t[e])).sum();
            let elected = if sum >= 0.0 { 1.0 } else { -1.0 };
            let (mut total, mut count) = (0.0f64, 0usize);
            for (t, w) in trimmed.iter().zip(weights) {
                let v = f64::from(t[e]);
                if v != 0.0 && v.signum() == elected {
                    total += v * w;
                    count += 1;
                }
            }
            if count == 0 {
                0.0
            } else {
                (total / count as f64) as f32
            }
        })
        .collect()
}

/// [`ties`] of same-shaped f32 tensors, in that shape.
fn ties_tensors(inputs: [&Tensor; 2], weights: [f64; 2], density: f64) -> Result<Tensor> {
    let flat = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let (a, b) = (flat(inputs[0])?, flat(inputs[1])?);
    let merged = ties(&[&a, &b], &weights, density);
    Ok(Tensor::from_vec(
        merged,
        inputs[0].shape(),
        inputs[0].device(),
    )?)
}

/// The update ΔW = s·B·A (out × in) of a LoRA module, in f32.
pub fn delta_w(lora: &Lora) -> Result<Tensor> {
    let a = lora.a.to_dtype(DType::F32)?;
    let b = lora.b.to_dtype(DType::F32)?;
    Ok((b.matmul(&a)? * lora.scale)?)
}

fn refuse(dir: &Path, message: String) -> MlError {
    MlError::Unsupported {
        path: dir.to_path_buf(),
        message,
    }
}

fn loras(adapter: &PeftAdapter) -> Result<BTreeMap<&str, &Lora>> {
    if let AdapterKind::MoeLora { .. } = adapter.kind {
        return Err(refuse(
            &adapter.dir,
            "merging MoELoRA adapters is not supported yet: each one's router weighs its \
             experts per token, so two of them do not add up to one adapter"
                .into(),
        ));
    }
    adapter
        .layers
        .iter()
        .map(|(name, a)| match a {
            Adapter::Lora(l) => Ok((name.as_str(), l)),
            Adapter::MoeLora(_) | Adapter::Olora { .. } => Err(refuse(
                &adapter.dir,
                format!("module '{name}' holds a MoELoRA adapter"),
            )),
        })
        .collect()
}

/// Merge the LoRA adapters in `dirs` with `weights` into `out` (created; files already there
/// are replaced): with [`FactorMerge::Concat`] exactly (ΔW = w₁·ΔW₁ + w₂·ΔW₂), with
/// [`FactorMerge::Ties`] by TIES on the factors (see the module docs). The weights must be
/// finite; when both adapters carry a projector the weights must have a positive sum (the
/// projector is their average with the weights normalised, for either method).
pub fn merge_lora(
    dirs: [&Path; 2],
    weights: [f64; 2],
    how: FactorMerge,
    out: &Path,
) -> Result<MergedAdapter> {
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        return Err(MlError::Input(format!(
            "merge weight {w} is not a finite number"
        )));
    }
    if let FactorMerge::Ties { density } = how {
        if !(density > 0.0 && density <= 1.0) {
            return Err(MlError::Input(format!(
                "TIES density {density} is outside (0, 1]: it is the share of each factor's \
                 entries kept, e.g. 0.2"
            )));
        }
    }
    let load = |d: &Path| PeftAdapter::load(d, &Device::Cpu, DType::F32);
    let inputs = [load(dirs[0])?, load(dirs[1])?];
    let layers = [loras(&inputs[0])?, loras(&inputs[1])?];
    let names = |i: usize| layers[i].keys().copied().collect::<Vec<_>>();
    if names(0) != names(1) {
        let only = |i: usize, j: usize| -> Vec<&str> {
            layers[i]
                .keys()
                .filter(|k| !layers[j].contains_key(*k))
                .copied()
                .take(3)
                .collect()
        };
        return Err(MlError::Input(format!(
            "the adapters in '{}' and '{}' adapt different modules (only in the first: {:?}, \
             only in the second: {:?}); merge adapters trained with the same target modules",
            dirs[0].display(),
            dirs[1].display(),
            only(0, 1),
            only(1, 0)
        )));
    }
    let first = layers[0]
        .values()
        .next()
        .ok_or_else(|| MlError::Input(format!("'{}' holds no adapter", dirs[0].display())))?;
    // TIES folds each input's scale into its factors: the merged adapter has s = 1.
    let scale = match how {
        FactorMerge::Concat => first.scale,
        FactorMerge::Ties { .. } => 1.0,
    };
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut rank: Option<usize> = None;
    for (name, l1) in &layers[0] {
        let l2 = layers[1][name];
        let (r1, in1) = l1.a.dims2()?;
        let (r2, in2) = l2.a.dims2()?;
        let (out1, out2) = (l1.b.dim(0)?, l2.b.dim(0)?);
        if (in1, out1) != (in2, out2) {
            return Err(MlError::Input(format!(
                "module '{name}' is {out1} × {in1} in '{}' but {out2} × {in2} in '{}': the \
                 adapters were trained on different base models",
                dirs[0].display(),
                dirs[1].display()
            )));
        }
        let r = match how {
            FactorMerge::Concat => r1 + r2,
            FactorMerge::Ties { .. } if r1 == r2 => r1,
            FactorMerge::Ties { .. } => {
                return Err(MlError::Input(format!(
                    "module '{name}' has rank {r1} in '{}' but {r2} in '{}': TIES merges the \
                     factors entry by entry, which needs equal ranks; use --method average or \
                     task-arithmetic (ranks stacked)",
                    dirs[0].display(),
                    dirs[1].display()
                )))
            }
        };
        if rank.is_some_and(|x| x != r) {
            return Err(MlError::Input(format!(
                "the adapters in '{}' and '{}' have different ranks per module (rank_pattern); \
                 merging needs one rank per adapter",
                dirs[0].display(),
                dirs[1].display()
            )));
        }
        rank = Some(r);
        let (a, b) = match how {
            FactorMerge::Concat => {
                let c1 = weights[0] * l1.scale / scale;
                let c2 = weights[1] * l2.scale / scale;
                (
                    Tensor::cat(&[&l1.a, &l2.a], 0)?.contiguous()?,
                    Tensor::cat(&[(&l1.b * c1)?, (&l2.b * c2)?], 1)?.contiguous()?,
                )
            }
            FactorMerge::Ties { density } => {
                // √|wᵢ·sᵢ| on both factors, the sign of wᵢ·sᵢ on A only.
                let ws = [weights[0] * l1.scale, weights[1] * l2.scale];
                let root = ws.map(|x| x.abs().sqrt());
                let signed = [root[0] * ws[0].signum(), root[1] * ws[1].signum()];
                (
                    ties_tensors([&l1.a, &l2.a], signed, density)?,
                    ties_tensors([&l1.b, &l2.b], root, density)?,
                )
            }
        };
        let key = inputs[0]
            .module_keys
            .get(*name)
            .cloned()
            .unwrap_or_else(|| name.to_string());
        tensors.push((format!("{key}.lora_A.weight"), a));
        tensors.push((format!("{key}.lora_B.weight"), b));
    }
    let rank = rank.unwrap_or_default();

    let projector = match (&inputs[0].projector, &inputs[1].projector) {
        (None, None) => None,
        (Some(p1), Some(p2)) => {
            let sum = weights[0] + weights[1];
            if sum <= 0.0 {
                return Err(MlError::Input(format!(
                    "the merge weights {} and {} sum to {sum}; the projectors are averaged \
                     with the weights normalised, which needs a positive sum",
                    weights[0], weights[1]
                )));
            }
            let (n1, n2) = (weights[0] / sum, weights[1] / sum);
            let mut merged = Vec::new();
            for (name, t1) in &p1.tensors {
                let t2 = p2.tensors.get(name).ok_or_else(|| {
                    MlError::Input(format!(
                        "the projector '{}' has '{name}' but '{}' has not",
                        p1.file.display(),
                        p2.file.display()
                    ))
                })?;
                if t1.dims() != t2.dims() || p1.tensors.len() != p2.tensors.len() {
                    return Err(MlError::Input(format!(
                        "the projectors '{}' and '{}' differ in shape: the adapters were \
                         trained on different base models",
                        p1.file.display(),
                        p2.file.display()
                    )));
                }
                let t = ((t1 * n1)? + (t2 * n2)?)?;
                merged.extend(saved_tensors(name, &t, AdapterKind::Lora, Layout::Split)?);
            }
            Some(merged)
        }
        (Some(p), None) | (None, Some(p)) => {
            return Err(MlError::Input(format!(
                "only one of the adapters carries a trained projector ('{}'); merge adapters \
                 trained with the same train.mm_projector_lr (both trained or both frozen)",
                p.file.display()
            )))
        }
    };

    std::fs::create_dir_all(out).map_err(|source| MlError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let mut config: AdapterConfig = inputs[0].config.clone();
    config.r = Some(rank);
    config.lora_alpha = Some(scale * rank as f64);
    if config.use_rslora.is_some() {
        config.use_rslora = Some(false);
    }
    if config.rank_pattern.is_some() {
        config.rank_pattern = Some(BTreeMap::new());
    }
    if config.alpha_pattern.is_some() {
        config.alpha_pattern = Some(BTreeMap::new());
    }
    let mut text = serde_json::to_string_pretty(&config).map_err(|source| MlError::Encode {
        what: "the merged adapter config",
        source,
    })?;
    text.push('\n');
    let cfg_path = out.join("adapter_config.json");
    write_atomic(&cfg_path, text).map_err(|source| MlError::Write {
        path: cfg_path.clone(),
        source,
    })?;
    write_safetensors(&out.join("adapter_model.safetensors"), &tensors)?;
    let has_projector = projector.is_some();
    let proj_path: PathBuf = out.join("non_lora_trainables.safetensors");
    if let Some(p) = projector {
        write_safetensors(&proj_path, &p)?;
    }
    Ok(MergedAdapter {
        rank,
        scale,
        modules: layers[0].len(),
        projector: has_projector,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)]

    use super::*;
    use crate::ml::llava::{load_model, Llava, ModelSource};
    use crate::ml::rng::Rng;
    use crate::ml::tiny::{write_tiny, TinyOptions};
    use crate::ml::train::params::{AdapterSettings, TrainableParams};
    use crate::ml::train::save::save_adapter;

    fn tiny(dir: &Path) -> Llava {
        let m = write_tiny(dir, &TinyOptions::default()).expect("tiny model writes");
        let src = ModelSource::resolve(&m, None, None).expect("resolves");
        load_model(&src, &Device::Cpu, DType::F32)
            .expect("loads")
            .model
    }

    /// A saved adapter of rank `r`, α `alpha`, every value random (seeded).
    fn adapter(
        model: &mut Llava,
        dir: &Path,
        kind: AdapterKind,
        r: usize,
        alpha: f64,
        projector: bool,
        seed: u64,
    ) {
        let settings = AdapterSettings {
            kind,
            r,
            alpha,
            dropout: 0.0,
            seed,
            train_projector: projector,
            ..AdapterSettings::default()
        };
        let params = TrainableParams::attach(model, &settings).expect("attach");
        let mut rng = Rng::new(seed);
        for (_, var) in &params.vars {
            let t = Tensor::from_vec(
                rng.normal_vec(var.elem_count(), 0.2),
                var.shape(),
                &Device::Cpu,
            )
            .expect("values");
            var.set(&t).expect("set");
        }
        save_adapter(&params, dir, "tiny").expect("save");
        for (_, lin) in model.linears_mut() {
            lin.adapter = None;
        }
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.max(0))
            .and_then(|t| t.to_scalar::<f32>())
            .expect("max")
    }

    fn lora_of(a: &PeftAdapter, name: &str) -> Lora {
        match &a.layers[name] {
            Adapter::Lora(l) => l.clone(),
            _ => panic!("a LoRA module"),
        }
    }

    #[test]
    fn concatenated_ranks_give_the_weighted_sum_of_the_updates_exactly() {
        let t = tempfile::tempdir().expect("tmp");
        let mut model = tiny(&t.path().join("m"));
        let (a, b, out) = (t.path().join("a"), t.path().join("b"), t.path().join("out"));
        // Different ranks and scales: s₁ = 16/8 = 2, s₂ = 4/4 = 1.
        adapter(&mut model, &a, AdapterKind::Lora, 8, 16.0, true, 1);
        adapter(&mut model, &b, AdapterKind::Lora, 4, 4.0, true, 2);
        for weights in [[0.5, 0.5], [1.0, 1.0], [0.3, -0.7]] {
            let merged = merge_lora([&a, &b], weights, FactorMerge::Concat, &out);
            if weights == [0.3, -0.7] {
                // A negative sum leaves no average for the projectors.
                let e = merged.expect_err("refused").to_string();
                assert!(e.contains("positive sum"), "{e}");
                continue;
            }
            let merged = merged.expect("merges");
            assert_eq!(merged.rank, 12);
            assert_eq!(merged.scale, 2.0);
            assert!(merged.projector);
            let load = |d: &Path| PeftAdapter::load(d, &Device::Cpu, DType::F32).expect("loads");
            let (pa, pb, pm) = (load(&a), load(&b), load(&out));
            assert_eq!(pm.rank(), Some(12));
            assert_eq!(pm.config.lora_alpha, Some(24.0));
            assert_eq!(pm.layers.len(), pa.layers.len());
            assert_eq!(pm.module_keys, pa.module_keys);
            for name in pa.layers.keys() {
                let want = ((delta_w(&lora_of(&pa, name)).expect("ΔW") * weights[0]).expect("w")
                    + (delta_w(&lora_of(&pb, name)).expect("ΔW") * weights[1]).expect("w"))
                .expect("sum");
                let got = delta_w(&lora_of(&pm, name)).expect("ΔW");
                let d = max_abs(&(got - &want).expect("diff"));
                assert!(d <= 1e-5 * max_abs(&want).max(1.0), "{name}: {d}");
            }
            // The projector is the normalised average.
            let (p1, p2, p3) = (
                pa.projector.expect("p"),
                pb.projector.expect("p"),
                pm.projector.expect("p"),
            );
            let sum = weights[0] + weights[1];
            for (n, t3) in &p3.tensors {
                let want = ((&p1.tensors[n] * (weights[0] / sum)).expect("w")
                    + (&p2.tensors[n] * (weights[1] / sum)).expect("w"))
                .expect("sum");
                assert!(max_abs(&(t3 - want).expect("diff")) < 1e-6, "{n}");
            }
        }
    }

    #[test]
    fn the_engine_runs_the_merged_adapter_as_the_base_model_plus_the_summed_updates() {
        use crate::ml::train::batch::forward_batch;
        let t = tempfile::tempdir().expect("tmp");
        let mut model = tiny(&t.path().join("m"));
        let (a, b, out) = (t.path().join("a"), t.path().join("b"), t.path().join("out"));
        adapter(&mut model, &a, AdapterKind::Lora, 4, 8.0, false, 3);
        adapter(&mut model, &b, AdapterKind::Lora, 4, 8.0, false, 4);
        let w = [0.8, 0.6];
        merge_lora([&a, &b], w, FactorMerge::Concat, &out).expect("merges");
        let load = |d: &Path| PeftAdapter::load(d, &Device::Cpu, DType::F32).expect("loads");
        let (pa, pb, pm) = (load(&a), load(&b), load(&out));
        assert!(pm.projector.is_none());

        let vocab = model.config.text.vocab_size as u32;
        let mut rng = Rng::new(7);
        let ids: Vec<u32> = (0..12)
            .map(|_| 4 + (rng.next_u64() % (vocab as u64 - 4)) as u32)
            .collect();
        let ex = crate::ml::train::batch::TrainExample {
            segments: vec![
                crate::ml::llava::Segment::Text(ids[..5].to_vec()),
                crate::ml::llava::Segment::Image,
                crate::ml::llava::Segment::Text(ids[5..].to_vec()),
            ],
            text_labels: vec![-100; 12],
        };
        let px = Tensor::from_vec(
            Rng::new(8).normal_vec(3 * 32 * 32, 1.0),
            (3, 32, 32),
            &Device::Cpu,
        )
        .expect("pixels");
        let logits = |m: &Llava| -> Tensor {
            forward_batch(m, std::slice::from_ref(&ex), std::slice::from_ref(&px))
                .expect("forward")
                .0
        };
        let base = logits(&model);
        let merged = pm.with_attached(&mut model, logits).expect("attaches");
        // The reference: no adapter, every adapted weight W + w₁ΔW₁ + w₂ΔW₂.
        for (name, lin) in model.linears_mut() {
            if let Some(Adapter::Lora(l1)) = pa.layers.get(&name) {
                let Adapter::Lora(l2) = &pb.layers[&name] else {
                    panic!("LoRA")
                };
                let dw = ((delta_w(l1).expect("ΔW") * w[0]).expect("w")
                    + (delta_w(l2).expect("ΔW") * w[1]).expect("w"))
                .expect("sum");
                lin.weight = (&lin.weight + dw).expect("fold");
            }
        }
        let folded = logits(&model);
        let d = max_abs(&(&merged - &folded).expect("diff"));
        let moved = max_abs(&(&merged - &base).expect("diff"));
        assert!(
            moved > 1e-2,
            "the merged adapter changes the logits ({moved})"
        );
        assert!(d < 1e-4, "merged vs folded logits differ by {d}");
    }

    #[test]
    fn moelora_and_mismatched_adapters_are_refused() {
        let t = tempfile::tempdir().expect("tmp");
        let mut model = tiny(&t.path().join("m"));
        let (a, moe, noproj, out) = (
            t.path().join("a"),
            t.path().join("moe"),
            t.path().join("noproj"),
            t.path().join("out"),
        );
        adapter(&mut model, &a, AdapterKind::Lora, 4, 8.0, true, 1);
        adapter(
            &mut model,
            &moe,
            AdapterKind::MoeLora { experts: 2 },
            4,
            8.0,
            true,
            2,
        );
        adapter(&mut model, &noproj, AdapterKind::Lora, 4, 8.0, false, 3);
        let e = merge_lora([&a, &moe], [0.5, 0.5], FactorMerge::Concat, &out)
            .expect_err("MoELoRA")
            .to_string();
        assert!(
            e.contains("not supported yet") && e.contains("router"),
            "{e}"
        );
        let e = merge_lora([&a, &noproj], [0.5, 0.5], FactorMerge::Concat, &out)
            .expect_err("projector")
            .to_string();
        assert!(e.contains("only one of the adapters"), "{e}");
        let e = merge_lora([&a, &a], [f64::NAN, 0.5], FactorMerge::Concat, &out)
            .expect_err("NaN")
            .to_string();
        assert!(e.contains("not a finite number"), "{e}");
        assert!(!out.exists(), "nothing written");
    }

    /// TIES worked by hand: two rank-1 adapters, A 1 × 4 and B 3 × 1, density 0.5 (A keeps 2
    /// entries, B ⌊1.5⌋ = 1), weights 1, 1, scales s₁ = 4 (α 4) and s₂ = 1 (α 1), so the A
    /// factors are weighted 2 and 1 (√(w·s)), the B factors 2 and 1.
    #[test]
    fn ties_of_two_rank_one_factors_by_hand() {
        let a1 = [0.4f32, -0.1, 0.3, -0.5];
        let a2 = [-0.6f32, 0.2, 0.1, -0.2];
        // Trim: a1 keeps -0.5 and 0.4; a2 keeps -0.6 and, of the equal 0.2 and -0.2, the
        // earlier 0.2.
        assert_eq!(trim_top(&a1, 0.5), [0.4, 0.0, 0.0, -0.5]);
        assert_eq!(trim_top(&a2, 0.5), [-0.6, 0.2, 0.0, 0.0]);
        // Elect: sums -0.2 (−), 0.2 (+), 0 (+, nobody left), -0.5 (−). Disjoint mean of the
        // weighted agreeing entries: [-0.6·1, 0.2·1, 0, -0.5·2].
        let a = ties(&[&a1, &a2], &[2.0, 1.0], 0.5);
        let want_a = [-0.6f32, 0.2, 0.0, -1.0];
        for (g, w) in a.iter().zip(want_a) {
            assert!((g - w).abs() < 1e-6, "{a:?}");
        }
        let b1 = [0.5f32, -0.3, 0.2];
        let b2 = [0.7f32, 0.1, -0.4];
        assert_eq!(trim_top(&b1, 0.5), [0.5, 0.0, 0.0]);
        // Both agree on entry 0: (0.5·2 + 0.7·1) / 2.
        let b = ties(&[&b1, &b2], &[2.0, 1.0], 0.5);
        let want_b = [0.85f32, 0.0, 0.0];
        for (g, w) in b.iter().zip(want_b) {
            assert!((g - w).abs() < 1e-6, "{b:?}");
        }
        // The merged ΔW = B·A (s = 1) against TIES applied to the ΔWs themselves
        // (ΔW₁ = 4·B₁A₁, ΔW₂ = B₂A₂, weights 1, 1, density 0.5): not the same matrix.
        let outer = |b: &[f32], a: &[f32], s: f32| -> Vec<f32> {
            b.iter()
                .flat_map(|x| a.iter().map(move |y| s * x * y))
                .collect()
        };
        let merged = outer(&b, &a, 1.0);
        let on_dw = ties(
            &[&outer(&b1, &a1, 4.0), &outer(&b2, &a2, 1.0)],
            &[1.0, 1.0],
            0.5,
        );
        // Row 0 of the merged ΔW is 0.85·A; rows 1 and 2 are zero, since B kept one entry.
        assert!((merged[3] - (-0.85)).abs() < 1e-6, "{merged:?}");
        assert!(merged[4..].iter().all(|v| *v == 0.0), "{merged:?}");
        // TIES on ΔW keeps 6 of the 12 entries, some in rows 1 and 2 (e.g. ΔW₁[1][3] =
        // 4·(-0.3)·(-0.5) = 0.6).
        assert!((on_dw[7] - 0.6).abs() < 1e-6, "{on_dw:?}");
        let diff = merged
            .iter()
            .zip(&on_dw)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(diff > 0.5, "{merged:?} vs {on_dw:?}");
    }

    #[test]
    fn ties_of_an_adapter_with_itself_at_full_density_is_that_adapter() {
        // Identical inputs, weights 1, 1, nothing trimmed: every entry agrees with itself, the
        // disjoint mean is the entry times √s, and B·A = s·B₁A₁ = ΔW₁.
        let t = tempfile::tempdir().expect("tmp");
        let mut model = tiny(&t.path().join("m"));
        let (a, b, out) = (t.path().join("a"), t.path().join("b"), t.path().join("out"));
        adapter(&mut model, &a, AdapterKind::Lora, 4, 16.0, true, 5);
        adapter(&mut model, &b, AdapterKind::Lora, 4, 16.0, true, 5);
        let merged = merge_lora(
            [&a, &b],
            [1.0, 1.0],
            FactorMerge::Ties { density: 1.0 },
            &out,
        )
        .expect("merges");
        assert_eq!((merged.rank, merged.scale), (4, 1.0));
        let load = |d: &Path| PeftAdapter::load(d, &Device::Cpu, DType::F32).expect("loads");
        let (pa, pm) = (load(&a), load(&out));
        assert_eq!(pm.rank(), Some(4));
        assert_eq!(pm.config.lora_alpha, Some(4.0));
        for name in pa.layers.keys() {
            let want = delta_w(&lora_of(&pa, name)).expect("ΔW");
            let got = delta_w(&lora_of(&pm, name)).expect("ΔW");
            let d = max_abs(&(got - &want).expect("diff"));
            assert!(d <= 1e-5 * max_abs(&want).max(1.0), "{name}: {d}");
        }
        // At density 0.2 each merged factor keeps at most 20 % of its entries non-zero.
        merge_lora(
            [&a, &b],
            [1.0, 1.0],
            FactorMerge::Ties { density: 0.2 },
            &out,
        )
        .expect("merges");
        let pm = load(&out);
        for name in pa.layers.keys() {
            let l = lora_of(&pm, name);
            for f in [&l.a, &l.b] {
                let v = f.flatten_all().and_then(|x| x.to_vec1::<f32>()).expect("v");
                let kept = v.iter().filter(|x| **x != 0.0).count();
                assert!(
                    kept <= v.len() / 5 && kept > 0,
                    "{name}: {kept}/{}",
                    v.len()
                );
            }
        }
    }

    #[test]
    fn ties_refuses_unequal_ranks_and_bad_densities() {
        let t = tempfile::tempdir().expect("tmp");
        let mut model = tiny(&t.path().join("m"));
        let (a, b, out) = (t.path().join("a"), t.path().join("b"), t.path().join("out"));
        adapter(&mut model, &a, AdapterKind::Lora, 8, 16.0, false, 1);
        adapter(&mut model, &b, AdapterKind::Lora, 4, 8.0, false, 2);
        let e = merge_lora(
            [&a, &b],
            [1.0, 1.0],
            FactorMerge::Ties { density: 0.2 },
            &out,
        )
        .expect_err("ranks")
        .to_string();
        assert!(e.contains("needs equal ranks"), "{e}");
        for d in [0.0, 1.5, f64::NAN] {
            let e = merge_lora([&a, &a], [1.0, 1.0], FactorMerge::Ties { density: d }, &out)
                .expect_err("density")
                .to_string();
            assert!(e.contains("outside (0, 1]"), "{d}: {e}");
        }
        assert!(!out.exists(), "nothing written");
    }
}
