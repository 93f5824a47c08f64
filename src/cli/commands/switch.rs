//! `coin switch`: change the current branch.

use crate::cli::{CommandError, CommandHelper, Ui};

use super::history_util::open_repo;

/// Make NAME the current branch (with -c: create it at START first)
///
/// Only `refs/coin/HEAD` changes: coin keeps no work tree, so nothing else is touched. New
/// commits go on the current branch.
#[derive(clap::Args, Debug)]
pub struct SwitchArgs {
    /// Create the branch first
    #[arg(short = 'c', long)]
    pub create: bool,
    /// The branch
    pub name: String,
    /// Where a new branch starts [default: HEAD]
    #[arg(requires = "create")]
    pub start: Option<String>,
}

pub fn cmd_switch(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &SwitchArgs,
) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    if args.create {
        let target = repo.resolve(args.start.as_deref().unwrap_or("HEAD"))?;
        repo.create_branch(&args.name, target)?;
        ui.status(&format!(
            "Created branch '{}' at {}.",
            args.name,
            target.short()
        ));
    }
    repo.switch(&args.name, false)?;
    ui.status(&format!("Switched to branch '{}'.", args.name));
    Ok(())
}
