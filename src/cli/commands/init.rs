//! `coin init`: create a coin repository.

use std::path::PathBuf;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::history::CoinRepo;

/// Create a coin repository (a new git repository, or inside an existing one)
///
/// Inside an existing git repository coin only adds `.coin/` (listed in `.git/info/exclude`)
/// and refs under `refs/coin/`; your branches, index and work tree are not touched.
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// Where to create it [default: the current directory]
    pub path: Option<PathBuf>,
}

pub fn cmd_init(ui: &mut Ui, helper: &CommandHelper, args: &InitArgs) -> Result<(), CommandError> {
    let path = match &args.path {
        Some(p) => helper.cwd.join(p),
        None => helper.start_dir(),
    };
    let outcome = CoinRepo::init(&path)?;
    let how = if outcome.created_git {
        "in a new git repository".to_string()
    } else {
        format!(
            "inside the existing git repository '{}'",
            outcome.git_dir.display()
        )
    };
    ui.status(&format!(
        "Initialized a coin repository in '{}' {how}.",
        outcome.root.display()
    ));
    Ok(())
}
