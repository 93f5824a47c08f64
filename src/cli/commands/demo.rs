//! `coin demo`: the whole loop on CoIN-mini and a tiny model, on a CPU, nothing to download
//! (library: `workflow::demo`, docs/demo.md).

use std::io::Write as _;
use std::path::PathBuf;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::workflow::config::RunConfig;
use crate::workflow::demo::{
    demo_config, run_demo, DemoProgress, DemoReport, DemoSettings, BLIND_MARGIN, FORGET_BWT,
    LEARN_MARGIN,
};
use crate::workflow::matrix::metrics_json;
use crate::workflow::train::TrainWorkflowProgress;

use super::metrics::write_metrics_table;
use super::train::CliTrainProgress;
use super::workflow_util::process_env;

/// Run the whole continual instruction-tuning loop on CoIN-mini with a tiny model
///
/// In DIR (default ./coin-demo): creates a coin repository, generates CoIN-mini (eight small
/// tasks mirroring CoIN's) and a tiny random LLaVA, pre-trains the tiny base on caption data
/// (a short full-parameter stage so it knows the image/text format), commits the base as the
/// zero-shot row, then trains CoIN's order over the eight tasks with LoRA (or MoELoRA),
/// evaluating every seen task after every step. Prints the accuracy matrix, the metrics, the
/// plot's path, and checks three facts: each task's accuracy right after training is far above
/// chance, the same checkpoint with blank pictures stays near chance (the model reads the
/// picture), and plain LoRA forgets (BWT clearly negative). Nothing is downloaded. An
/// interrupted demo continues with the same command; another --method runs on its own branch
/// in the same folder. The folder is a normal coin repository: explore it with `coin log`,
/// `coin matrix`, `coin diff`, `coin compare lora moelora`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// The demo folder: new or empty, or a previous demo's folder to resume [default: ./coin-demo]
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// The method: lora, moelora, replay (LoRA with 20 items of each earlier task replayed),
    /// ewc (LoRA with Elastic Weight Consolidation), lwf (LoRA with Learning without
    /// Forgetting's distillation), olora (a new LoRA per task, orthogonal to the earlier ones;
    /// docs/methods.md); each runs on the branch of its name
    #[arg(long, default_value = "lora", value_parser = ["lora", "moelora", "replay", "ewc", "lwf", "olora"])]
    pub method: String,
    /// A much smaller run (seconds; what the tests use): checks the mechanics, not the science
    #[arg(long)]
    pub quick: bool,
    /// Exit with an error (code 1) when a fact does not hold (a task not far above chance, a
    /// task more than 10 points over chance with blank pictures, or BWT not clearly negative)
    #[arg(long)]
    pub check: bool,
    /// Override a setting of the demo's configuration, e.g. --set train.learning_rate=1e-3;
    /// repeatable
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the outcome as JSON
    #[arg(long)]
    pub json: bool,
}

struct CliDemoProgress<'a> {
    ui: &'a Ui,
    current: Option<CliTrainProgress<'a>>,
}

impl DemoProgress for CliDemoProgress<'_> {
    fn note(&mut self, message: &str) {
        if let Some(c) = &self.current {
            c.bar.finish();
        }
        self.ui.status(message);
    }
    fn stage(&mut self, label: &str) -> &mut dyn TrainWorkflowProgress {
        if let Some(c) = &self.current {
            c.bar.finish();
        }
        let ui = self.ui;
        self.current.insert(CliTrainProgress::new(label, ui))
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_string(), |v| format!("{v:.1}%"))
}

/// The facts in words (stdout of `coin demo`).
fn write_facts(out: &mut impl std::io::Write, r: &DemoReport) -> std::io::Result<()> {
    let f = &r.facts;
    writeln!(
        out,
        "Each task right after training it (and blind: the same checkpoint, blank pictures), vs \
         chance:"
    )?;
    for t in &f.tasks {
        writeln!(
            out,
            "  {:<16} {:>7} (blind {:>6}) vs chance {:>5.1}%  ({})   final {:>7}",
            t.task,
            pct(t.after_training),
            pct(t.blind),
            t.chance,
            t.margin
                .map_or_else(|| "—".to_string(), |m| format!("{m:+.1} points")),
            pct(t.final_score)
        )?;
    }
    match f.min_margin {
        Some(m) if f.learned => writeln!(
            out,
            "  Every task is learnt: at least {m:.1} points above chance (the bar: {LEARN_MARGIN})."
        )?,
        Some(m) => writeln!(
            out,
            "  NOT MET: the weakest task is only {m:+.1} points from chance (the bar: \
             {LEARN_MARGIN} above)."
        )?,
        None => writeln!(out, "  NOT MET: some diagonal cell is missing.")?,
    }
    write_blind_fact(out, r)?;
    let kind = match r.method.as_str() {
        "lora" => "plain LoRA",
        "replay" => "LoRA with replay",
        "ewc" => "LoRA with EWC",
        "lwf" => "LoRA with LwF",
        "olora" => "O-LoRA",
        _ => "MoELoRA",
    };
    match f.bwt {
        Some(b) if f.forgets => writeln!(
            out,
            "BWT = {b:.1} points: {kind} forgets (tasks lose {:.1} points on average by the end).",
            -b
        )?,
        Some(b) => writeln!(
            out,
            "NOT MET: BWT = {b:+.1} points; the bar for clear forgetting is {FORGET_BWT}."
        )?,
        None => writeln!(out, "NOT MET: BWT is not defined (fewer than two tasks).")?,
    }
    Ok(())
}

