//! One module per subcommand: `XxxArgs` (its doc comment is the help) and `cmd_xxx`.
//! The `Command` enum below is the whole command set; there is no runtime registry.

mod bench_data;
mod bisect;
mod branch;
mod checkout;
mod clone;
mod commit;
mod compare;
mod debug;
mod demo;
mod diff;
mod eval;
mod fetch;
mod fsck;
mod gc;
mod generate;
mod history_util;
mod hooks;
mod import;
mod init;
mod judge;
mod log;
mod matrix;
mod merge;
mod metrics;
mod model;
mod pull;
mod push;
mod remote;
mod repack;
mod run;
mod score;
mod show;
mod stats;
mod status;
mod switch;
mod tag;
mod task;
mod tokenize;
mod train;
mod workflow_util;

use super::{CommandError, CommandHelper, Ui};

/// Every coin command.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    Init(init::InitArgs),
    Commit(commit::CommitArgs),
    Log(log::LogArgs),
    Show(show::ShowArgs),
    Branch(branch::BranchArgs),
    Switch(switch::SwitchArgs),
    Tag(tag::TagArgs),
    Status(status::StatusArgs),
    Diff(diff::DiffArgs),
    Bisect(bisect::BisectArgs),
    Eval(eval::EvalArgs),
    Checkout(checkout::CheckoutArgs),
    Fsck(fsck::FsckArgs),
    Gc(gc::GcArgs),
    Repack(repack::RepackArgs),
    Stats(stats::StatsArgs),
    Metrics(metrics::MetricsArgs),
    #[command(hide = true)]
    Debug(debug::DebugArgs),
    Score(score::ScoreArgs),
    #[command(subcommand)]
    Task(task::TaskCommand),
    BenchData(bench_data::BenchDataArgs),
    Judge(judge::JudgeArgs),
    Model(model::ModelArgs),
    Generate(generate::GenerateArgs),
    Tokenize(tokenize::TokenizeArgs),
    Train(train::TrainArgs),
    Run(run::RunArgs),
    Matrix(matrix::MatrixArgs),
    Compare(compare::CompareArgs),
    Merge(merge::MergeArgs),
    Demo(demo::DemoArgs),
    #[command(subcommand)]
    Remote(remote::RemoteCommand),
    Push(push::PushArgs),
    Fetch(fetch::FetchArgs),
    Pull(pull::PullArgs),
    Clone(clone::CloneArgs),
    #[command(subcommand)]
    Hooks(hooks::HooksCommand),
    #[command(subcommand)]
    Import(import::ImportCommand),
}

impl Command {
    /// The configuration of a command that runs the model, whose `[runtime]` the process
    /// applies once at start (`cli::main`); `None` for the commands that run no model.
    pub fn model_config(
        &self,
        helper: &CommandHelper,
    ) -> Result<Option<crate::workflow::config::RunConfig>, CommandError> {
        let method = |m: &Option<String>| -> Vec<String> {
            m.iter().map(|m| format!("train.method={m}")).collect()
        };
        match self {
            Command::Train(a) => a.config.resolve_here(helper, &method(&a.method)).map(Some),
            Command::Run(a) => a.config.resolve_here(helper, &method(&a.method)).map(Some),
            Command::Eval(a) if a.record.is_none() => a.config.resolve_here(helper, &[]).map(Some),
            Command::Bisect(a) => a.config.resolve_here(helper, &[]).map(Some),
            Command::Merge(a) => a.config.resolve_here(helper, &[]).map(Some),
            Command::Demo(a) => a.run_config(helper).map(Some),
            Command::Generate(_) => workflow_util::standalone_config(&[]).map(Some),
            _ => Ok(None),
        }
    }
}

