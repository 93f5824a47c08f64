//! One module per subcommand: `XxxArgs` (its doc comment is the help) and `cmd_xxx`.
//! The `Command` enum below is the whole command set; there is no runtime registry.

mod branch;
mod checkout;
mod commit;
mod debug;
mod diff;
mod eval;
mod fsck;
mod gc;
mod history_util;
mod init;
mod log;
mod metrics;
mod show;
mod stats;
mod status;
mod switch;
mod tag;

use super::{CommandError, CommandHelper, Ui};

/// Every coin command.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    Metrics(metrics::MetricsArgs),
    Init(init::InitArgs),
    Commit(commit::CommitArgs),
    Log(log::LogArgs),
    Show(show::ShowArgs),
    Branch(branch::BranchArgs),
    Switch(switch::SwitchArgs),
    Tag(tag::TagArgs),
    Status(status::StatusArgs),
    Diff(diff::DiffArgs),
    Eval(eval::EvalArgs),
    Checkout(checkout::CheckoutArgs),
    Fsck(fsck::FsckArgs),
    Gc(gc::GcArgs),
    Stats(stats::StatsArgs),
    #[command(hide = true)]
    Debug(debug::DebugArgs),
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
        Command::Eval(args) => eval::cmd_eval(ui, helper, &args),
        Command::Checkout(args) => checkout::cmd_checkout(ui, helper, &args),
        Command::Fsck(args) => fsck::cmd_fsck(ui, helper, &args),
        Command::Gc(args) => gc::cmd_gc(ui, helper, &args),
        Command::Stats(args) => stats::cmd_stats(ui, helper, &args),
        Command::Debug(args) => debug::cmd_debug(ui, helper, &args),
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
