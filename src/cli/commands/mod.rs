//! One module per subcommand: `XxxArgs` (its doc comment is the help) and `cmd_xxx`.
//! The `Command` enum below is the whole command set; there is no runtime registry.

mod bench_data;
mod debug;
mod generate;
mod judge;
mod metrics;
mod model;
mod score;
mod task;

use super::{CommandError, CommandHelper, Ui};

/// Every coin command.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
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
}

/// Run one parsed command.
pub fn run(ui: &mut Ui, helper: &CommandHelper, command: Command) -> Result<(), CommandError> {
    match command {
        Command::Metrics(args) => metrics::cmd_metrics(ui, helper, &args),
        Command::Debug(args) => debug::cmd_debug(ui, helper, &args),
        Command::Score(args) => score::cmd_score(ui, helper, &args),
        Command::Task(cmd) => task::cmd_task(ui, helper, &cmd),
        Command::BenchData(args) => bench_data::cmd_bench_data(ui, helper, &args),
        Command::Judge(args) => judge::cmd_judge(ui, helper, &args),
        Command::Model(args) => model::cmd_model(ui, helper, &args),
        Command::Generate(args) => generate::cmd_generate(ui, helper, &args),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        super::super::Cli::command().debug_assert();
    }
}
