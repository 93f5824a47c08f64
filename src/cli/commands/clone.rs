//! `coin clone`: copy a coin repository (code, coin history, objects) into a new directory.

use std::path::PathBuf;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::history::CoinRepo;

use super::fetch::fetch_summary;
use super::remote::TransferProgress;

/// Clone a coin repository: its git history, every coin branch, tag and note, and the objects
///
/// URL is a path or file:// URL of a coin repository or a bare git repository that coin has
/// pushed to. The clone gets a new `.coin/` (default templates), `origin` as its remote, a
/// local branch for every remote branch, and the remote's current branch as current.
#[derive(clap::Args, Debug)]
pub struct CloneArgs {
    /// The repository to clone
    pub url: String,
    /// The new directory (must not exist or be empty)
    pub dir: PathBuf,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn cmd_clone(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &CloneArgs,
) -> Result<(), CommandError> {
    let dir = helper.cwd.join(&args.dir);
    let url = match crate::history::remote::url_path(&args.url) {
        Some(p) if p.is_relative() => helper.cwd.join(p).display().to_string(),
        _ => args.url.clone(),
    };
    let mut progress = TransferProgress::new(ui, "Receiving objects");
    let (repo, report) = CoinRepo::clone_from(&url, &dir, &mut |p| progress.update(p))?;
    drop(progress);
    super::fetch::warn_fetch_problems(ui, &report);
    if args.json {
        return ui.json(&report);
    }
    ui.status(&fetch_summary(&report));
    ui.status(&format!(
        "Cloned into '{}' (current branch '{}').",
        repo.root().display(),
        repo.current_branch()?
    ));
    Ok(())
}
