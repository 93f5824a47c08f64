//! Importing a CoIN experiment (`coin import coin-run ROOT`): find the stage checkpoints and
//! results dirs CoIN's scripts left on disk (both layouts, LoRA and MoELoRA), score the answer
//! files with coin's compat scorers, and write one checkpoint per training stage on a branch.
//!
//! [`plan`] only reads: it maps stages to their adapter dirs and results dirs, scores every
//! `merge.jsonl`, reads the scores CoIN printed and the judge replies, and lists what is
//! missing. [`execute`] writes the plan: each stage a checkpoint parented on the previous
//! stage's (the first stage has no parent), written detached; the branch moves once, by
//! compare-and-swap, after the last stage. A stage whose files and parent match the branch's
//! checkpoint at that position is reused (re-running an import writes nothing new), and an
//! eval record equal to the one already there is not written again.
//!
//! See docs/import.md for what is read and why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value};

use crate::history::records::{gk_task, GK_METRIC};
use crate::history::{CheckpointId, CoinRepo, CommitRequest, EvalRecord, SourceFile};
use crate::tasks::formats::{read_answer_file, read_test_file};
use crate::tasks::judge::{self, JudgeMeta, JudgeRule, JudgeSource, Sampling};
use crate::tasks::scoring::{self, load_annotations, ScoreInput};
use crate::tasks::{ScoreMode, ScorerKind};

use super::WorkflowError;

/// The files of a stage's output dir that make its checkpoint, in this order. The Trainer's
/// `checkpoint-N/` dirs (DeepSpeed shards, rng states) are imported only when asked
/// ([`ImportOptions::trainer_checkpoints`]).
pub const STAGE_FILES: [&str; 6] = [
    "adapter_model.bin",
    "adapter_model.safetensors",
    "adapter_config.json",
    "non_lora_trainables.bin",
    "config.json",
    "trainer_state.json",
];

/// The train-record field an imported checkpoint carries: where it came from and the blake3
/// hash of each imported file (what a re-run compares).
pub const IMPORT_FIELD: &str = "import";

/// Which of CoIN's two directory layouts (docs/import.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// 2024-06-18 onwards: `checkpoints/LLaVA/CoIN/<Task>_llava_lora`,
    /// `results/CoIN/LLaVA/<Task>/<STAGE>`, `playground/Instructions_Original`.
    Current,
    /// Until 2024-06-18: `checkpoints/Instruction/Only_Pretrain_1.5/<Task>/llava-1.5-7b-lora`,
    /// `results/CoIN/<Task>/<STAGE>`, `playground/Instructions`.
    Old,
}

/// LoRA or CoIN's MoELoRA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// `*_llava_lora` (old layout: `Only_Pretrain_1.5`).
    Lora,
    /// `*_llava_MOE_lora` (old layout: `Only_Pretrain_1.5_MOE_2`).
    Moelora,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::Moelora => "moelora",
        }
    }
}

/// What to import.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// The CoIN repo root (the cwd of CoIN's scripts).
    pub root: PathBuf,
    /// The branch to write.
    pub branch: String,
    /// The training order (default: CoIN's).
    pub order: Vec<ScorerKind>,
    /// The layout; `None` = detect.
    pub layout: Option<Layout>,
    /// The method; `None` = detect.
    pub method: Option<Method>,
    /// The folder holding the stage dirs, for renamed trees.
    pub checkpoints: Option<PathBuf>,
    /// The folder holding `<Task>/<STAGE>/` results dirs, for renamed trees.
    pub results: Option<PathBuf>,
    /// The folder holding `<Task>/test.json` question files.
    pub instructions: Option<PathBuf>,
    /// The folder holding the annotation files (`cl_dataset`).
    pub data: Option<PathBuf>,
    /// Also import every file of each stage's `checkpoint-*/` dirs (the HF Trainer's
    /// checkpoint: DeepSpeed `global_step*` shards, rng states, a second adapter copy), named
    /// `checkpoint-N/…` in the checkpoint.
    pub trainer_checkpoints: bool,
}

/// One file of a stage.
#[derive(Clone, Debug, Serialize)]
pub struct StageFile {
    /// Its name in the checkpoint.
    pub name: String,
    /// Where it is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// blake3 of its bytes (hex).
    pub hash: String,
}

/// One results dir that belongs to a stage.
#[derive(Clone, Debug, Serialize)]
pub struct ResultPlan {
    /// The evaluated task.
    pub task: String,
    /// The STAGE name CoIN's eval script used (`Finetune` on the diagonal).
    pub stage_name: String,
    /// The results dir.
    pub dir: PathBuf,
    /// The compat score and its record (without the predictions blob, added on import).
    pub record: Option<EvalRecord>,
    /// The score CoIN printed (`Result.text` / `output_result.jsonl`), where present.
    pub coin_printed: Option<f64>,
    /// The general-knowledge record from `prompt_eval_merge.jsonl`, where present.
    pub gk: Option<EvalRecord>,
    /// The judge score CoIN printed (`Prompt_Result.text`), where present.
    pub gk_printed: Option<f64>,
    /// Why this dir gives no accuracy record, if it gives none.
    pub skipped: Option<String>,
}

/// One training stage.
#[derive(Clone, Debug, Serialize)]
pub struct StagePlan {
    /// Its position (1-based).
    pub step: usize,
    /// The task trained (coin's name).
    pub task: String,
    /// The stage's output dir.
    pub dir: PathBuf,
    /// The files that make the checkpoint.
    pub files: Vec<StageFile>,
    /// The files of its `checkpoint-*/` dirs (named `checkpoint-N/…`), when asked for.
    pub trainer_files: Vec<StageFile>,
    /// Expected files that are not there.
    pub missing_files: Vec<String>,
    /// Its results dirs.
    pub results: Vec<ResultPlan>,
}

