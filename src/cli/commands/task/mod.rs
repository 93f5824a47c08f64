//! `coin task`: the task registry (`.coin/tasks/*.toml`).

use std::io::Write;
use std::path::PathBuf;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::history::HistoryError;
use crate::tasks::formats::dataset_identity;
use crate::tasks::mini;
use crate::tasks::registry::{check_task, find_registry_dir, Registry, TaskDef};

/// Manage the tasks of a repository
#[derive(clap::Subcommand, Debug)]
pub enum TaskCommand {
    Add(Box<TaskAddArgs>),
    List(TaskListArgs),
    Show(TaskShowArgs),
}

/// Register a task (from a TOML definition, from options, or the eight CoIN-mini tasks)
///
/// The definition format is in docs/tasks.md; relative paths are resolved against
/// `data_root`, itself relative to the repository root.
#[derive(clap::Args, Debug)]
pub struct TaskAddArgs {
    /// A task definition file to copy into the registry
    #[arg(long, conflicts_with_all = ["name", "coin_mini"])]
    pub file: Option<PathBuf>,
    /// Register the eight tasks of a CoIN-mini folder made by `coin bench-data coin-mini`
    #[arg(long, value_name = "DIR", conflicts_with = "name")]
    pub coin_mini: Option<PathBuf>,
    /// The task name
    #[arg(long, requires_all = ["scorer", "train", "test", "image_root"])]
    pub name: Option<String>,
    /// The scorer (one of the eight CoIN scorers)
    #[arg(long)]
    pub scorer: Option<String>,
    /// The training file (CoIN train.json format)
    #[arg(long)]
    pub train: Option<String>,
    /// The evaluation file (CoIN test.json format)
    #[arg(long)]
    pub test: Option<String>,
    /// The folder image paths are relative to
    #[arg(long)]
    pub image_root: Option<String>,
    /// The scorer's annotation file or folder
    #[arg(long)]
    pub annotations: Option<String>,
    /// The instruction template name (a task of templates/instructions/*.toml)
    #[arg(long)]
    pub template: Option<String>,
    /// Another accepted spelling (repeatable)
    #[arg(long = "alias")]
    pub aliases: Vec<String>,
    /// Mark the task as one of CoIN's eight (scoring defaults to compat)
    #[arg(long)]
    pub coin: bool,
    /// Replace a task of the same name
    #[arg(long)]
    pub force: bool,
}