/// The blind-baseline fact in words: the most any task scores above chance with blank
/// pictures, against [`BLIND_MARGIN`].
fn write_blind_fact(out: &mut impl std::io::Write, r: &DemoReport) -> std::io::Result<()> {
    let over: Option<Vec<(f64, &str)>> = r
        .facts
        .tasks
        .iter()
        .map(|t| t.blind.map(|b| (b - t.chance, t.task.as_str())))
        .collect();
    let worst = over.and_then(|v| v.into_iter().max_by(|a, b| a.0.total_cmp(&b.0)));
    match worst {
        Some((d, _)) if r.facts.blind_near_chance => writeln!(
            out,
            "  Blind, every task scores at most chance {d:+.1} points (the bar: chance \
             +{BLIND_MARGIN}): the scores above need the pictures."
        ),
        Some((d, task)) => writeln!(
            out,
            "  NOT MET: blind, {task} scores chance {d:+.1} points (the bar: chance \
             +{BLIND_MARGIN})."
        ),
        None => writeln!(out, "  NOT MET: some blind score is missing."),
    }
}

impl DemoArgs {
    /// The demo folder.
    fn dir(&self, helper: &CommandHelper) -> PathBuf {
        helper.cwd.join(
            self.dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("coin-demo")),
        )
    }

    /// The demo's configuration (its own `[runtime]` included, docs/demo.md), for the process
    /// settings applied at start (`cli::main`).
    pub fn run_config(&self, helper: &CommandHelper) -> Result<RunConfig, CommandError> {
        Ok(demo_config(
            &self.dir(helper),
            &self.method,
            &DemoSettings::new(self.quick),
            &self.set,
            &process_env(),
        )?)
    }
}

pub fn cmd_demo(ui: &mut Ui, helper: &CommandHelper, args: &DemoArgs) -> Result<(), CommandError> {
    let dir = args.dir(helper);
    let settings = DemoSettings::new(args.quick);
    let report = {
        let mut progress = CliDemoProgress {
            ui: &*ui,
            current: None,
        };
        let r = run_demo(
            &dir,
            &args.method,
            &settings,
            &args.set,
            &process_env(),
            &mut progress,
        );
        if let Some(c) = &progress.current {
            c.bar.finish();
        }
        r?
    };
    let holds = report.facts.holds();
    if args.json {
        ui.json(&serde_json::json!({
            "dir": report.dir,
            "branch": report.branch,
            "method": report.method,
            "quick": args.quick,
            "order": report.order,
            "matrix": report.matrix.to_json(&report.metrics),
            "metrics": metrics_json(&report.metrics),
            "facts": report.facts,
            "plot": report.plot,
            "pretrain": report.pretrain,
            "pretrained_now": report.pretrained_now,
            "stage_seconds": report.stage_seconds,
            "seconds": report.seconds,
        }))?;
    } else {
        let out = ui.out();
        writeln!(
            out,
            "CoIN-mini, {} on the pre-trained tiny base, branch {} in '{}':\n",
            report.method,
            report.branch,
            report.dir.display()
        )?;
        write!(out, "{}", report.matrix.to_table())?;
        writeln!(out)?;
        write_metrics_table(out, &report.matrix.matrix, &report.metrics, "accuracy")?;
        writeln!(out)?;
        write_facts(out, &report)?;
        writeln!(out, "\nPlot: {}", report.plot.display())?;
        writeln!(
            out,
            "Wall time: {:.0} s. Explore: cd '{}' && coin log && coin matrix && coin diff HEAD~1 \
             HEAD",
            report.seconds,
            report.dir.display()
        )?;
    }
    if args.check && !holds {
        return Err(
            CommandError::user("the demo did not show what it should (see NOT MET above)").hint(
                "A slower machine does not change the numbers; a changed trainer or model might.",
            ),
        );
    }
    Ok(())
}