/// What an import would do.
#[derive(Clone, Debug, Serialize)]
pub struct ImportPlan {
    /// The CoIN repo root read.
    pub root: PathBuf,
    /// The layout read.
    pub layout: Layout,
    /// The method read.
    pub method: Method,
    /// The branch to write.
    pub branch: String,
    /// Whether the stages' `checkpoint-*/` dirs are imported.
    pub trainer_checkpoints: bool,
    /// The stages to import, in training order (a prefix of the order without gaps).
    pub stages: Vec<StagePlan>,
    /// What is missing or left out, in words.
    pub missing: Vec<String>,
    /// Things to look at (score mismatches, model ids that disagree), in words.
    pub warnings: Vec<String>,
}

impl ImportPlan {
    /// `path` relative to the CoIN root when it is below it, for messages.
    pub fn shown(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }
}

/// What an import would do with one stage, given what the target branch holds.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum StageTarget {
    /// The branch holds this stage at this step: it is reused; `new_records` (eval records it
    /// does not hold yet) are added to it as notes.
    Reuse {
        /// The checkpoint reused.
        checkpoint: CheckpointId,
        /// The eval records that would be added.
        new_records: Vec<String>,
    },
    /// The branch ends before this step: a new checkpoint is written.
    Add,
    /// The branch holds another checkpoint at this step: the import stops (nothing is
    /// replaced).
    Conflict {
        /// The checkpoint the branch holds there.
        checkpoint: CheckpointId,
        /// How it differs, in words.
        reason: String,
    },
    /// A stage after a conflict: not reached.
    Blocked,
}

/// What happened to one stage.
#[derive(Clone, Debug, Serialize)]
pub struct StageOutcome {
    /// The task.
    pub task: String,
    /// Its checkpoint.
    pub id: CheckpointId,
    /// Whether the branch already held it (a re-run).
    pub reused: bool,
    /// Eval records written (new checkpoints: in the commit; reused ones: as notes).
    pub records: Vec<String>,
}

/// What an import did.
#[derive(Clone, Debug, Serialize)]
pub struct ImportOutcome {
    /// The branch.
    pub branch: String,
    /// One entry per imported stage.
    pub stages: Vec<StageOutcome>,
    /// Whether the branch moved.
    pub moved: bool,
}

/// CoIN's spelling of a task in dir names.
pub fn coin_dir_name(kind: ScorerKind) -> &'static str {
    match kind {
        ScorerKind::OCRVQA => "OCRVQA",
        k => k.name(),
    }
}

/// Parse `--order`: CoIN task names, each once.
pub fn parse_order(names: &[String]) -> Result<Vec<ScorerKind>, WorkflowError> {
    if names.is_empty() {
        return Ok(ScorerKind::ALL.to_vec());
    }
    let mut out = Vec::new();
    for n in names {
        let kind = ScorerKind::from_name(n).ok_or_else(|| {
            WorkflowError::Input(format!(
                "--order names '{}', which is not one of CoIN's tasks (ScienceQA, TextVQA, \
                 ImageNet, GQA, VizWiz, Grounding, VQAv2, OCRVQA)",
                n.escape_debug()
            ))
        })?;
        if out.contains(&kind) {
            return Err(WorkflowError::Input(format!(
                "--order names {} twice; each task is trained once",
                kind.name()
            )));
        }
        out.push(kind);
    }
    Ok(out)
}

/// The resolved folders of a layout.
struct Dirs {
    layout: Layout,
    method: Method,
    checkpoints: PathBuf,
    results: PathBuf,
    instructions: PathBuf,
    data: PathBuf,
    /// `--checkpoints` given: look for every naming in it.
    custom_checkpoints: bool,
}

fn detect_layout(root: &Path) -> Option<Layout> {
    if root.join("checkpoints/LLaVA/CoIN").is_dir() || root.join("results/CoIN/LLaVA").is_dir() {
        Some(Layout::Current)
    } else if root.join("checkpoints/Instruction").is_dir() || root.join("results/CoIN").is_dir() {
        Some(Layout::Old)
    } else {
        None
    }
}

/// Whether any task has a stage dir of `method`: under the layout's default folders, or (for
/// `--checkpoints DIR`) named `<Task>_llava_lora` / `<Task>_llava_MOE_lora` in DIR.
fn has_method_dirs(
    root: &Path,
    custom: Option<&Path>,
    layout: Layout,
    method: Method,
    order: &[ScorerKind],
) -> bool {
    order.iter().any(|&k| match custom {
        Some(dir) => dir.join(current_dir_name(method, k)).is_dir(),
        None => default_stage_dir(root, layout, method, k).is_dir(),
    })
}

/// The current layout's stage dir name.
fn current_dir_name(method: Method, kind: ScorerKind) -> String {
    let t = coin_dir_name(kind);
    match method {
        Method::Lora => format!("{t}_llava_lora"),
        Method::Moelora => format!("{t}_llava_MOE_lora"),
    }
}

fn default_stage_dir(root: &Path, layout: Layout, method: Method, kind: ScorerKind) -> PathBuf {
    let t = coin_dir_name(kind);
    match (layout, method) {
        (Layout::Current, Method::Lora) => {
            root.join(format!("checkpoints/LLaVA/CoIN/{t}_llava_lora"))
        }
        (Layout::Current, Method::Moelora) => {
            root.join(format!("checkpoints/LLaVA/CoIN/{t}_llava_MOE_lora"))
        }
        (Layout::Old, Method::Lora) => root.join(format!(
            "checkpoints/Instruction/Only_Pretrain_1.5/{t}/llava-1.5-7b-lora"
        )),
        (Layout::Old, Method::Moelora) => root.join(format!(
            "checkpoints/Instruction/Only_Pretrain_1.5_MOE_2/{t}/llava-1.5-7b-lora"
        )),
    }
}

