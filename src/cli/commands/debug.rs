//! `coin debug …`: hidden commands that expose the object store directly, for the crash tests
//! (tests/test_store_crash.rs, whose `COIN_FAULT` points live in the binary) and for checking
//! a store by hand. Not part of the user interface. The benchmark harnesses are examples, not
//! commands: `examples/train_bench.rs`, `examples/blake3_bench.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use crate::cli::{CommandError, CommandHelper, ErrorKind, Ui};
use crate::store::{FileEntry, Store};

/// Debugging commands for the object store
#[derive(clap::Args, Debug)]
pub struct DebugArgs {
    #[command(subcommand)]
    command: DebugCommand,
}

#[derive(clap::Subcommand, Debug)]
enum DebugCommand {
    #[command(name = "store-ingest")]
    Ingest(StoreIngestArgs),
    #[command(name = "store-materialize")]
    Materialize(StoreMaterializeArgs),
    #[command(name = "store-verify")]
    Verify(StoreVerifyArgs),
    #[command(name = "store-pack")]
    Pack(StorePackArgs),
}

/// Move small loose objects into a pack (as `coin gc` does) and print the report as JSON
#[derive(clap::Args, Debug)]
struct StorePackArgs {
    /// The store directory
    #[arg(long)]
    store: PathBuf,
    /// Merge all packs into one
    #[arg(long)]
    merge: bool,
    /// Pack only when at least this many loose objects qualify
    #[arg(long, default_value_t = 1)]
    min_objects: usize,
}

/// Store files in an object store (created if missing) and print their entries as JSON
#[derive(clap::Args, Debug)]
struct StoreIngestArgs {
    /// The store directory (a `.coin` directory)
    #[arg(long)]
    store: PathBuf,
    /// Files to store
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

/// Rebuild files from the entries JSON printed by `store-ingest`
#[derive(clap::Args, Debug)]
struct StoreMaterializeArgs {
    /// The store directory
    #[arg(long)]
    store: PathBuf,
    /// The JSON printed by `store-ingest` (its "entries" map: file name → entry)
    #[arg(long)]
    entries: PathBuf,
    /// Directory to write the files into (by file name)
    #[arg(long)]
    output: PathBuf,
}

/// Verify every object; exit 1 if any is corrupt
#[derive(clap::Args, Debug)]
struct StoreVerifyArgs {
    /// The store directory
    #[arg(long)]
    store: PathBuf,
}

pub fn cmd_debug(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &DebugArgs,
) -> Result<(), CommandError> {
    let abs = |p: &PathBuf| helper.cwd.join(p);
    match &args.command {
        DebugCommand::Ingest(a) => {
            let store = Store::init(&abs(&a.store))?;
            let start = Instant::now();
            let mut entries = BTreeMap::new();
            for f in &a.files {
                let path = abs(f);
                let entry = store.ingest_file(&path)?;
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                entries.insert(name, entry);
            }
            let seconds = start.elapsed().as_secs_f64();
            ui.json(&serde_json::json!({ "entries": entries, "seconds": seconds }))
        }
        DebugCommand::Materialize(a) => {
            let store = Store::open(&abs(&a.store))?;
            let text = std::fs::read(abs(&a.entries))
                .map_err(|e| CommandError::io("read", &a.entries, e))?;
            let bad_json = |e| CommandError::caused(ErrorKind::User, "bad entries JSON", e);
            let v: serde_json::Value = serde_json::from_slice(&text).map_err(bad_json)?;
            let entries: BTreeMap<String, FileEntry> =
                serde_json::from_value(v.get("entries").cloned().unwrap_or(v)).map_err(bad_json)?;
            let start = Instant::now();
            let out = abs(&a.output);
            for (name, entry) in &entries {
                crate::store::check_relative_path(name)?;
                store.materialize(entry, &out.join(name))?;
            }
            let seconds = start.elapsed().as_secs_f64();
            ui.json(&serde_json::json!({ "files": entries.len(), "seconds": seconds }))
        }
        DebugCommand::Pack(a) => {
            let store = Store::open(&abs(&a.store))?;
            let _lock = crate::store::Lock::acquire(
                &store.root().join("lock"),
                std::time::Duration::from_secs(10),
            )?;
            let start = Instant::now();
            let opts = crate::store::pack::PackOptions {
                merge: a.merge,
                min_objects: a.min_objects,
                ..Default::default()
            };
            let report = store.pack_loose(&opts)?;
            let seconds = start.elapsed().as_secs_f64();
            ui.json(&serde_json::json!({ "report": report, "seconds": seconds }))
        }
        DebugCommand::Verify(a) => {
            let store = Store::open(&abs(&a.store))?;
            let ids = store.list()?;
            let mut bad = Vec::new();
            for id in &ids {
                if let Err(e) = store.verify(id) {
                    bad.push(CommandError::from(e).to_string());
                }
            }
            for p in store.check_packs()? {
                bad.push(format!("'{}': {}", p.path.display(), p.message));
            }
            let temp = store.temp_files()?.len();
            let stats = store.stats()?;
            ui.json(&serde_json::json!({
                "objects": ids.len(), "corrupt": bad, "temp_files": temp,
                "stored_bytes": stats.stored_bytes, "packed_objects": stats.packed_objects,
                "packs": stats.packs,
            }))?;
            if bad.is_empty() {
                Ok(())
            } else {
                Err(CommandError::user(format!("{} corrupt objects", bad.len())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[test]
    fn benchmark_harnesses_are_not_commands() {
        let parse = |args: &[&str]| crate::cli::Cli::try_parse_from(args);
        assert!(parse(&["coin", "debug", "store-verify", "--store", "s"]).is_ok());
        // examples/train_bench.rs and examples/blake3_bench.rs replace these.
        assert!(parse(&["coin", "debug", "train-bench", "--model", "m"]).is_err());
        assert!(parse(&["coin", "debug", "blake3", "f"]).is_err());
    }
}
