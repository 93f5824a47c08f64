//! One module per subcommand: `XxxArgs` (its doc comment is the help) and `cmd_xxx`.
//! The `Command` enum below is the whole command set; there is no runtime registry.

mod generate;
mod metrics;
mod model;

use super::{CommandError, CommandHelper, Ui};

/// Every coin command.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    Metrics(metrics::MetricsArgs),
    Model(model::ModelArgs),
    Generate(generate::GenerateArgs),
}

/// Run one parsed command.
pub fn run(ui: &mut Ui, helper: &CommandHelper, command: Command) -> Result<(), CommandError> {
    match command {
        Command::Metrics(args) => metrics::cmd_metrics(ui, helper, &args),
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
