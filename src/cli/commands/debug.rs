//! `coin debug …`: hidden commands that expose the object store directly, for crash tests
//! and the store benchmark (bench/store.sh). Not part of the user interface.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::store::{FileEntry, Store, StoreError};

/// Debugging and benchmarking commands for the object store
#[derive(clap::Args, Debug)]
pub struct DebugArgs {
    #[command(subcommand)]
    command: DebugCommand,
}

#[derive(clap::Subcommand, Debug)]
enum DebugCommand {
    StoreIngest(StoreIngestArgs),
    StoreMaterialize(StoreMaterializeArgs),
    StoreVerify(StoreVerifyArgs),
    Blake3(Blake3Args),
    TrainBench(super::debug_train::TrainBenchArgs),
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

/// Time blake3 (rayon, all threads) over a file read in 64 MiB chunks, without storing it
#[derive(clap::Args, Debug)]
struct Blake3Args {
    /// The file
    file: PathBuf,
}

impl DebugArgs {
    /// The configuration of a subcommand that runs the model (`train-bench`); `None` else.
    pub fn run_config(&self) -> Result<Option<crate::workflow::config::RunConfig>, CommandError> {
        match &self.command {
            DebugCommand::TrainBench(a) => a.run_config().map(Some),
            _ => Ok(None),
        }
    }
}

fn user(e: StoreError) -> CommandError {
    CommandError::user(e.to_string())
}

pub fn cmd_debug(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &DebugArgs,
) -> Result<(), CommandError> {
    let abs = |p: &PathBuf| helper.cwd.join(p);
    match &args.command {
        DebugCommand::TrainBench(a) => super::debug_train::cmd_train_bench(ui, helper, a),
        DebugCommand::StoreIngest(a) => {
            let store = Store::init(&abs(&a.store)).map_err(user)?;
            let start = Instant::now();
            let mut entries = BTreeMap::new();
            for f in &a.files {
                let path = abs(f);
                let entry = store.ingest_file(&path).map_err(user)?;
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                entries.insert(name, entry);
            }
            let seconds = start.elapsed().as_secs_f64();
            ui.json(&serde_json::json!({ "entries": entries, "seconds": seconds }))
        }
        DebugCommand::StoreMaterialize(a) => {
            let store = Store::open(&abs(&a.store)).map_err(user)?;
            let text = std::fs::read(abs(&a.entries))?;
            let v: serde_json::Value = serde_json::from_slice(&text)
                .map_err(|e| CommandError::user(format!("bad entries JSON: {e}")))?;
            let entries: BTreeMap<String, FileEntry> =
                serde_json::from_value(v.get("entries").cloned().unwrap_or(v))
                    .map_err(|e| CommandError::user(format!("bad entries JSON: {e}")))?;
            let start = Instant::now();
            let out = abs(&a.output);
            for (name, entry) in &entries {
                crate::store::check_relative_path(name).map_err(user)?;
                store.materialize(entry, &out.join(name)).map_err(user)?;
            }
            let seconds = start.elapsed().as_secs_f64();
            ui.json(&serde_json::json!({ "files": entries.len(), "seconds": seconds }))
        }
        DebugCommand::StoreVerify(a) => {
            let store = Store::open(&abs(&a.store)).map_err(user)?;
            let ids = store.list().map_err(user)?;
            let mut bad = Vec::new();
            for id in &ids {
                if let Err(e) = store.verify(id) {
                    bad.push(e.to_string());
                }
            }
            let temp = store.temp_files().map_err(user)?.len();
            let stats = store.stats().map_err(user)?;
            ui.json(&serde_json::json!({
                "objects": ids.len(), "corrupt": bad, "temp_files": temp,
                "stored_bytes": stats.stored_bytes,
            }))?;
            if bad.is_empty() {
                Ok(())
            } else {
                Err(CommandError::user(format!("{} corrupt objects", bad.len())))
            }
        }
        DebugCommand::Blake3(a) => {
            let path = abs(&a.file);
            let mut f = std::fs::File::open(&path)?;
            let len = f.metadata()?.len();
            let mut buf = vec![0u8; len.clamp(1, 64 * 1024 * 1024) as usize];
            let mut h = blake3::Hasher::new();
            let start = Instant::now();
            let mut total = 0u64;
            loop {
                let mut n = 0;
                while n < buf.len() {
                    let k = f.read(&mut buf[n..])?;
                    if k == 0 {
                        break;
                    }
                    n += k;
                }
                if n == 0 {
                    break;
                }
                h.update_rayon(&buf[..n]);
                total += n as u64;
            }
            let seconds = start.elapsed().as_secs_f64();
            ui.json(&serde_json::json!({
                "bytes": total, "seconds": seconds, "hash": h.finalize().to_hex().as_str(),
            }))
        }
    }
}
