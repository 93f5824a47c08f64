//! `coin checkout`: rebuild a checkpoint's files.

use std::path::PathBuf;

use crate::cli::{CommandError, CommandHelper, Ui};

use super::history_util::open_repo;

/// Rebuild every file of a checkpoint, byte-identical, in a new directory
///
/// Every object is verified on the way; a corrupt object aborts the checkout. Objects missing
/// here (e.g. after a plain `git fetch` of coin refs) are first fetched from the remotes.
#[derive(clap::Args, Debug)]
pub struct CheckoutArgs {
    /// The checkpoint
    pub rev: String,
    /// The directory to write (must not exist or be empty)
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
}

pub fn cmd_checkout(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &CheckoutArgs,
) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let id = repo.resolve(&args.rev)?;
    let out = helper.cwd.join(&args.output);
    let fetched = repo.fetch_missing_objects(&[id])?;
    if fetched > 0 {
        ui.status(&format!(
            "Fetched {fetched} missing object(s) from the remotes."
        ));
    }
    let files = repo.checkout(id, &out)?;
    ui.status(&format!(
        "Wrote {} file(s) of {} to '{}'.",
        files.len(),
        id.short(),
        args.output.display()
    ));
    Ok(())
}