fn resolve_dirs(opts: &ImportOptions) -> Result<Dirs, WorkflowError> {
    let root = &opts.root;
    if !root.is_dir() {
        return Err(WorkflowError::Input(format!(
            "'{}' is not a folder; give the CoIN repo root (the folder holding checkpoints/ \
             and results/)",
            root.display()
        )));
    }
    let layout = match opts.layout.or_else(|| detect_layout(root)) {
        Some(l) => l,
        None if opts.checkpoints.is_some() || opts.results.is_some() => Layout::Current,
        None => {
            return Err(WorkflowError::Input(format!(
                "'{}' holds neither checkpoints/LLaVA/CoIN (current layout) nor \
                 checkpoints/Instruction (old layout); give --layout, or --checkpoints and \
                 --results for a renamed tree",
                root.display()
            )))
        }
    };
    let method = match opts.method {
        Some(m) => m,
        None => {
            let custom = opts.checkpoints.as_deref();
            let lora = has_method_dirs(root, custom, layout, Method::Lora, &opts.order);
            let moe = has_method_dirs(root, custom, layout, Method::Moelora, &opts.order);
            match (lora, moe) {
                (true, true) => {
                    return Err(WorkflowError::Input(format!(
                        "'{}' holds both a LoRA and a MoELoRA run; import one with --method \
                         lora or --method moelora (and --branch for each)",
                        root.display()
                    )))
                }
                (false, true) => Method::Moelora,
                _ => Method::Lora,
            }
        }
    };
    let (ck, res, instr) = match layout {
        Layout::Current => (
            "checkpoints/LLaVA/CoIN",
            "results/CoIN/LLaVA",
            "playground/Instructions_Original",
        ),
        Layout::Old => (
            "checkpoints/Instruction",
            "results/CoIN",
            "playground/Instructions",
        ),
    };
    Ok(Dirs {
        layout,
        method,
        checkpoints: opts.checkpoints.clone().unwrap_or_else(|| root.join(ck)),
        results: opts.results.clone().unwrap_or_else(|| root.join(res)),
        instructions: opts
            .instructions
            .clone()
            .unwrap_or_else(|| root.join(instr)),
        data: opts.data.clone().unwrap_or_else(|| root.join("cl_dataset")),
        custom_checkpoints: opts.checkpoints.is_some(),
    })
}

impl Dirs {
    /// The stage dir of `kind`, if one exists.
    fn stage_dir(&self, root: &Path, kind: ScorerKind) -> Option<PathBuf> {
        if !self.custom_checkpoints {
            let d = default_stage_dir(root, self.layout, self.method, kind);
            return d.is_dir().then_some(d);
        }
        let t = coin_dir_name(kind);
        [
            self.checkpoints.join(current_dir_name(self.method, kind)),
            self.checkpoints.join(t).join("llava-1.5-7b-lora"),
            self.checkpoints.join(t),
        ]
        .into_iter()
        .find(|d| d.is_dir())
    }

    /// Where the stage dir of `kind` was looked for first, for messages.
    fn looked_for(&self, root: &Path, kind: ScorerKind) -> PathBuf {
        if self.custom_checkpoints {
            self.checkpoints.join(current_dir_name(self.method, kind))
        } else {
            default_stage_dir(root, self.layout, self.method, kind)
        }
    }

    /// The question file of `kind` (CoIN's eval scripts' choice, then the old layout's).
    fn questions(&self, kind: ScorerKind) -> Option<PathBuf> {
        let names: &[&str] = match kind {
            ScorerKind::TextVQA | ScorerKind::VizWiz | ScorerKind::VQAv2 => {
                &["val.json", "test.json"]
            }
            ScorerKind::OCRVQA => &["test.json", "test_1.json"],
            _ => &["test.json"],
        };
        let dir = self.instructions.join(coin_dir_name(kind));
        names.iter().map(|n| dir.join(n)).find(|p| p.is_file())
    }

    /// The annotation file or folder `kind`'s scorer reads, if it reads one.
    fn annotations(&self, kind: ScorerKind) -> Option<PathBuf> {
        match kind {
            ScorerKind::ScienceQA => Some(self.data.join("ScienceQA")),
            ScorerKind::TextVQA => Some(self.data.join("TextVQA/TextVQA_0.5.1_val.json")),
            ScorerKind::GQA => Some(self.data.join("GQA/testdev_balanced_questions.json")),
            _ => None,
        }
    }
}

fn hash_file(path: &Path) -> Result<(u64, String), WorkflowError> {
    let mut h = blake3::Hasher::new();
    h.update_mmap(path)
        .map_err(WorkflowError::io("read", path))?;
    let size = std::fs::metadata(path)
        .map_err(WorkflowError::io("read", path))?
        .len();
    Ok((size, h.finalize().to_hex().to_string()))
}

/// The task and method a `model_id` names (`GQA_llava_lora`, `GQA_llava_MOE_lora`, and the
/// `GQA_lora` that CoIN's `Eval_all.sh` passes); `None` for a name that says neither (the old
/// layout's `llava-1.5-7b-lora`).
pub fn model_id_stage(model_id: &str) -> Option<(ScorerKind, Method)> {
    for (suffix, method) in [
        ("_llava_MOE_lora", Method::Moelora),
        ("_MOE_lora", Method::Moelora),
        ("_llava_lora", Method::Lora),
        ("_lora", Method::Lora),
    ] {
        if let Some(task) = model_id.strip_suffix(suffix) {
            return ScorerKind::from_name(task).map(|k| (k, method));
        }
    }
    None
}

