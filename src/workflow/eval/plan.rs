//! Planning an eval: per task, the data identity, the generation and cache keys, and what to
//! do (keep a cached record, re-score stored predictions, or generate). Fails before any model
//! is loaded when a task, its data or its annotations are missing.

use serde_json::{json, Value};

use crate::history::records::to_canonical_json;
use crate::history::{Checkpoint, CoinRepo, EvalRecord};
use crate::ml::image::AspectMode;
use crate::ml::runtime::Runtime;
use crate::store::ObjectId;
use crate::tasks::formats::{self, TestRecord};
use crate::tasks::registry::{Registry, TaskDef};
use crate::tasks::ScoreMode;

use super::super::config::{EvalMode, PromptStyle, RunConfig};
use super::super::WorkflowError;
use super::{find_task, EvalOptions};

/// Version of the generation procedure; part of every generation key, so a change of the
/// prompt or decoding code invalidates cached predictions.
pub const GENERATION_VERSION: u32 = 1;

/// Version of the scoring procedure; part of every cache key.
pub const SCORING_VERSION: u32 = 1;

/// One task's prepared eval: its definition, data identity, keys and what to do.
pub(super) struct TaskPlan {
    pub(super) def: TaskDef,
    pub(super) questions: Vec<TestRecord>,
    pub(super) mode: ScoreMode,
    pub(super) aspect: AspectMode,
    pub(super) max_new_tokens: usize,
    pub(super) prompt: PromptStyle,
    pub(super) eval_set: Value,
    pub(super) decoding: Value,
    pub(super) generation_key: String,
    pub(super) scoring: Value,
    pub(super) cache_key: String,
    pub(super) action: Action,
}

pub(super) enum Action {
    Keep(EvalRecord),
    Rescore(ObjectId),
    Generate,
}

pub(super) fn blake3_json(v: &Value) -> Result<String, WorkflowError> {
    Ok(blake3::hash(to_canonical_json(v)?.as_bytes())
        .to_hex()
        .to_string())
}

/// A test record's text as the user turn's question (before the `<image>\n` that an item with
/// an image gets) and as the `prompt` of its answer line, in `style`.
/// `PromptStyle::Science` is CoIN's `model_vqa_science.py` (L43-56): `<image>` removed, the
/// text trimmed, and the answer line's prompt with `<image>\n` in front for an item with an
/// image. `PromptStyle::Text` keeps the text (`model_vqa.py` and the loader-based generators
/// write the record's `text` as the prompt).
pub(super) fn question_and_prompt(
    style: PromptStyle,
    text: &str,
    has_image: bool,
) -> (String, String) {
    match style {
        PromptStyle::Text => (text.to_string(), text.to_string()),
        PromptStyle::Science => {
            let q = text.replace("<image>", "").trim().to_string();
            let shown = if has_image {
                format!("<image>\n{q}")
            } else {
                q.clone()
            };
            (q, shown)
        }
    }
}

/// The cache key: blake3 of the generation key and the scoring settings (mode, scorer,
/// annotations' blake3, scoring version).
pub(super) fn cache_key(generation_key: &str, scoring: &Value) -> Result<String, WorkflowError> {
    blake3_json(&json!({ "generation": generation_key, "scoring": scoring }))
}

/// The identity of the base model that goes into generation keys: the configured name and
/// directory (content is not hashed: 13 GB per eval would cost more than the eval) and the
/// resolved dtype it runs in.
pub(super) fn base_identity(cfg: &RunConfig, rt: &Runtime) -> Value {
    json!({
        "name": cfg.model.name,
        "base": cfg.model.base,
        "vision_tower": cfg.model.vision_tower,
        "projector": cfg.model.projector,
        "dtype": rt.dtype,
    })
}

/// The blake3 of a checkpoint's adapter content: its manifest's file entries (every entry
/// names its content by hash), so two checkpoints with the same files share cached evals.
pub fn adapter_identity(cp: &Checkpoint) -> Result<String, WorkflowError> {
    let v = serde_json::to_value(&cp.manifest.files).map_err(|source| WorkflowError::Encode {
        what: "a checkpoint manifest",
        source,
    })?;
    blake3_json(&v)
}

pub(super) fn resolve_mode(opts: &EvalOptions, cfg: &RunConfig, def: &TaskDef) -> ScoreMode {
    opts.mode.unwrap_or_else(|| match cfg.eval.mode {
        EvalMode::Compat => ScoreMode::Compat,
        EvalMode::Strict => ScoreMode::Strict,
        EvalMode::Auto => def.default_mode(),
    })
}

