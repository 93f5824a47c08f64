//! `coin branch`: list or create branches.

use std::io::Write;

use crate::cli::{CommandError, CommandHelper, Ui};

use super::history_util::open_repo;

/// List branches, or create branch NAME at START (default HEAD)
///
/// A branch is a task order: `coin switch -c order-b <base>` starts a new one.
#[derive(clap::Args, Debug)]
pub struct BranchArgs {
    /// The branch to create
    pub name: Option<String>,
    /// Where it starts [default: HEAD]
    #[arg(requires = "name")]
    pub start: Option<String>,
    /// Print JSON instead of text (listing)
    #[arg(long)]
    pub json: bool,
}

pub fn cmd_branch(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &BranchArgs,
) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    if let Some(name) = &args.name {
        let target = repo.resolve(args.start.as_deref().unwrap_or("HEAD"))?;
        repo.create_branch(name, target)?;
        ui.status(&format!("Created branch '{name}' at {}.", target.short()));
        return Ok(());
    }
    let current = repo.current_branch()?;
    let branches = repo.branches()?;
    if args.json {
        let rows: Vec<_> = branches
            .iter()
            .map(|(name, id)| {
                serde_json::json!({"name": name, "id": id.to_string(), "current": *name == current})
            })
            .collect();
        return ui.json(&rows);
    }
    let out = ui.out();
    for (name, id) in &branches {
        let mark = if *name == current { '*' } else { ' ' };
        writeln!(out, "{mark} {name}  {}", id.short())?;
    }
    if !branches.iter().any(|(n, _)| *n == current) {
        writeln!(out, "* {current}  (no checkpoints yet)")?;
    }
    Ok(())
}
