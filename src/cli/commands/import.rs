//! `coin import`: bring experiments made by other tools into a branch.

use std::io::Write as _;
use std::path::PathBuf;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::history::{CoinRepo, HistoryError};
use crate::workflow::import::{self, ImportOptions, ImportPlan, Layout, Method, StageTarget};

use super::history_util::open_repo;

/// Import experiments made by other tools
#[derive(clap::Subcommand, Debug)]
pub enum ImportCommand {
    CoinRun(CoinRunArgs),
}

/// Import a CoIN experiment: one checkpoint per training stage, with its eval records
///
/// Reads the stage output dirs CoIN's training scripts write (adapter_model.bin or
/// .safetensors, adapter_config.json, non_lora_trainables.bin, config.json,
/// trainer_state.json; the Trainer's checkpoint-N/ dirs with --with-trainer-checkpoints), in
/// the task order, and makes each stage a checkpoint parented on the previous stage's. Every results dir of a stage
/// (results/…/<EvalTask>/<STAGE>/, STAGE = Finetune on the diagonal, else the trained task)
/// is scored from merge.jsonl with coin's compat scorers; the score CoIN printed (Result.text,
/// output_result.jsonl) is recorded beside it and a difference is warned about. Judge replies
/// (prompt_eval_merge.jsonl) become GK:<task> records. A partial tree imports the stages that
/// exist up to the first missing one and says what is missing. Re-running is idempotent; a
/// stage the branch holds otherwise is never replaced. The branch moves once, at the end. See
/// docs/import.md.
#[derive(clap::Args, Debug)]
pub struct CoinRunArgs {
    /// The CoIN repo root (the folder holding checkpoints/, results/, playground/, cl_dataset/)
    pub root: PathBuf,
    /// The branch to write [default: coin-run-lora or coin-run-moelora]
    #[arg(long)]
    pub branch: Option<String>,
    /// The training order, comma-separated [default: CoIN's: ScienceQA,TextVQA,ImageNet,GQA,
    /// VizWiz,Grounding,VQAv2,OCRVQA]
    #[arg(long, value_delimiter = ',', value_name = "T,...")]
    pub order: Vec<String>,
    /// Which of CoIN's directory layouts
    #[arg(long, value_enum, default_value_t = LayoutArg::Auto)]
    pub layout: LayoutArg,
    /// LoRA or MoELoRA stage dirs (auto: whichever the tree holds)
    #[arg(long, value_enum, default_value_t = MethodArg::Auto)]
    pub method: MethodArg,
    /// The folder holding the stage dirs, for a renamed tree
    #[arg(long, value_name = "DIR")]
    pub checkpoints: Option<PathBuf>,
    /// The folder holding the <Task>/<STAGE>/ results dirs, for a renamed tree
    #[arg(long, value_name = "DIR")]
    pub results: Option<PathBuf>,
    /// The folder holding <Task>/test.json question files [default: the layout's
    /// playground/Instructions_Original or playground/Instructions]
    #[arg(long, value_name = "DIR")]
    pub instructions: Option<PathBuf>,
    /// The folder holding the scorers' annotation files [default: ROOT/cl_dataset]
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Also import each stage's checkpoint-N/ dirs (DeepSpeed global_step* shards, rng
    /// states, trainer state), as checkpoint-N/... files of its checkpoint
    #[arg(long)]
    pub with_trainer_checkpoints: bool,
    /// Show what would be imported (stages, files, scores, what is missing, whether the branch
    /// already holds each stage); write nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Print {"plan", "targets", "outcome"} as JSON
    #[arg(long)]
    pub json: bool,
}

/// `--layout` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutArg {
    /// detect from the folders present
    Auto,
    /// checkpoints/LLaVA/CoIN/<Task>_llava_lora, results/CoIN/LLaVA (June 2024 on)
    Current,
    /// checkpoints/Instruction/Only_Pretrain_1.5/<Task>/llava-1.5-7b-lora, results/CoIN
    Old,
}

/// `--method` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodArg {
    /// whichever the tree holds (both: an error)
    Auto,
    /// *_llava_lora
    Lora,
    /// *_llava_MOE_lora
    Moelora,
}

pub fn cmd_import(
    ui: &mut Ui,
    helper: &CommandHelper,
    cmd: &ImportCommand,
) -> Result<(), CommandError> {
    match cmd {
        ImportCommand::CoinRun(args) => cmd_coin_run(ui, helper, args),
    }
}