/// Run one parsed command.
pub fn run(ui: &mut Ui, helper: &CommandHelper, command: Command) -> Result<(), CommandError> {
    match command {
        Command::Metrics(args) => metrics::cmd_metrics(ui, helper, &args),
        Command::Init(args) => init::cmd_init(ui, helper, &args),
        Command::Commit(args) => commit::cmd_commit(ui, helper, &args),
        Command::Log(args) => log::cmd_log(ui, helper, &args),
        Command::Show(args) => show::cmd_show(ui, helper, &args),
        Command::Branch(args) => branch::cmd_branch(ui, helper, &args),
        Command::Switch(args) => switch::cmd_switch(ui, helper, &args),
        Command::Tag(args) => tag::cmd_tag(ui, helper, &args),
        Command::Status(args) => status::cmd_status(ui, helper, &args),
        Command::Diff(args) => diff::cmd_diff(ui, helper, &args),
        Command::Bisect(args) => bisect::cmd_bisect(ui, helper, &args),
        Command::Eval(args) => eval::cmd_eval(ui, helper, &args),
        Command::Checkout(args) => checkout::cmd_checkout(ui, helper, &args),
        Command::Fsck(args) => fsck::cmd_fsck(ui, helper, &args),
        Command::Gc(args) => gc::cmd_gc(ui, helper, &args),
        Command::Repack(args) => repack::cmd_repack(ui, helper, &args),
        Command::Stats(args) => stats::cmd_stats(ui, helper, &args),
        Command::Debug(args) => debug::cmd_debug(ui, helper, &args),
        Command::Score(args) => score::cmd_score(ui, helper, &args),
        Command::Task(cmd) => task::cmd_task(ui, helper, &cmd),
        Command::BenchData(args) => bench_data::cmd_bench_data(ui, helper, &args),
        Command::Judge(args) => judge::cmd_judge(ui, helper, &args),
        Command::Import(cmd) => import::cmd_import(ui, helper, &cmd),
        Command::Model(args) => model::cmd_model(ui, helper, &args),
        Command::Generate(args) => generate::cmd_generate(ui, helper, &args),
        Command::Tokenize(args) => tokenize::cmd_tokenize(ui, helper, &args),
        Command::Train(args) => train::cmd_train(ui, helper, &args),
        Command::Run(args) => run::cmd_run(ui, helper, &args),
        Command::Matrix(args) => matrix::cmd_matrix(ui, helper, &args),
        Command::Compare(args) => compare::cmd_compare(ui, helper, &args),
        Command::Merge(args) => merge::cmd_merge(ui, helper, &args),
        Command::Demo(args) => demo::cmd_demo(ui, helper, &args),
        Command::Remote(cmd) => remote::cmd_remote(ui, helper, &cmd),
        Command::Push(args) => push::cmd_push(ui, helper, &args),
        Command::Fetch(args) => fetch::cmd_fetch(ui, helper, &args),
        Command::Pull(args) => pull::cmd_pull(ui, helper, &args),
        Command::Clone(args) => clone::cmd_clone(ui, helper, &args),
        Command::Hooks(cmd) => hooks::cmd_hooks(ui, helper, &cmd),
    }
}

/// The CLI reference in Markdown, rendered from the clap definitions (docs/cli.md).
pub fn cli_reference() -> String {
    use clap::CommandFactory;
    fn walk(cmd: &mut clap::Command, path: &str, out: &mut String) {
        let help = cmd.render_long_help().to_string();
        out.push_str(&format!(
            "## `{path}`\n\n```text\n{}\n```\n\n",
            help.trim_end()
        ));
        let names: Vec<String> = cmd
            .get_subcommands()
            .filter(|c| !c.is_hide_set() && c.get_name() != "help")
            .map(|c| c.get_name().to_string())
            .collect();
        for name in names {
            if let Some(sub) = cmd.find_subcommand_mut(&name) {
                walk(sub, &format!("{path} {name}"), out);
            }
        }
    }
    let mut out = String::from(
        "# coin CLI reference\n\nGenerated from the clap definitions by \
         `COIN_UPDATE_DOCS=1 cargo test --lib cli_reference_is_current`; a test fails when this \
         file is stale. Every read command takes `--json`: data on stdout, status on stderr. \
         Exit codes: 0 ok, 1 user or repository error, 2 usage error, 3 broken pipe, 255 internal \
         error (see \"Exit codes\" below).\n\n",
    );
    out.push_str(super::error::MESSAGES_AND_EXIT_CODES);
    out.push('\n');
    let mut cmd = super::Cli::command().term_width(100);
    cmd.build();
    walk(&mut cmd, "coin", &mut out);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        super::super::Cli::command().debug_assert();
    }

    #[test]
    fn the_commands_that_run_the_model_resolve_their_runtime_at_start() {
        use crate::ml::runtime::{DeviceKind, Kernels};
        use crate::workflow::config::Setting;
        use clap::Parser;
        let dir = tempfile::tempdir().expect("tempdir");
        let helper = crate::cli::CommandHelper {
            global: crate::cli::GlobalArgs::default(),
            cwd: dir.path().to_path_buf(),
        };
        let config = |args: &[&str]| {
            let cli = super::super::Cli::try_parse_from(args).expect("parse");
            cli.command.model_config(&helper).expect("config")
        };
        // The demo's own [runtime], with its --set on top.
        let demo = config(&["coin", "demo", "--quick", "--set", "runtime.threads=3"])
            .expect("the demo runs the model");
        assert_eq!(demo.runtime.kernels, Setting::Is(Kernels::On));
        assert_eq!(demo.runtime.device, Setting::Is(DeviceKind::Cpu));
        assert_eq!(demo.runtime.threads, Setting::Is(3));
        // generate runs the model too (no repository: the presets' runtime and the environment).
        assert!(
            config(&["coin", "generate", "--model", "m", "--image", "i", "--prompt", "p"])
                .is_some()
        );
        assert!(config(&["coin", "log"]).is_none());
        // Outside a repository `coin train` fails as the command itself would.
        let cli = super::super::Cli::try_parse_from(["coin", "train", "T"]).expect("parse");
        assert!(cli.command.model_config(&helper).is_err());
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn cli_reference_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/cli.md");
        let want = super::cli_reference();
        if std::env::var_os("COIN_UPDATE_DOCS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "docs/cli.md is stale: run `COIN_UPDATE_DOCS=1 cargo test --lib cli_reference_is_current`"
        );
    }
}