/// The largest score file (`Result.text`, `output_result.jsonl`, `Prompt_Result.text`) read.
pub const MAX_SCORE_FILE_BYTES: u64 = 64 << 20;

/// Whether `path` is a regular file itself, not a symbolic link: an imported tree may come from
/// anyone, and a link could pull a file from elsewhere on this machine into a checkpoint.
fn is_plain_file(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file())
}

/// A small text file of a results dir: `None` when absent, a link, larger than
/// [`MAX_SCORE_FILE_BYTES`] or not UTF-8.
fn read_score_file(path: &Path) -> Option<String> {
    use std::io::Read;
    if !is_plain_file(path) {
        return None;
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_SCORE_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .ok()?;
    (text.len() as u64 <= MAX_SCORE_FILE_BYTES).then_some(text)
}

/// The score CoIN's scorer printed into a results dir: `acc` of ScienceQA's
/// `output_result.jsonl`, the first `Accuracy: X%` of `Result.text` otherwise.
pub fn read_printed_score(kind: ScorerKind, dir: &Path) -> Option<f64> {
    if kind == ScorerKind::ScienceQA {
        let text = read_score_file(&dir.join("output_result.jsonl"))?;
        let v: Value = serde_json::from_str(&text).ok()?;
        return v.get("acc")?.as_f64();
    }
    let text = read_score_file(&dir.join("Result.text"))?;
    let rest = &text[text.find("Accuracy:")? + "Accuracy:".len()..];
    let num: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '-')
        .collect();
    num.parse().ok()
}

/// The judge score of `Prompt_Result.text` (`Final score:NN`).
pub fn read_printed_gk(dir: &Path) -> Option<f64> {
    let text = read_score_file(&dir.join("Prompt_Result.text"))?;
    let rest = &text[text.find("Final score:")? + "Final score:".len()..];
    rest.trim().parse().ok()
}

/// Whether coin's score and CoIN's printed one disagree (CoIN prints two decimals).
pub fn scores_differ(ours: f64, printed: f64) -> bool {
    (ours - printed).abs() > 0.005 + 1e-9
}

/// Read a CoIN experiment and say what an import would write. Reads only.
pub fn plan(opts: &ImportOptions) -> Result<ImportPlan, WorkflowError> {
    let dirs = resolve_dirs(opts)?;
    let mut missing = Vec::new();
    let mut warnings = Vec::new();
    let mut stages: Vec<StagePlan> = Vec::new();
    let mut gap: Option<String> = None;
    for (i, &kind) in opts.order.iter().enumerate() {
        let Some(dir) = dirs.stage_dir(&opts.root, kind) else {
            missing.push(format!(
                "stage {} ({}): no stage dir (looked for {})",
                i + 1,
                kind.name(),
                dirs.looked_for(&opts.root, kind).display()
            ));
            gap.get_or_insert_with(|| kind.name().to_string());
            continue;
        };
        let mut files = Vec::new();
        let mut missing_files = Vec::new();
        for name in STAGE_FILES {
            let p = dir.join(name);
            if p.is_file() && !is_plain_file(&p) {
                warnings.push(format!(
                    "{}: a symbolic link, not imported (coin imports the files of the tree \
                     itself; copy the file in place)",
                    p.display()
                ));
                missing_files.push(name.to_string());
            } else if p.is_file() {
                let (size, hash) = hash_file(&p)?;
                files.push(StageFile {
                    name: name.to_string(),
                    path: p,
                    size,
                    hash,
                });
            } else if name != "adapter_model.bin" && name != "adapter_model.safetensors" {
                missing_files.push(name.to_string());
            }
        }
        if !files.iter().any(|f| f.name.starts_with("adapter_model.")) {
            missing.push(format!(
                "stage {} ({}): '{}' holds no adapter_model.bin or adapter_model.safetensors",
                i + 1,
                kind.name(),
                dir.display()
            ));
            gap.get_or_insert_with(|| kind.name().to_string());
            continue;
        }
        if let Some(g) = &gap {
            missing.push(format!(
                "stage {} ({}): not imported, because the stage before it ({g}) is missing and \
                 each stage is parented on the previous one",
                i + 1,
                kind.name()
            ));
            continue;
        }
        for m in &missing_files {
            missing.push(format!(
                "stage {} ({}): no {m} in '{}'",
                i + 1,
                kind.name(),
                dir.display()
            ));
        }
        let trainer_files = if opts.trainer_checkpoints {
            trainer_files(&dir, &mut warnings)?
        } else {
            Vec::new()
        };
        let mut results = Vec::new();
        for &eval_kind in &opts.order {
            let base = dirs.results.join(coin_dir_name(eval_kind));
            let stage_name = if eval_kind == kind {
                "Finetune".to_string()
            } else {
                coin_dir_name(kind).to_string()
            };
            let rdir = base.join(&stage_name);
            if !rdir.is_dir() {
                continue;
            }
            results.push(plan_result(
                &dirs,
                kind,
                eval_kind,
                stage_name,
                rdir,
                &mut warnings,
            ));
        }
        stages.push(StagePlan {
            step: i + 1,
            task: kind.name().to_string(),
            dir,
            files,
            trainer_files,
            missing_files,
            results,
        });
    }
    if stages.is_empty() {
        return Err(WorkflowError::Input(format!(
            "found no stage to import under '{}': {}",
            dirs.checkpoints.display(),
            missing.first().map_or("", String::as_str)
        )));
    }
    if dirs.layout == Layout::Old {
        warnings.push(
            "old layout: every stage's model_id is llava-1.5-7b-lora, so the answer files \
             cannot be checked against their stage (and a MoELoRA evaluation overwrites a \
             LoRA one in the same results dir)"
                .to_string(),
        );
    }
    Ok(ImportPlan {
        root: opts.root.clone(),
        layout: dirs.layout,
        method: dirs.method,
        branch: opts.branch.clone(),
        trainer_checkpoints: opts.trainer_checkpoints,
        stages,
        missing,
        warnings,
    })
}

