//! Helpers shared by the workflow commands (`coin eval`, `coin matrix`, `coin compare`, and
//! the training commands): configuration flags, progress display.

use std::path::PathBuf;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::history::CoinRepo;
use crate::workflow::config::{ConfigSources, RunConfig};
use crate::workflow::eval::{EvalEvent, EvalProgress, TaskStatus};

/// The process environment, as the configuration's environment layer takes it
/// ([`crate::workflow::config::ENV_VARS`]: `COIN_THREADS`, `COIN_TRAIN_SHARDS`, …).
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// `--config FILE.toml` and `--set key=value`, for every command that resolves a
/// [`RunConfig`].
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// A TOML file of settings ([model], [train], [eval], [runtime]) over .coin/config.toml and
    /// the environment; repeatable
    #[arg(long = "config", value_name = "FILE.toml")]
    pub config: Vec<PathBuf>,
    /// Override one setting, e.g. --set train.lora_r=64 --set eval.mode=strict; repeatable
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl ConfigArgs {
    /// Resolve the configuration of `repo`: preset → .coin/config.toml → environment →
    /// --config → --set.
    pub fn resolve(
        &self,
        helper: &CommandHelper,
        repo: &CoinRepo,
        default_preset: Option<&str>,
    ) -> Result<RunConfig, CommandError> {
        let mut sources = ConfigSources::for_repo(
            &repo.coin_dir(),
            self.config.iter().map(|p| helper.cwd.join(p)).collect(),
            self.set.clone(),
        );
        sources.env = process_env();
        sources.default_preset = default_preset.map(str::to_string);
        Ok(sources.resolve()?)
    }

    /// [`ConfigArgs::resolve`] in the repository found from the command's directory, with
    /// `extra` sets after the user's (e.g. `train.method` from `--method`).
    pub fn resolve_here(
        &self,
        helper: &CommandHelper,
        extra: &[String],
    ) -> Result<RunConfig, CommandError> {
        let repo = super::history_util::open_repo(helper)?;
        let mut args = self.clone();
        args.set.extend(extra.iter().cloned());
        args.resolve(helper, &repo, None)
    }
}

/// The configuration of a command that runs the model without a repository (`coin generate`,
/// the `train_bench` example does the same): the presets' runtime, the environment, then `sets`.
pub fn standalone_config(sets: &[String]) -> Result<RunConfig, CommandError> {
    let sources = ConfigSources {
        sets: sets.to_vec(),
        env: process_env(),
        ..ConfigSources::default()
    };
    Ok(sources.resolve()?)
}

/// Shows eval progress as status lines on stderr.
pub struct StatusProgress<'a> {
    /// Where to write.
    pub ui: &'a Ui,
}

impl EvalProgress for StatusProgress<'_> {
    fn event(&mut self, event: &EvalEvent<'_>) {
        match event {
            EvalEvent::Planned { tasks, to_generate } => {
                if *to_generate == 0 {
                    self.ui.status(&format!(
                        "All {} task(s) are cached or re-scored from stored predictions; no model is loaded.",
                        tasks.len()
                    ));
                }
            }
            EvalEvent::LoadingModel { base } => self.ui.status(&format!(
                "Loading the base model from '{}'.",
                base.display()
            )),
            EvalEvent::TaskStarted { task, items } => self
                .ui
                .status(&format!("Generating answers for {task} ({items} items).")),
            EvalEvent::Generated { task, done, total } => {
                if self.ui.show_progress() {
                    self.ui.status(&format!("  {task}: {done}/{total}"));
                }
            }
            EvalEvent::TaskDone { eval } => {
                let what = match eval.status {
                    TaskStatus::Generated => "generated and scored",
                    TaskStatus::Cached => "cached: same adapter, eval set, decoding and scorer mode (use --force to re-run)",
                    TaskStatus::Rescored => "re-scored from stored predictions, no generation",
                    TaskStatus::ScoredFile => "scored from the answer file",
                };
                self.ui.status(&format!("{}: {what}.", eval.task));
            }
        }
    }
}
