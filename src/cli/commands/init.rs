//! `coin init`: create a coin repository.

use std::path::PathBuf;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::history::{CoinRepo, InitOptions};

/// Create a coin repository (a new git repository, or inside an existing one)
///
/// Inside an existing git repository coin only adds `.coin/` (listed in `.git/info/exclude`),
/// refs under `refs/coin/` and its git hooks (a hook you already have is kept as
/// `<name>.local` and still runs); your branches, index and work tree are not touched.
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// Where to create it [default: the current directory]
    pub path: Option<PathBuf>,
    /// Copy this folder into .coin/ instead of the shipped templates (like git init --template)
    #[arg(long, value_name = "DIR")]
    pub template: Option<PathBuf>,
    /// Do not install coin's git hooks (pre-push, post-checkout, post-merge, pre-commit)
    #[arg(long)]
    pub no_hooks: bool,
}

pub fn cmd_init(ui: &mut Ui, helper: &CommandHelper, args: &InitArgs) -> Result<(), CommandError> {
    let path = match &args.path {
        Some(p) => helper.cwd.join(p),
        None => helper.start_dir(),
    };
    let opts = InitOptions {
        template: args.template.as_ref().map(|t| helper.cwd.join(t)),
        git_hooks: !args.no_hooks,
    };
    let outcome = CoinRepo::init_with(&path, &opts)?;
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
    if let Some(h) = &outcome.hooks {
        for name in &h.chained {
            ui.status(&format!(
                "Kept your {name} hook as {name}.local; coin's {name} hook runs it first."
            ));
        }
    }
    Ok(())
}
