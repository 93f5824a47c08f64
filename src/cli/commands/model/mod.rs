//! `coin model …`: commands about base models.

mod init;

use crate::cli::{CommandError, CommandHelper, Ui};

/// Create or inspect base models
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    #[command(subcommand)]
    command: ModelCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ModelCommand {
    Init(init::InitArgs),
}

pub fn cmd_model(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &ModelArgs,
) -> Result<(), CommandError> {
    match &args.command {
        ModelCommand::Init(a) => init::cmd_init(ui, helper, a),
    }
}
