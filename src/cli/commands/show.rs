//! `coin show`: one checkpoint in detail.

use std::io::Write;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::store::FileEntry;

use super::history_util::{evals_json, format_time, open_repo, Decorations};

/// Show a checkpoint: files, tensors, train and eval records
#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// The checkpoint [default: HEAD]
    pub rev: Option<String>,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
    /// Print the log an external trainer left with the checkpoint (stdout and stderr)
    #[arg(long, conflicts_with = "json")]
    pub log: bool,
}

pub fn cmd_show(ui: &mut Ui, helper: &CommandHelper, args: &ShowArgs) -> Result<(), CommandError> {
    let repo = open_repo(helper)?;
    let id = repo.resolve(args.rev.as_deref().unwrap_or("HEAD"))?;
    if args.log {
        let Some(log) = repo.read_attachment(id, crate::history::LOG_ATTACHMENT)? else {
            return Err(CommandError::user(format!(
                "checkpoint {} has no log (only checkpoints made by an external [trainer] \
                 keep one)",
                id.short()
            )));
        };
        ui.out().write_all(&log)?;
        return Ok(());
    }
    let cp = repo.read_checkpoint(id)?;
    let deco = Decorations::of(&repo)?;
    if args.json {
        let files: Vec<serde_json::Value> = cp
            .manifest
            .files
            .iter()
            .map(|(path, e)| match e {
                FileEntry::Blob { id, size } => serde_json::json!({
                    "path": path, "kind": "blob", "size": size, "id": id.to_hex(),
                }),
                FileEntry::Safetensors {
                    header,
                    size,
                    tensors,
                } => serde_json::json!({
                    "path": path, "kind": "safetensors", "size": size, "header": header.to_hex(),
                    "tensors": tensors.iter().map(|t| serde_json::json!({
                        "name": t.name, "dtype": t.dtype.to_string(), "shape": t.shape,
                        "bytes": t.bytes, "id": t.id.to_hex(),
                    })).collect::<Vec<_>>(),
                }),
                FileEntry::Torchbin {
                    layout,
                    size,
                    file_hash,
                    storages,
                    tensors,
                } => serde_json::json!({
                    "path": path, "kind": "torchbin", "size": size, "layout": layout.to_hex(),
                    "file_hash": file_hash.to_hex(),
                    "storages": storages.iter().map(|s| serde_json::json!({
                        "key": s.key, "dtype": s.dtype.to_string(), "offset": s.offset,
                        "bytes": s.bytes, "id": s.id.to_hex(),
                    })).collect::<Vec<_>>(),
                    "tensors": tensors.iter().map(|t| serde_json::json!({
                        "name": t.name, "dtype": t.dtype.to_string(), "shape": t.shape,
                        "strides": t.strides, "storage": t.storage, "offset": t.offset,
                    })).collect::<Vec<_>>(),
                }),
            })
            .collect();
        return ui.json(&serde_json::json!({
            "id": id.to_string(),
            "short_id": id.short(),
            "parents": cp.parents.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            "branches": deco.branches(id),
            "tags": deco.tags(id),
            "time": cp.time,
            "summary": cp.summary,
            "adapter": cp.manifest.adapter,
            "base_model": cp.manifest.base_model,
            "train": cp.train,
            "files": files,
            "eval": evals_json(&cp.evals),
        }));
    }
    let out = ui.out();
    writeln!(out, "checkpoint {id}")?;
    for p in &cp.parents {
        writeln!(out, "parent     {p}")?;
    }
    let mut names = deco.branches(id);
    names.extend(deco.tags(id).into_iter().map(|t| format!("tag: {t}")));
    if !names.is_empty() {
        writeln!(out, "refs       {}", names.join(", "))?;
    }
    writeln!(out, "date       {}", format_time(cp.time))?;
    if let Some(t) = &cp.train {
        writeln!(out, "task       {}", t.task)?;
        if let Some(m) = &t.message {
            writeln!(out, "message    {m}")?;
        }
        if let Some(x) = t.extra.get(crate::workflow::external::EXTERNAL_FIELD) {
            let status = match (x["exit"]["code"].as_i64(), x["exit"]["signal"].as_i64()) {
                (Some(c), _) => format!("exit {c}"),
                (None, Some(s)) => format!("signal {s}"),
                _ => "?".to_string(),
            };
            writeln!(
                out,
                "trainer    {}  ({status}, {:.1} s; coin show --log)",
                x["command"].as_str().unwrap_or("?"),
                x["seconds"].as_f64().unwrap_or(f64::NAN)
            )?;
            if let Some(code) = x.get("code").filter(|c| !c.is_null()) {
                writeln!(
                    out,
                    "code       {} at {}{}",
                    code["repository"].as_str().unwrap_or("?"),
                    code["commit"].as_str().unwrap_or("(no commit)"),
                    if code["dirty"].as_bool() == Some(true) {
                        format!(" + {} changed file(s)", code["changed_files"])
                    } else {
                        String::new()
                    }
                )?;
            }
        }
    }
    if let Some(a) = &cp.manifest.adapter {
        writeln!(out, "adapter    {}", a.kind)?;
    }
    if let Some(b) = &cp.manifest.base_model {
        writeln!(out, "base model {}", b.name)?;
    }
    writeln!(out)?;
    writeln!(out, "files:")?;
    for (path, e) in &cp.manifest.files {
        match e {
            FileEntry::Blob { size, .. } => writeln!(out, "  {path}  ({size} bytes)")?,
            FileEntry::Safetensors { size, .. } | FileEntry::Torchbin { size, .. } => {
                let tensors = e.named_tensors();
                writeln!(out, "  {path}  ({size} bytes, {} tensors)", tensors.len())?;
                for t in &tensors {
                    writeln!(
                        out,
                        "    {}  {}  {:?}  {}",
                        t.name,
                        t.dtype,
                        t.shape,
                        t.id.short()
                    )?;
                }
            }
        }
    }
    if !cp.evals.is_empty() {
        writeln!(out)?;
        writeln!(out, "eval:")?;
        let width = cp
            .evals
            .keys()
            .map(|k| k.chars().count())
            .max()
            .unwrap_or(4);
        for (task, (r, source)) in &cp.evals {
            let src = match source {
                crate::history::EvalSource::Tree => "commit",
                crate::history::EvalSource::Note => "note",
            };
            writeln!(
                out,
                "  {task:<width$}  {:>6.2}  {}  n={}  ({src})",
                r.score, r.metric, r.n
            )?;
        }
    }
    Ok(())
}