/// Check every task's data and work out per task what is cached. Fails before any model is
/// loaded when a task is unknown, its test file is missing or broken, images are missing, or
/// compat scoring lacks its annotations.
pub(super) fn plan(
    repo: &CoinRepo,
    cp: &Checkpoint,
    tasks: &[String],
    cfg: &RunConfig,
    opts: &EvalOptions,
    need_images: bool,
) -> Result<Vec<TaskPlan>, WorkflowError> {
    let reg = Registry::load(&repo.coin_dir().join("tasks"))?;
    let root = repo.root().to_path_buf();
    let adapter = adapter_identity(cp)?;
    let rt = cfg.resolved_runtime()?;
    let mut plans: Vec<TaskPlan> = Vec::new();
    for name in tasks {
        let def = find_task(&reg, name)?.clone();
        if plans.iter().any(|p| p.def.name == def.name) {
            continue;
        }
        let kind = def.scorer_kind()?;
        let test_path = def.resolve(&root, &def.test);
        if !test_path.is_file() {
            return Err(WorkflowError::Input(format!(
                "task '{}': the test file '{}' does not exist (for CoIN-mini: `coin bench-data coin-mini --out DIR` then `coin task add --coin-mini DIR`)",
                def.name,
                test_path.display()
            )));
        }
        let questions = formats::read_test_file(&test_path)?;
        if questions.is_empty() {
            return Err(WorkflowError::Input(format!(
                "task '{}': the test file '{}' has no records",
                def.name,
                test_path.display()
            )));
        }
        if need_images {
            let image_root = def.resolve(&root, &def.image_root);
            formats::check_images(
                &image_root,
                questions.iter().filter_map(|q| q.image.as_deref()),
            )?
            .into_result(&image_root)?;
        }
        let mode = resolve_mode(opts, cfg, &def);
        let annotations = match (&def.annotations, kind.annotations_hint()) {
            (Some(a), Some(_)) => {
                let p = def.resolve(&root, a);
                if !p.exists() {
                    return Err(WorkflowError::Input(format!(
                        "task '{}': the annotations '{}' do not exist",
                        def.name,
                        p.display()
                    )));
                }
                Some(p)
            }
            (None, Some(hint)) if mode == ScoreMode::Compat => {
                return Err(WorkflowError::Input(format!(
                    "task '{}': compat scoring needs {hint}; set `annotations` in its task definition or use --mode strict",
                    def.name
                )));
            }
            _ => None,
        };
        let identity = formats::dataset_identity(&test_path)?;
        let eval_set = json!({
            "file": def.test,
            "blake3": identity.blake3,
            "items": identity.items,
        });
        let aspect = cfg.eval.aspect_for(&def.name);
        let max_new_tokens = cfg.eval.max_new_tokens_for(&def.name);
        let prompt = cfg.eval.prompt_for(&def.name);
        let mut decoding = json!({
            "max_new_tokens": max_new_tokens,
            "image_aspect": aspect,
            "template": "vicuna_v1",
            "greedy": true,
            "version": GENERATION_VERSION,
        });
        // Only a non-default prompt style is named, so earlier generation keys stay valid.
        if prompt != PromptStyle::Text {
            decoding["prompt"] = json!(prompt);
        }
        let generation_key = blake3_json(&json!({
            "adapter": adapter,
            "base": base_identity(cfg, &rt),
            "eval_set": eval_set["blake3"],
            "decoding": decoding,
        }))?;
        let annotations_id = match &annotations {
            Some(p) if p.is_file() => Some(
                blake3::hash(
                    &std::fs::read(p).map_err(WorkflowError::io("read the annotations", p))?,
                )
                .to_hex()
                .to_string(),
            ),
            Some(p) => Some(p.display().to_string()),
            None => None,
        };
        let scoring = json!({
            "mode": mode.to_string(),
            "scorer": kind.name(),
            "annotations": annotations_id,
            "version": SCORING_VERSION,
        });
        let cache_key = cache_key(&generation_key, &scoring)?;
        let existing = cp.evals.get(&def.name).map(|(r, _)| r);
        let action = match existing {
            Some(r) if !opts.force && r.extra.get("cache_key") == Some(&json!(cache_key)) => {
                Action::Keep(r.clone())
            }
            Some(r)
                if !opts.force && r.extra.get("generation_key") == Some(&json!(generation_key)) =>
            {
                match r.object_ids().first() {
                    Some(id) if repo.store().contains(id) => Action::Rescore(*id),
                    _ => Action::Generate,
                }
            }
            _ => Action::Generate,
        };
        plans.push(TaskPlan {
            def,
            questions,
            mode,
            aspect,
            max_new_tokens,
            prompt,
            eval_set,
            decoding,
            generation_key,
            scoring,
            cache_key,
            action,
        });
    }
    Ok(plans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_science_prompt_is_model_vqa_science_s() {
        let text = "<image>\n Which is a mammal?\nA. cat\nB. fish\nAnswer with the option's letter from the given choices directly.\n";
        let bare = "Which is a mammal?\nA. cat\nB. fish\nAnswer with the option's letter from the given choices directly.";
        assert_eq!(
            question_and_prompt(PromptStyle::Science, text, true),
            (bare.to_string(), format!("<image>\n{bare}"))
        );
        // Without an image: no `<image>` anywhere.
        assert_eq!(
            question_and_prompt(PromptStyle::Science, text, false),
            (bare.to_string(), bare.to_string())
        );
        // `text` keeps the record's text as it is.
        assert_eq!(
            question_and_prompt(PromptStyle::Text, text, true),
            (text.to_string(), text.to_string())
        );
    }
}