fn cmd_coin_run(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &CoinRunArgs,
) -> Result<(), CommandError> {
    // A dry run also works outside a repository (every stage would then be added).
    let repo = if args.dry_run {
        match CoinRepo::discover(&helper.start_dir()) {
            Ok(repo) => Some(repo),
            Err(HistoryError::NotARepo(_)) => None,
            Err(e) => return Err(e.into()),
        }
    } else {
        Some(open_repo(helper)?)
    };
    let order = import::parse_order(&args.order)?;
    let method = match args.method {
        MethodArg::Auto => None,
        MethodArg::Lora => Some(Method::Lora),
        MethodArg::Moelora => Some(Method::Moelora),
    };
    let opts = ImportOptions {
        root: helper.cwd.join(&args.root),
        branch: args.branch.clone().unwrap_or_default(),
        order,
        layout: match args.layout {
            LayoutArg::Auto => None,
            LayoutArg::Current => Some(Layout::Current),
            LayoutArg::Old => Some(Layout::Old),
        },
        method,
        checkpoints: args.checkpoints.as_ref().map(|p| helper.cwd.join(p)),
        results: args.results.as_ref().map(|p| helper.cwd.join(p)),
        instructions: args.instructions.as_ref().map(|p| helper.cwd.join(p)),
        data: args.data.as_ref().map(|p| helper.cwd.join(p)),
        trainer_checkpoints: args.with_trainer_checkpoints,
    };
    let mut plan = import::plan(&opts)?;
    if args.branch.is_none() {
        plan.branch = format!("coin-run-{}", method_name(plan.method));
    }
    for w in &plan.warnings {
        ui.warn(w);
    }
    for m in &plan.missing {
        ui.status(&format!("Missing: {m}."));
    }
    if args.dry_run {
        let targets = match &repo {
            Some(repo) => Some(import::targets(repo, &plan)?),
            None => None,
        };
        if args.json {
            return ui
                .json(&serde_json::json!({"plan": plan, "targets": targets, "outcome": null}));
        }
        write_plan(ui, &plan, targets.as_deref())?;
        if targets.is_none() {
            ui.status("Not in a coin repository: every stage would be added.");
        }
        if targets
            .as_ref()
            .is_some_and(|t| t.iter().any(|t| matches!(t, StageTarget::Conflict { .. })))
        {
            ui.warn(&format!(
                "the import would stop: branch '{}' holds another checkpoint at a step of this \
                 run; import into a new branch with --branch",
                plan.branch
            ));
        }
        ui.status("Dry run: nothing was written.");
        return Ok(());
    }
    let repo = repo.expect("opened above unless this is a dry run");
    let outcome = import::execute(&repo, &plan)?;
    if args.json {
        return ui.json(&serde_json::json!({"plan": plan, "targets": null, "outcome": outcome}));
    }
    write_plan(ui, &plan, None)?;
    for s in &outcome.stages {
        writeln!(
            ui.out(),
            "{} {:<10} {} ({} record(s) written)",
            s.id.short(),
            s.task,
            if s.reused { "already imported" } else { "new" },
            s.records.len()
        )?;
    }
    let new = outcome.stages.iter().filter(|s| !s.reused).count();
    ui.status(&format!(
        "Imported {} stage(s) on branch '{}' ({new} new, {} already there){}.",
        outcome.stages.len(),
        outcome.branch,
        outcome.stages.len() - new,
        if outcome.moved {
            ""
        } else {
            "; the branch did not move"
        }
    ));
    Ok(())
}

fn method_name(m: Method) -> &'static str {
    match m {
        Method::Lora => "lora",
        Method::Moelora => "moelora",
    }
}

/// The plan as text: one block per stage with its files, its `checkpoint-N/` files when asked
/// for, its results dirs and (dry run) what the branch holds at its step.
fn write_plan(
    ui: &mut Ui,
    plan: &ImportPlan,
    targets: Option<&[StageTarget]>,
) -> Result<(), CommandError> {
    let layout = match plan.layout {
        Layout::Current => "current",
        Layout::Old => "old",
    };
    writeln!(
        ui.out(),
        "CoIN run ({layout} layout, {}) -> branch {}",
        method_name(plan.method),
        plan.branch
    )?;
    for (i, s) in plan.stages.iter().enumerate() {
        let files: Vec<&str> = s.files.iter().map(|f| f.name.as_str()).collect();
        let bytes: u64 = s.files.iter().map(|f| f.size).sum();
        writeln!(
            ui.out(),
            "stage {} {}: {} ({} files, {bytes} bytes: {})",
            s.step,
            s.task,
            plan.shown(&s.dir),
            files.len(),
            files.join(", ")
        )?;
        if plan.trainer_checkpoints {
            let bytes: u64 = s.trainer_files.iter().map(|f| f.size).sum();
            writeln!(
                ui.out(),
                "  trainer checkpoints: {} files, {bytes} bytes",
                s.trainer_files.len()
            )?;
            for f in &s.trainer_files {
                writeln!(ui.out(), "    {} ({} bytes)", f.name, f.size)?;
            }
        }
        if let Some(t) = targets.and_then(|t| t.get(i)) {
            writeln!(ui.out(), "  branch {}: {}", plan.branch, target_text(t))?;
        }
        for r in &s.results {
            let score = match (&r.record, &r.skipped) {
                (Some(rec), _) => format!("{:.2} n={}", rec.score, rec.n),
                (None, Some(why)) => format!("skipped: {why}"),
                (None, None) => "skipped".to_string(),
            };
            let printed = r
                .coin_printed
                .map(|p| format!(" (CoIN printed {p:.2})"))
                .unwrap_or_default();
            let gk =
                r.gk.as_ref()
                    .map(|g| format!(", GK {:.2} n={}", g.score, g.n))
                    .unwrap_or_default();
            writeln!(
                ui.out(),
                "  eval {:<10} {:<10} {score}{printed}{gk}",
                r.task,
                r.stage_name
            )?;
        }
    }
    Ok(())
}

/// What the target branch means for a stage, in words (dry run).
fn target_text(t: &StageTarget) -> String {
    match t {
        StageTarget::Add => "not there yet; would be added".to_string(),
        StageTarget::Reuse {
            checkpoint,
            new_records,
        } if new_records.is_empty() => {
            format!(
                "already holds it as {}; would be reused",
                checkpoint.short()
            )
        }
        StageTarget::Reuse {
            checkpoint,
            new_records,
        } => format!(
            "already holds it as {}; would be reused, adding record(s) {}",
            checkpoint.short(),
            new_records.join(", ")
        ),
        StageTarget::Conflict { checkpoint, reason } => format!(
            "holds {} at this step, which is not this stage ({reason}); the import would stop",
            checkpoint.short()
        ),
        StageTarget::Blocked => "not reached (an earlier stage conflicts)".to_string(),
    }
}
