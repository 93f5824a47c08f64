//! `coin tag`: list or create tags.

use std::io::Write;

use crate::cli::{CommandError, CommandHelper, Ui};

use super::history_util::open_repo;

/// List tags, or tag a checkpoint (default HEAD) as NAME
#[derive(clap::Args, Debug)]
pub struct TagArgs {
    /// The tag to create
    pub name: Option<String>,
    /// The checkpoint to tag [default: HEAD]
    #[arg(requires = "name")]
    pub rev: Option<String>,
    /// Print JSON instead of text (listing)
    #[arg(long)]
    pub json: bool,
}

pub fn cmd_tag(ui: &mut Ui, helper: &CommandHelper, args: &TagArgs) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    if let Some(name) = &args.name {
        let target = repo.resolve(args.rev.as_deref().unwrap_or("HEAD"))?;
        repo.create_tag(name, target)?;
        ui.status(&format!("Tagged {} as '{name}'.", target.short()));
        return Ok(());
    }
    let tags = repo.tags()?;
    if args.json {
        let rows: Vec<_> = tags
            .iter()
            .map(|(name, id)| serde_json::json!({"name": name, "id": id.to_string()}))
            .collect();
        return ui.json(&rows);
    }
    let out = ui.out();
    for (name, id) in &tags {
        writeln!(out, "{name}  {}", id.short())?;
    }
    Ok(())
}