/// List the registered tasks
#[derive(clap::Args, Debug)]
pub struct TaskListArgs {
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

/// Show one task's definition, resolved paths and (optionally) dataset identity
#[derive(clap::Args, Debug)]
pub struct TaskShowArgs {
    /// The task name or alias
    pub name: String,
    /// Also hash the training file and count its records (blake3, item count)
    #[arg(long)]
    pub identity: bool,
    /// Also read both data files with coin's readers and check every image exists
    #[arg(long)]
    pub check: bool,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

fn registry(helper: &CommandHelper) -> Result<Registry, CommandError> {
    let dir = find_registry_dir(&helper.start_dir())
        .ok_or_else(|| HistoryError::NotARepo(helper.start_dir()))?;
    Ok(Registry::load(&dir)?)
}

pub fn cmd_task(
    ui: &mut Ui,
    helper: &CommandHelper,
    cmd: &TaskCommand,
) -> Result<(), CommandError> {
    match cmd {
        TaskCommand::Add(a) => cmd_add(ui, helper, a),
        TaskCommand::List(a) => cmd_list(ui, helper, a),
        TaskCommand::Show(a) => cmd_show(ui, helper, a),
    }
}

fn cmd_add(ui: &mut Ui, helper: &CommandHelper, args: &TaskAddArgs) -> Result<(), CommandError> {
    let mut reg = registry(helper)?;
    let defs: Vec<TaskDef> = if let Some(f) = &args.file {
        let path = helper.cwd.join(f);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| CommandError::io("read the task definition", f, e))?;
        vec![TaskDef::parse(&text, f)?]
    } else if let Some(dir) = &args.coin_mini {
        let abs = helper.cwd.join(dir);
        if !abs.join(mini::MANIFEST).is_file() {
            return Err(CommandError::user(format!(
                "'{}' is not a CoIN-mini folder (no {})",
                dir.display(),
                mini::MANIFEST
            ))
            .hint("Generate one with `coin bench-data coin-mini --out DIR`."));
        }
        let root = reg.repo_root();
        let data_root = match abs.strip_prefix(&root) {
            Ok(rel) => rel.to_string_lossy().into_owned(),
            Err(_) => abs.to_string_lossy().into_owned(),
        };
        mini::task_defs(&data_root)
    } else if let Some(name) = &args.name {
        let def = TaskDef {
            name: name.clone(),
            aliases: args.aliases.clone(),
            coin: args.coin,
            scorer: args.scorer.clone().unwrap_or_default(),
            template: args.template.clone(),
            data_root: None,
            train: args.train.clone().unwrap_or_default(),
            test: args.test.clone().unwrap_or_default(),
            image_root: args.image_root.clone().unwrap_or_default(),
            annotations: args.annotations.clone(),
            description: None,
        };
        def.validate().map_err(CommandError::user)?;
        vec![def]
    } else {
        return Err(CommandError::usage(
            "give --file, --coin-mini DIR or --name with its options",
        ));
    };
    for def in defs {
        let name = def.name.clone();
        reg.add(def, args.force)?;
        ui.status(&format!("Registered task {name}."));
    }
    Ok(())
}

fn cmd_list(ui: &mut Ui, helper: &CommandHelper, args: &TaskListArgs) -> Result<(), CommandError> {
    let reg = registry(helper)?;
    if args.json {
        return ui.json(&reg.tasks);
    }
    let width = reg
        .tasks
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let out = ui.out();
    writeln!(
        out,
        "{:<width$}  {:<9}  {:<6}  test",
        "task", "scorer", "mode"
    )?;
    for t in &reg.tasks {
        writeln!(
            out,
            "{:<width$}  {:<9}  {:<6}  {}",
            t.name,
            t.scorer,
            t.default_mode(),
            t.test
        )?;
    }
    Ok(())
}

fn cmd_show(ui: &mut Ui, helper: &CommandHelper, args: &TaskShowArgs) -> Result<(), CommandError> {
    let reg = registry(helper)?;
    let def = reg.get(&args.name).ok_or_else(|| {
        CommandError::from(crate::tasks::TaskError::UnknownTask(args.name.clone()))
    })?;
    let root = reg.repo_root();
    let train = def.resolve(&root, &def.train);
    let test = def.resolve(&root, &def.test);
    let images = def.resolve(&root, &def.image_root);
    let identity = if args.identity {
        Some(dataset_identity(&train)?)
    } else {
        None
    };
    let check = if args.check {
        Some(check_task(def, &root)?)
    } else {
        None
    };
    if args.json {
        return ui.json(&serde_json::json!({
            "check": check,
            "definition": def,
            "default_mode": def.default_mode(),
            "paths": {
                "train": train, "test": test, "image_root": images,
                "annotations": def.annotations.as_ref().map(|a| def.resolve(&root, a)),
            },
            "train_identity": identity,
        }));
    }
    let out = ui.out();
    write!(out, "{}", def.to_toml())?;
    writeln!(out, "# default scoring mode: {}", def.default_mode())?;
    for (label, p) in [("train", &train), ("test", &test), ("image_root", &images)] {
        let state = if p.exists() { "" } else { "  (missing)" };
        writeln!(out, "# {label}: {}{state}", p.display())?;
    }
    if let Some(c) = &check {
        writeln!(
            out,
            "# check: {} train records, {} test records, {} images, {} missing",
            c.train_items, c.test_items, c.images.referenced, c.images.missing
        )?;
    }
    if let Some(c) = check {
        c.images.into_result(&images)?;
    }
    if let Some(id) = identity {
        writeln!(
            out,
            "# train identity: blake3 {} items {} bytes {}",
            id.blake3, id.items, id.bytes
        )?;
    }
    Ok(())
}