/// The files of a stage dir's `checkpoint-*/` folders (the HF Trainer's checkpoints), named
/// `checkpoint-N/…` and sorted by name. A symbolic link (to a file or a folder, the
/// `checkpoint-*` folder itself included) is not followed, and neither it nor a name that is
/// not a valid checkpoint path (not UTF-8, a `.git` component, …) nor anything that is neither
/// a file nor a folder is imported: each is named in a warning.
fn trainer_files(dir: &Path, warnings: &mut Vec<String>) -> Result<Vec<StageFile>, WorkflowError> {
    let mut stack: Vec<(PathBuf, String)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(WorkflowError::io("read the folder", dir))? {
        let entry = entry.map_err(WorkflowError::io("read the folder", dir))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !name.starts_with("checkpoint-") {
            continue;
        }
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).map_err(WorkflowError::io("read", &path))?;
        if meta.file_type().is_symlink() {
            warnings.push(format!(
                "{}: a symbolic link, not imported (coin does not follow links in a stage dir)",
                path.display()
            ));
        } else if meta.is_dir() {
            stack.push((path, name));
        }
    }
    let mut out = Vec::new();
    while let Some((folder, prefix)) = stack.pop() {
        for entry in
            std::fs::read_dir(&folder).map_err(WorkflowError::io("read the folder", &folder))?
        {
            let entry = entry.map_err(WorkflowError::io("read the folder", &folder))?;
            let path = entry.path();
            let rel = match entry.file_name().to_str() {
                Some(name) => format!("{prefix}/{name}"),
                None => {
                    warnings.push(format!(
                        "{}: the name is not UTF-8, not imported",
                        path.display()
                    ));
                    continue;
                }
            };
            if let Err(why) = crate::history::records::validate_rel_path(&rel) {
                warnings.push(format!("{}: not imported: {why}", path.display()));
                continue;
            }
            let meta =
                std::fs::symlink_metadata(&path).map_err(WorkflowError::io("read", &path))?;
            if meta.file_type().is_symlink() {
                warnings.push(format!(
                    "{}: a symbolic link, not imported (coin does not follow links in a stage \
                     dir)",
                    path.display()
                ));
            } else if meta.is_dir() {
                stack.push((path, rel));
            } else if meta.is_file() {
                let (size, hash) = hash_file(&path)?;
                out.push(StageFile {
                    name: rel,
                    path,
                    size,
                    hash,
                });
            } else {
                warnings.push(format!(
                    "{}: neither a file nor a folder, not imported",
                    path.display()
                ));
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Read and score one results dir (never fails: what cannot be used is said in `skipped`).
fn plan_result(
    dirs: &Dirs,
    stage: ScorerKind,
    kind: ScorerKind,
    stage_name: String,
    dir: PathBuf,
    warnings: &mut Vec<String>,
) -> ResultPlan {
    let mut r = ResultPlan {
        task: kind.name().to_string(),
        stage_name,
        dir: dir.clone(),
        record: None,
        coin_printed: read_printed_score(kind, &dir),
        gk: None,
        gk_printed: read_printed_gk(&dir),
        skipped: None,
    };
    let merge = dir.join("merge.jsonl");
    if merge.is_file() && !is_plain_file(&merge) {
        r.skipped = Some(format!(
            "'{}' is a symbolic link (coin imports the files of the tree itself)",
            merge.display()
        ));
        warnings.push(format!(
            "{}: no accuracy record: a symbolic link",
            merge.display()
        ));
        return r;
    }
    match score_dir(dirs, stage, kind, &merge) {
        Ok(Ok(record)) => {
            if let Some(p) = r.coin_printed {
                if scores_differ(record.score, p) {
                    warnings.push(format!(
                        "{}: coin scores {:.2}, CoIN printed {p:.2} (recorded both)",
                        dir.display(),
                        record.score
                    ));
                }
            }
            r.record = Some(record);
        }
        Ok(Err(why)) => r.skipped = Some(why),
        Err(e) => r.skipped = Some(error_chain(&e)),
    }
    let replies = dir.join("prompt_eval_merge.jsonl");
    if replies.is_file() && !is_plain_file(&replies) {
        warnings.push(format!(
            "{}: a symbolic link, not imported",
            replies.display()
        ));
    } else if replies.is_file() {
        match judge::read_reply_scores(&replies) {
            Ok(scores) if !scores.is_empty() => {
                let s = judge::summarise(&scores);
                let rule = if kind == ScorerKind::Grounding {
                    JudgeRule::CoINGrounding
                } else {
                    JudgeRule::CoIN
                };
                let meta = JudgeMeta {
                    model: None,
                    rule: rule.name().to_string(),
                    prompt_version: rule.prompt_version(),
                    sampling: Sampling::COIN,
                    endpoint_host: None,
                    source: JudgeSource::RepliesFile,
                };
                let mut extra = BTreeMap::new();
                extra.insert("judge".to_string(), json!(meta));
                extra.insert("rounded".to_string(), json!(s.rounded));
                extra.insert("source".to_string(), json!("coin-import"));
                if let Some(p) = r.gk_printed {
                    extra.insert("coin_printed".to_string(), json!(p));
                    if (p - s.rounded).abs() > 1e-9 {
                        warnings.push(format!(
                            "{}: the judge replies give {:.0}, Prompt_Result.text says {p}",
                            dir.display(),
                            s.rounded
                        ));
                    }
                }
                r.gk = Some(EvalRecord {
                    metric: GK_METRIC.to_string(),
                    score: s.score,
                    n: s.n as u64,
                    extra,
                });
            }
            Ok(_) => warnings.push(format!("{}: holds no judge replies", replies.display())),
            Err(e) => warnings.push(error_chain(&e)),
        }
    }
    if let Some(why) = &r.skipped {
        warnings.push(format!("{}: no accuracy record: {why}", dir.display()));
    }
    r
}

/// The error and its causes, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Score `merge.jsonl` of a results dir; `Ok(Err(why))` when it is not this stage's or cannot
/// be scored for want of a file.
fn score_dir(
    dirs: &Dirs,
    stage: ScorerKind,
    kind: ScorerKind,
    merge: &Path,
) -> Result<Result<EvalRecord, String>, WorkflowError> {
    if !merge.is_file() {
        return Ok(Err(
            "no merge.jsonl (the eval script stopped before merging its chunks)".into(),
        ));
    }
    let answers = read_answer_file(merge)?;
    let mut ids: Vec<&str> = answers.iter().filter_map(|a| a.model_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() > 1 {
        return Ok(Err(format!(
            "its answers name {} models ({}); it mixes two evaluations",
            ids.len(),
            ids.join(", ")
        )));
    }
    let model_id = ids.first().map(|s| s.to_string());
    if let Some((task, method)) = model_id.as_deref().and_then(model_id_stage) {
        if method != dirs.method {
            return Ok(Err(format!(
                "its model_id {} is a {} checkpoint, not this {} run's",
                model_id.as_deref().unwrap_or(""),
                method.name(),
                dirs.method.name()
            )));
        }
        if task != stage {
            return Ok(Err(format!(
                "its model_id {} names the {} stage, not {}",
                model_id.as_deref().unwrap_or(""),
                task.name(),
                stage.name()
            )));
        }
    }
    let Some(qpath) = dirs.questions(kind) else {
        return Ok(Err(format!(
            "no question file in '{}' (give --instructions)",
            dirs.instructions.join(coin_dir_name(kind)).display()
        )));
    };
    let questions = read_test_file(&qpath)?;
    let annotations = match dirs.annotations(kind) {
        Some(p) if !p.exists() => {
            return Ok(Err(format!(
                "the scorer needs '{}' (give --data)",
                p.display()
            )))
        }
        Some(p) => Some(load_annotations(kind, &p)?),
        None => None,
    };
    let report = scoring::score(
        kind,
        ScoreMode::Compat,
        ScoreInput {
            questions: &questions,
            answers: &answers,
            annotations: annotations.as_ref(),
        },
    )?;
    let (_, answers_hash) = hash_file(merge)?;
    let mut extra = BTreeMap::new();
    extra.insert("mode".to_string(), json!(ScoreMode::Compat.to_string()));
    extra.insert("source".to_string(), json!("coin-import"));
    extra.insert("answers_hash".to_string(), json!(answers_hash));
    if let Some(m) = &model_id {
        extra.insert("model_id".to_string(), json!(m));
    }
    if let Some(p) = read_printed_score(kind, merge.parent().unwrap_or(Path::new("."))) {
        extra.insert("coin_printed".to_string(), json!(p));
    }
    Ok(Ok(EvalRecord {
        metric: report.metric,
        score: report.score,
        n: report.n as u64,
        extra,
    }))
}

/// Whether an existing record is the one an import would write (same score over the same
/// answers), so a re-run does not write it again.
fn same_record(old: &EvalRecord, new: &EvalRecord) -> bool {
    let key = |r: &EvalRecord| {
        (
            r.metric.clone(),
            r.score.to_bits(),
            r.n,
            r.extra.get("answers_hash").cloned(),
            r.extra.get("rounded").cloned(),
        )
    };
    key(old) == key(new)
}

/// The train-record fields of an imported stage: the importer, the stage dir and each file's
/// hash (the `checkpoint-N/…` files too, when imported); a re-run compares the hashes.
fn import_extra(plan: &ImportPlan, stage: &StagePlan) -> BTreeMap<String, Value> {
    let files: BTreeMap<&str, &str> = stage
        .files
        .iter()
        .chain(&stage.trainer_files)
        .map(|f| (f.name.as_str(), f.hash.as_str()))
        .collect();
    let mut extra = BTreeMap::new();
    extra.insert(
        IMPORT_FIELD.to_string(),
        json!({
            "from": "coin-run",
            "layout": plan.layout,
            "method": plan.method,
            "step": stage.step,
            "stage_dir": stage.dir.file_name().map(|n| n.to_string_lossy().into_owned()),
            "files": files,
        }),
    );
    extra
}

/// The imported files a checkpoint's train record lists, split into the stage dir's own files
/// and the `checkpoint-N/…` ones (names with a `/`).
type FileHashes = BTreeMap<String, String>;

fn split_files(files: &BTreeMap<String, Value>) -> (FileHashes, FileHashes) {
    let mut top = FileHashes::new();
    let mut trainer = FileHashes::new();
    for (name, hash) in files {
        let hash = hash.as_str().unwrap_or_default().to_string();
        if name.contains('/') {
            trainer.insert(name.clone(), hash);
        } else {
            top.insert(name.clone(), hash);
        }
    }
    (top, trainer)
}

/// Why checkpoint `cp` is not `stage` imported on `parent`, or `None` when it is. Without
/// `--with-trainer-checkpoints` the `checkpoint-N/…` files are not compared, so a re-run
/// without the option reuses a stage imported with it; with the option they must match, so a
/// stage imported without them is never replaced by one with them.
fn stage_mismatch(
    cp: &crate::history::Checkpoint,
    plan: &ImportPlan,
    stage: &StagePlan,
    parent: Option<CheckpointId>,
) -> Option<String> {
    let Some(train) = &cp.train else {
        return Some("it has no train record".to_string());
    };
    if train.task != stage.task {
        return Some(format!("it was trained on {}", train.task));
    }
    if cp.parents.first().copied() != parent {
        return Some("it has another parent".to_string());
    }
    let Some(Value::Object(files)) = train.extra.get(IMPORT_FIELD).and_then(|v| v.get("files"))
    else {
        return Some("it was not imported from a CoIN run".to_string());
    };
    let files: BTreeMap<String, Value> = files.clone().into_iter().collect();
    let (old_top, old_trainer) = split_files(&files);
    let ours = |list: &[StageFile]| -> FileHashes {
        list.iter()
            .map(|f| (f.name.clone(), f.hash.clone()))
            .collect()
    };
    if old_top != ours(&stage.files) {
        return Some("its files differ from the stage dir's".to_string());
    }
    if plan.trainer_checkpoints && old_trainer != ours(&stage.trainer_files) {
        if old_trainer.is_empty() {
            return Some(
                "it was imported without --with-trainer-checkpoints, and an import never \
                 replaces a stage"
                    .to_string(),
            );
        }
        return Some("its checkpoint-N/ files differ from the stage dir's".to_string());
    }
    None
}

/// Whether an import's `rec` for `task` is new to checkpoint `cp`.
fn is_new_record(cp: &crate::history::Checkpoint, task: &str, rec: &EvalRecord) -> bool {
    !cp.evals.get(task).is_some_and(|(o, _)| same_record(o, rec))
}

/// The branch's head and its first-parent chain, oldest first (empty when it does not exist).
fn branch_chain(
    repo: &CoinRepo,
    branch: &str,
) -> Result<(Option<CheckpointId>, Vec<CheckpointId>), WorkflowError> {
    CoinRepo::validate_name("branch", branch)?;
    let head = repo.branch_target(branch)?;
    let mut chain = match head {
        Some(h) => repo.first_parent_chain(h, None)?,
        None => Vec::new(),
    };
    chain.reverse();
    Ok((head, chain))
}

fn targets_on(
    repo: &CoinRepo,
    plan: &ImportPlan,
    chain: &[CheckpointId],
) -> Result<Vec<StageTarget>, WorkflowError> {
    let mut out = Vec::new();
    let mut parent: Option<CheckpointId> = None;
    let mut blocked = false;
    for (i, stage) in plan.stages.iter().enumerate() {
        if blocked {
            out.push(StageTarget::Blocked);
            continue;
        }
        let Some(&old_id) = chain.get(i) else {
            out.push(StageTarget::Add);
            continue;
        };
        let cp = repo.read_checkpoint(old_id)?;
        match stage_mismatch(&cp, plan, stage, parent) {
            Some(reason) => {
                blocked = true;
                out.push(StageTarget::Conflict {
                    checkpoint: old_id,
                    reason,
                });
            }
            None => {
                let mut new_records = Vec::new();
                for r in &stage.results {
                    if r.record
                        .as_ref()
                        .is_some_and(|x| is_new_record(&cp, &r.task, x))
                    {
                        new_records.push(r.task.clone());
                    }
                    let gk = gk_task(&r.task);
                    if r.gk.as_ref().is_some_and(|x| is_new_record(&cp, &gk, x)) {
                        new_records.push(gk);
                    }
                }
                new_records.sort();
                out.push(StageTarget::Reuse {
                    checkpoint: old_id,
                    new_records,
                });
            }
        }
        parent = Some(old_id);
    }
    Ok(out)
}

/// What an import of `plan` would do with each stage, given what `plan.branch` holds in
/// `repo` (reads only; the dry run's answer and what [`execute`] follows).
pub fn targets(repo: &CoinRepo, plan: &ImportPlan) -> Result<Vec<StageTarget>, WorkflowError> {
    let (_, chain) = branch_chain(repo, &plan.branch)?;
    targets_on(repo, plan, &chain)
}

/// The records of a stage's results dirs, their answer and reply files stored as blobs.
fn stage_records(
    repo: &CoinRepo,
    stage: &StagePlan,
) -> Result<BTreeMap<String, EvalRecord>, WorkflowError> {
    let mut out = BTreeMap::new();
    for r in &stage.results {
        if let Some(rec) = &r.record {
            let merge = r.dir.join("merge.jsonl");
            let bytes = std::fs::read(&merge).map_err(WorkflowError::io("read", &merge))?;
            let id = repo.store().put_blob_bytes(&bytes)?;
            let mut rec = rec.clone();
            rec.extra
                .insert("predictions".to_string(), json!(id.to_string()));
            out.insert(r.task.clone(), rec);
        }
        if let Some(rec) = &r.gk {
            let path = r.dir.join("prompt_eval_merge.jsonl");
            let bytes = std::fs::read(&path).map_err(WorkflowError::io("read", &path))?;
            let id = repo.store().put_blob_bytes(&bytes)?;
            let mut rec = rec.clone();
            rec.extra
                .insert("replies".to_string(), json!(id.to_string()));
            out.insert(gk_task(&r.task), rec);
        }
    }
    Ok(out)
}

/// Write a plan into `repo`: one checkpoint per stage, then move the branch once by
/// compare-and-swap (so a stop half-way leaves the branch as it was; the unreferenced objects
/// are removed by `coin gc`). The branch must be absent or hold an earlier import of the same
/// run (its checkpoints are reused stage by stage, see [`targets`]); a stage it holds
/// otherwise is never replaced: the import stops before writing anything.
pub fn execute(repo: &CoinRepo, plan: &ImportPlan) -> Result<ImportOutcome, WorkflowError> {
    let (expected, chain) = branch_chain(repo, &plan.branch)?;
    let targets = targets_on(repo, plan, &chain)?;
    for (stage, target) in plan.stages.iter().zip(&targets) {
        if let StageTarget::Conflict { checkpoint, reason } = target {
            return Err(WorkflowError::Input(format!(
                "branch '{}' already holds checkpoint {} at step {}, which is not this run's {} \
                 stage ({reason}); import into a new branch with --branch",
                plan.branch,
                checkpoint.short(),
                stage.step,
                stage.task
            )));
        }
    }
    let mut parent: Option<CheckpointId> = None;
    let mut out = Vec::new();
    for (stage, target) in plan.stages.iter().zip(&targets) {
        let records = stage_records(repo, stage)?;
        if let StageTarget::Reuse { checkpoint, .. } = target {
            let cp = repo.read_checkpoint(*checkpoint)?;
            let fresh: BTreeMap<String, EvalRecord> = records
                .into_iter()
                .filter(|(t, r)| is_new_record(&cp, t, r))
                .collect();
            if !fresh.is_empty() {
                repo.add_eval_records(*checkpoint, &fresh)?;
            }
            out.push(StageOutcome {
                task: stage.task.clone(),
                id: *checkpoint,
                reused: true,
                records: fresh.into_keys().collect(),
            });
            parent = Some(*checkpoint);
            continue;
        }
        let req = CommitRequest {
            paths: Vec::new(),
            task: stage.task.clone(),
            message: Some(format!(
                "imported from CoIN's {} (step {})",
                plan.shown(&stage.dir),
                stage.step
            )),
            evals: records.clone(),
            parent,
            base_model: None,
            train_extra: import_extra(plan, stage),
            skip_hooks: true,
            detached: true,
        };
        let files = stage
            .files
            .iter()
            .chain(&stage.trainer_files)
            .map(|f| SourceFile {
                disk: f.path.clone(),
                rel: f.name.clone(),
            })
            .collect();
        let made = repo.commit_root_files(&req, files)?;
        out.push(StageOutcome {
            task: stage.task.clone(),
            id: made.id,
            reused: false,
            records: records.into_keys().collect(),
        });
        parent = Some(made.id);
    }
    let last = parent.expect("a plan holds at least one stage");
    let moved = !chain.contains(&last);
    if moved {
        repo.publish_checkpoint(&plan.branch, expected, last, false)?;
    }
    Ok(ImportOutcome {
        branch: plan.branch.clone(),
        stages: out,
        moved,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::disallowed_methods)]

    use super::*;

    #[test]
    fn model_ids_name_their_stage_and_method() {
        assert_eq!(
            model_id_stage("GQA_llava_lora"),
            Some((ScorerKind::GQA, Method::Lora))
        );
        assert_eq!(
            model_id_stage("OCRVQA_llava_MOE_lora"),
            Some((ScorerKind::OCRVQA, Method::Moelora))
        );
        // Eval_all.sh's checkpoint names.
        assert_eq!(
            model_id_stage("VQAv2_lora"),
            Some((ScorerKind::VQAv2, Method::Lora))
        );
        assert_eq!(model_id_stage("llava-1.5-7b-lora"), None);
        assert_eq!(model_id_stage("Nothing_llava_lora"), None);
    }

    #[test]
    fn printed_scores_are_read_from_each_score_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("Result.text"), "Samples: 0\nAccuracy: 12.50%\n").unwrap();
        assert_eq!(read_printed_score(ScorerKind::OCRVQA, d), Some(12.5));
        // GQA: appended, no newlines, the overall accuracy after Binary and Open.
        std::fs::write(
            d.join("Result.text"),
            "Binary: 70.00%Open: 40.00%Accuracy: 55.25%Validity: 0.00%Plausibility: \
             0.00%Distribution: 1.20 (lower is better)Binary: 1.00%Accuracy: 2.00%",
        )
        .unwrap();
        assert_eq!(read_printed_score(ScorerKind::GQA, d), Some(55.25));
        std::fs::write(
            d.join("output_result.jsonl"),
            "{\n  \"acc\": 66.66666666666667,\n  \"correct\": 2,\n  \"count\": 3\n}",
        )
        .unwrap();
        assert_eq!(
            read_printed_score(ScorerKind::ScienceQA, d),
            Some(66.66666666666667)
        );
        std::fs::write(d.join("Prompt_Result.text"), "Final score:73").unwrap();
        assert_eq!(read_printed_gk(d), Some(73.0));
        assert_eq!(read_printed_gk(&d.join("none")), None);
    }

    #[test]
    fn scores_differ_beyond_the_printed_rounding() {
        assert!(!scores_differ(14.374999999, 14.37));
        assert!(!scores_differ(66.66666666666667, 66.67));
        assert!(scores_differ(75.0, 75.02));
    }

    #[test]
    fn orders_are_coin_task_names_each_once() {
        assert_eq!(parse_order(&[]).unwrap(), ScorerKind::ALL.to_vec());
        let o = parse_order(&["ocrvqa".into(), "Science".into()]).unwrap();
        assert_eq!(o, [ScorerKind::OCRVQA, ScorerKind::ScienceQA]);
        let e = parse_order(&["GQA".into(), "gqa".into()]).unwrap_err();
        assert!(e.to_string().contains("GQA twice"), "{e}");
        let e = parse_order(&["MNIST".into()]).unwrap_err();
        assert!(e.to_string().contains("'MNIST'"), "{e}");
    }
}
