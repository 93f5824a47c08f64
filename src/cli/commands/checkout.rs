//! `coin checkout`: rebuild a checkpoint's files, or export its adapter in another layout.

use std::path::{Path, PathBuf};

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::ml::export::{coin_dir_name, coin_dir_name_ok, export_adapter, ExportFormat};

use super::history_util::open_repo;

/// Rebuild every file of a checkpoint, byte-identical, in a new directory
///
/// Every object is verified on the way; a corrupt object aborts the checkout. Objects missing
/// here (e.g. after a plain `git fetch` of coin refs) are first fetched from the remotes.
///
/// With `--format`, the checkpoint's adapter (LoRA or MoELoRA, in any layout coin reads) is
/// exported instead: `coin` writes what CoIN's scripts load (`adapter_model.bin`,
/// `adapter_config.json` as peft 0.4.0 writes it, `non_lora_trainables.bin`, `config.json`;
/// CoIN's builder also wants "llava" and "lora" in the directory name), `peft` a PEFT adapter
/// for a llava-hf model (LoRA only), `safetensors` one file with coin's own tensor names
/// (docs/export.md). The directory appears whole or not at all.
#[derive(clap::Args, Debug)]
pub struct CheckoutArgs {
    /// The checkpoint
    pub rev: String,
    /// The directory to write (must not exist or be empty)
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
    /// Export the adapter in this layout instead of the checkpoint's own files
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<FormatArg>,
}

/// `--format` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatArg {
    /// CoIN's files: adapter_model.bin, adapter_config.json, non_lora_trainables.bin, config.json
    Coin,
    /// A PEFT adapter for llava-hf: adapter_model.safetensors, adapter_config.json
    Peft,
    /// adapter.safetensors with coin's tensor names, adapter_config.json
    Safetensors,
}

impl FormatArg {
    fn format(self) -> ExportFormat {
        match self {
            FormatArg::Coin => ExportFormat::Coin,
            FormatArg::Peft => ExportFormat::Peft,
            FormatArg::Safetensors => ExportFormat::Safetensors,
        }
    }

    fn name(self) -> &'static str {
        match self {
            FormatArg::Coin => "CoIN",
            FormatArg::Peft => "PEFT",
            FormatArg::Safetensors => "safetensors",
        }
    }
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
    let Some(format) = args.format else {
        let files = repo.checkout(id, &out)?;
        ui.status(&format!(
            "Wrote {} file(s) of {} to '{}'.",
            files.len(),
            id.short(),
            args.output.display()
        ));
        return Ok(());
    };
    crate::store::check_output_dir(&out)?;
    if out.exists() {
        let mut entries = std::fs::read_dir(&out).map_err(|e| CommandError::io("read", &out, e))?;
        if entries.next().is_some() {
            return Err(CommandError::user(format!(
                "'{}' exists and is not empty; choose a new directory",
                args.output.display()
            )));
        }
    }
    let abs = std::path::absolute(&out).map_err(|e| CommandError::io("resolve", &out, e))?;
    let parent = abs.parent().map(Path::to_path_buf).ok_or_else(|| {
        CommandError::user(format!(
            "'{}' has no parent folder to export into",
            args.output.display()
        ))
    })?;
    std::fs::create_dir_all(&parent)
        .map_err(|e| CommandError::io("create directory", &parent, e))?;
    // The checkpoint and the export are staged beside DIR; only the export is renamed into
    // place, and the staging folder goes away with the rest (also on an error).
    let staging = tempfile::Builder::new()
        .prefix(".coin-export-")
        .tempdir_in(&parent)
        .map_err(|e| CommandError::io("create a temporary folder in", &parent, e))?;
    let src = staging.path().join("checkpoint");
    repo.checkout(id, &src)?;
    let dst = staging.path().join("export");
    std::fs::create_dir(&dst).map_err(|e| CommandError::io("create directory", &dst, e))?;
    let done = export_adapter(&src, &dst, format.format())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| CommandError::io("set the mode of", &dst, e))?;
    }
    // rename(2) replaces an empty directory; a non-empty one (a race) makes it fail.
    std::fs::rename(&dst, &abs)
        .map_err(|e| CommandError::io("move the exported files into", &out, e))?;
    crate::store::fsutil::sync_dir(&parent);
    for w in &done.warnings {
        ui.warn(w);
    }
    if format == FormatArg::Coin {
        let name = abs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !coin_dir_name_ok(&name, done.kind) {
            ui.warn(&format!(
                "CoIN's model builder loads an adapter only from a directory whose name contains \
                 'llava' and 'lora' (and 'MOE' for a MoELoRA); rename '{}' to '{}' before passing it as --model-path or \
                 --previous_task_model_path.",
                args.output.display(),
                coin_dir_name(&name, done.kind)
            ));
        }
    }
    ui.status(&format!(
        "Exported {} adapted module(s){} of {} in {} layout to '{}': {}.",
        done.modules,
        if done.projector {
            " and the projector"
        } else {
            ""
        },
        id.short(),
        format.name(),
        args.output.display(),
        done.files.join(", ")
    ));
    Ok(())
}
