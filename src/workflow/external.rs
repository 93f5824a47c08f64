//! External trainers and evaluators (`[trainer]`, `[evaluator]`; docs/external.md): a step of
//! `coin train`/`coin run` executed by any program (DeepSpeed, torchrun, CoIN's own scripts)
//! while coin keeps the books.
//!
//! A trainer step: the parent checkpoint is written where the command expects it (as stored,
//! or in PEFT's, CoIN's or coin's safetensors layout), the command line is filled in (every
//! `{placeholder}` replaced by a shell-quoted value, and each also exported as `COIN_<NAME>`),
//! run by `sh -c` in its working folder with stdout and stderr captured into a log, and, when
//! it exits with status 0, the adapter it left is committed as the new checkpoint: the train
//! record holds the command, exit status, duration, the recorded environment, the git commit
//! and dirty state of the trainer's code and the data identity; the log is kept in the
//! checkpoint's git tree (attachment `log`). A failed or killed command writes no checkpoint;
//! its work folder (`.coin/tmp/external/<key>/`) stays, so the same command runs it again into
//! the same output folder (a trainer that resumes from its own checkpoints continues).
//!
//! The training key of an external step covers the command template, the values of the
//! placeholders that are not temporary paths, the parent, the task, the data, the trainer
//! code's commit and dirty state, and the recorded environment: a second order that
//! shares a prefix reuses those steps exactly as with coin's engine.
//!
//! An evaluator run writes an answer file per task (CoIN's `merge.jsonl` lines); coin scores
//! it with its own scorers and attaches the record with the evaluator's command, status, time
//! and key (an identical earlier run is not repeated).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::config::{CheckpointLayout, Method, RunConfig};
use super::eval::{find_task, score_answer_file, TaskEval, TaskStatus};
use super::WorkflowError;
use crate::history::records::to_canonical_json;
use crate::history::{Checkpoint, CheckpointId, CoinRepo, LOG_ATTACHMENT};
use crate::ml::export::{export_adapter, ExportFormat};
use crate::tasks::registry::{Registry, TaskDef};

/// The version tag of an external step's training key.
pub const EXTERNAL_KEY_FORMAT: &str = "coin.external-training-key.v1";

/// The version tag of an external evaluator run's key.
pub const EVALUATOR_KEY_FORMAT: &str = "coin.external-eval-key.v1";

/// The train-record (and eval-record) field describing the external run.
pub const EXTERNAL_FIELD: &str = "external";

/// The eval-record field describing an external evaluator run.
pub const EVALUATOR_FIELD: &str = "evaluator";

/// Placeholders whose values are temporary or machine-specific paths: never part of a key
/// (the parent and the data are keyed by identity instead).
const UNKEYED: &[&str] = &[
    "data",
    "image_root",
    "model_base",
    "vision_tower",
    "projector",
    "parent_dir",
    "output_dir",
    "checkpoint_dir",
    "results_dir",
    "test",
    "repo_root",
];

/// How many bytes of a log's end an error message and an eval record quote.
const TAIL_BYTES: usize = 4096;

/// How often a running command is polled for its exit and its log's last line.
const POLL: Duration = Duration::from_millis(200);

/// Progress of an external command (the CLI draws it; library code never prints).
pub trait CommandProgress {
    /// The command starts (`what`: e.g. "train mini-VizWiz").
    fn started(&mut self, what: &str, command: &str, log: &Path);
    /// It is still running: seconds so far and the last line of its output.
    fn running(&mut self, what: &str, seconds: f64, last_line: &str);
    /// It exited (`ok`: with status 0).
    fn finished(&mut self, what: &str, seconds: f64, ok: bool);
}

/// A [`CommandProgress`] that shows nothing.
pub struct NoCommandProgress;

impl CommandProgress for NoCommandProgress {
    fn started(&mut self, _: &str, _: &str, _: &Path) {}
    fn running(&mut self, _: &str, _: f64, _: &str) {}
    fn finished(&mut self, _: &str, _: f64, _: bool) {}
}

/// The filled-in values of a command's placeholders.
pub type Values = BTreeMap<String, String>;

/// Fill `template`: each `{name}` becomes its value (shell-quoted when `quote`), `{{` and `}}`
/// are literal braces. Returns the text and the names it used. An unknown name is an error
/// listing the known ones.
pub fn render(
    template: &str,
    values: &Values,
    quote: bool,
    what: &str,
) -> Result<(String, BTreeSet<String>), WorkflowError> {
    let mut out = String::with_capacity(template.len());
    let mut used = BTreeSet::new();
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if tail.starts_with('}') {
            return Err(WorkflowError::Config(format!(
                "{what}: a lone '}}' in '{template}' (write '}}}}' for a brace)"
            )));
        }
        let Some(end) = tail.find('}') else {
            return Err(WorkflowError::Config(format!(
                "{what}: '{{' without '}}' in '{template}' (write '{{{{' for a brace)"
            )));
        };
        let name = &tail[1..end];
        let Some(value) = values.get(name) else {
            let known: Vec<&str> = values.keys().map(String::as_str).collect();
            return Err(WorkflowError::Config(format!(
                "{what}: unknown placeholder '{{{name}}}'; the placeholders are {}",
                known
                    .iter()
                    .map(|k| format!("{{{k}}}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )));
        };
        if quote {
            let q = shlex::try_quote(value).map_err(|_| {
                WorkflowError::Input(format!(
                    "{what}: the value of {{{name}}} contains a NUL byte and cannot be passed \
                     to a shell"
                ))
            })?;
            out.push_str(&q);
        } else {
            out.push_str(value);
        }
        used.insert(name.to_string());
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok((out, used))
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl Exit {
    /// Status 0.
    pub fn ok(&self) -> bool {
        *self == Exit::Code(0)
    }

    fn describe(&self) -> String {
        match self {
            // A shell reports a child killed by signal N as status 128 + N.
            Exit::Code(c) if (129..=159).contains(c) => format!(
                "exited with status {c} (a shell's way of saying that it was killed by signal \
                 {}{})",
                c - 128,
                if *c == 137 {
                    ": SIGKILL, e.g. the out-of-memory killer"
                } else {
                    ""
                }
            ),
            Exit::Code(c) => format!("exited with status {c}"),
            Exit::Signal(s) => format!("was killed by signal {s}"),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Exit::Code(c) => json!({"code": c}),
            Exit::Signal(s) => json!({"signal": s}),
        }
    }
}

/// What one run of a command did.
#[derive(Clone, Debug)]
pub struct CommandRun {
    /// The command line as run.
    pub command: String,
    /// Where it ran.
    pub workdir: PathBuf,
    /// How it ended.
    pub exit: Exit,
    /// Wall seconds.
    pub seconds: f64,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> WorkflowError + use<> {
    WorkflowError::io(op, path.to_path_buf())
}

/// The last non-empty line of `text` (after its last carriage return: progress bars).
fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .map(|l| l.rsplit('\r').find(|s| !s.trim().is_empty()).unwrap_or(""))
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim_end()
}

/// The last `max` bytes of a file, as text (lossy).
fn file_tail(path: &Path, max: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max as u64);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(max as u64).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last `max` bytes of a file and its whole length (a log of many GB is not read whole).
fn read_tail(path: &Path, max: usize) -> Result<(Vec<u8>, u64), WorkflowError> {
    let mut f = std::fs::File::open(path).map_err(io_err("read the log", path))?;
    let len = f.metadata().map_err(io_err("read the log", path))?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max as u64)))
        .map_err(io_err("read the log", path))?;
    let mut buf = Vec::new();
    f.take(max as u64)
        .read_to_end(&mut buf)
        .map_err(io_err("read the log", path))?;
    Ok((buf, len))
}

/// Hold the lock of a work folder of `.coin/tmp/external/` (its name + `.lock`, beside it,
/// so that it outlives the folder): two coin processes never run the same step or the same
/// checkpoint's evals into one folder.
pub fn lock_work(work: &Path) -> Result<crate::store::Lock, WorkflowError> {
    let mut name = work.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    let path = work.with_file_name(name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    }
    crate::store::Lock::acquire(&path, Duration::ZERO).map_err(|e| match e {
        crate::store::StoreError::Locked { .. } => WorkflowError::Input(format!(
            "another coin process is running this step (it holds '{}'); wait for it, or \
             stop it and run again",
            path.display()
        )),
        other => other.into(),
    })
}

/// Run `command` under `sh -c` in `workdir` with `env` added, stdout and stderr into `log`,
/// reporting its last output line while it runs.
pub fn run_command(
    what: &str,
    command: &str,
    workdir: &Path,
    env: &[(String, String)],
    log: &Path,
    progress: &mut dyn CommandProgress,
) -> Result<CommandRun, WorkflowError> {
    if !workdir.is_dir() {
        return Err(WorkflowError::Input(format!(
            "{what}: the working folder '{}' does not exist (set workdir in [trainer] / \
             [evaluator]; relative paths are read from the repository root)",
            workdir.display()
        )));
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(log)
        .map_err(io_err("create the log", log))?;
    let err = out.try_clone().map_err(io_err("open the log", log))?;
    progress.started(what, command, log);
    let start = Instant::now();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(workdir)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(io_err("start 'sh' for the command in", workdir))?;
    let mut reader = std::fs::File::open(log).map_err(io_err("read the log", log))?;
    let mut pending = String::new();
    let mut shown = String::new();
    let status = loop {
        if let Some(s) = child
            .try_wait()
            .map_err(io_err("wait for the command in", workdir))?
        {
            break s;
        }
        std::thread::sleep(POLL);
        let mut buf = Vec::new();
        let _ = (&mut reader).take(1 << 20).read_to_end(&mut buf);
        if !buf.is_empty() {
            pending.push_str(&String::from_utf8_lossy(&buf));
            let line = last_line(&pending).to_string();
            if !line.is_empty() {
                shown = line;
            }
            // Keep only the unfinished last line.
            if let Some(i) = pending.rfind('\n') {
                pending.drain(..=i);
            }
        }
        progress.running(what, start.elapsed().as_secs_f64(), &shown);
    };
    let seconds = start.elapsed().as_secs_f64();
    let exit = match status.code() {
        Some(c) => Exit::Code(c),
        None => {
            #[cfg(unix)]
            {
                use std::os::unix::process::ExitStatusExt;
                Exit::Signal(status.signal().unwrap_or(0))
            }
            #[cfg(not(unix))]
            {
                Exit::Signal(0)
            }
        }
    };
    progress.finished(what, seconds, exit.ok());
    Ok(CommandRun {
        command: command.to_string(),
        workdir: workdir.to_path_buf(),
        exit,
        seconds,
        log: log.to_path_buf(),
    })
}

/// What a record says of a command run: the command as run, its template, where, how it
/// ended, how long, the recorded environment and the code's git state; then `more`.
fn run_record(
    run: &CommandRun,
    template: &str,
    env: &BTreeMap<String, Value>,
    code: &Value,
    more: Value,
) -> Value {
    let mut v = json!({
        "command": run.command,
        "template": template,
        "workdir": abs(&run.workdir),
        "exit": run.exit.to_json(),
        "seconds": run.seconds,
        "env": env,
        "code": code,
    });
    if let (Some(o), Value::Object(m)) = (v.as_object_mut(), more) {
        o.extend(m);
    }
    v
}

/// The error of a command that did not exit with status 0.
fn failed(what: &str, run: &CommandRun) -> WorkflowError {
    WorkflowError::External {
        what: what.to_string(),
        status: run.exit.describe(),
        log: run.log.clone(),
        tail: last_lines(&file_tail(&run.log, TAIL_BYTES), 20),
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Tracked files larger than this are keyed by size and modification time, not content.
const HASHED_FILE_MAX: u64 = 64 << 20;

/// The git state of the code in `dir`: the commit of the repository holding it, whether its
/// tracked files differ from that commit (`dirty`, like `git describe --dirty`) with a hash of
/// what differs (so another edit gives another key), and how many untracked entries it has
/// (recorded, not keyed: a new data folder beside the code does not retrain anything). `null`
/// outside a git repository. Entries under `ignore` (coin's own folder) do not count.
pub fn code_state(dir: &Path, ignore: &Path) -> Value {
    let Ok(repo) = git2::Repository::discover(dir) else {
        return Value::Null;
    };
    let Some(top) = repo.workdir().map(Path::to_path_buf) else {
        return Value::Null;
    };
    let commit = repo
        .head()
        .ok()
        .and_then(|h| h.peel_to_commit().ok())
        .map(|c| c.id().to_string());
    let mut opts = git2::StatusOptions::new();
    opts.include_untracked(true)
        .recurse_untracked_dirs(false)
        .include_ignored(false);
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let ignore_rel = canon(ignore)
        .strip_prefix(canon(&top))
        .ok()
        .map(Path::to_path_buf);
    let mut hasher = blake3::Hasher::new();
    let (mut changed, mut untracked) = (0usize, 0usize);
    if let Ok(statuses) = repo.statuses(Some(&mut opts)) {
        let mut entries: Vec<(String, git2::Status)> = statuses
            .iter()
            .filter_map(|e| e.path().ok().map(|p| (p.to_string(), e.status())))
            .filter(|(p, _)| {
                ignore_rel
                    .as_ref()
                    .is_none_or(|i| i.as_os_str().is_empty() || !Path::new(p).starts_with(i))
            })
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        for (path, status) in &entries {
            if status.is_wt_new() && !status.is_index_new() {
                untracked += 1;
                continue;
            }
            changed += 1;
            hasher.update(path.as_bytes());
            hasher.update(&status.bits().to_le_bytes());
            let disk = top.join(path);
            match std::fs::symlink_metadata(&disk) {
                Ok(m) if m.is_file() && m.len() <= HASHED_FILE_MAX => {
                    let mut h = blake3::Hasher::new();
                    if h.update_mmap(&disk).is_ok() {
                        hasher.update(h.finalize().as_bytes());
                    }
                }
                Ok(m) => {
                    hasher.update(&m.len().to_le_bytes());
                    let t = m
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                    hasher.update(&t.map_or(0, |d| d.as_nanos()).to_le_bytes());
                }
                Err(_) => {}
            }
        }
    }
    json!({
        "repository": top.display().to_string(),
        "commit": commit,
        "dirty": changed > 0,
        "changed_files": changed,
        "untracked": untracked,
        "changes_blake3": (changed > 0).then(|| hasher.finalize().to_hex().to_string()),
    })
}

/// The recorded environment: each named variable's value (`null` when unset).
fn recorded_env(names: &[String]) -> BTreeMap<String, Value> {
    names
        .iter()
        .map(|n| {
            let v = std::env::var(n).ok().map_or(Value::Null, Value::String);
            (n.clone(), v)
        })
        .collect()
}

/// What the key of a command keeps of its values: every value but the temporary and
/// machine-specific paths. All of them, not only those the command line names: the command
/// also gets each as a `COIN_<NAME>` variable, so coin cannot know which it reads.
fn keyed_values(values: &Values) -> BTreeMap<String, String> {
    values
        .iter()
        .filter(|(n, _)| !UNKEYED.contains(&n.as_str()))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

/// The key of an external run: blake3 of the canonical JSON of `what` (an object naming the
/// run's inputs) with the command's keyed values, its code's commit and changes, and the
/// recorded environment added.
fn command_key(
    mut what: Value,
    values: &Values,
    code: &Value,
    env: &BTreeMap<String, Value>,
) -> Result<String, WorkflowError> {
    if let Some(o) = what.as_object_mut() {
        o.insert("values".into(), json!(keyed_values(values)));
        o.insert(
            "code".into(),
            json!({ "commit": code.get("commit"), "changes": code.get("changes_blake3") }),
        );
        o.insert("env".into(), json!(env));
    }
    Ok(blake3::hash(to_canonical_json(&what)?.as_bytes())
        .to_hex()
        .to_string())
}

/// The placeholders trainer and evaluator share: the task's names and images, the model's
/// paths and the repository root.
fn shared_values(cfg: &RunConfig, root: &Path, def: &TaskDef) -> Values {
    [
        ("task", def.name.clone()),
        ("coin_task", coin_task_name(def)),
        ("image_root", abs(&def.resolve(root, &def.image_root))),
        ("model_base", opt_path(cfg.base_dir(root))),
        ("vision_tower", opt_path(cfg.vision_tower_dir(root))),
        ("projector", opt_path(cfg.projector_file(root))),
        ("repo_root", abs(root)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The folder an external command runs in: `workdir` resolved against the repository root.
fn workdir(root: &Path, dir: &Path) -> PathBuf {
    if dir.as_os_str().is_empty() {
        root.to_path_buf()
    } else if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        root.join(dir)
    }
}

/// CoIN's spelling of a task (ScienceQA … OCRVQA) from its scorer; the task's own name when
/// its scorer is not one of CoIN's.
pub fn coin_task_name(def: &TaskDef) -> String {
    match def.scorer_kind() {
        Ok(k) => super::import::coin_dir_name(k).to_string(),
        Err(_) => def.name.clone(),
    }
}

fn abs(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

fn opt_path(p: Option<PathBuf>) -> String {
    p.map(|p| abs(&p)).unwrap_or_default()
}

/// The folder name a checkpoint gets when it is written for a command: CoIN's loader loads
/// an adapter only from a folder whose name holds `llava` and `lora` (`MOE` for MoELoRA), so
/// every layout gets CoIN's name, `<Task>_llava_lora` (`<Task>_llava_MOE_lora`).
fn dir_name(coin_task: &str, method: Method) -> String {
    let task = safe_name(coin_task);
    match method {
        Method::Lora => format!("{task}_llava_lora"),
        Method::Moelora => format!("{task}_llava_MOE_lora"),
    }
}

/// Write checkpoint `id` to `dir` (which must not exist) in `layout`.
pub fn materialize(
    repo: &CoinRepo,
    id: CheckpointId,
    dir: &Path,
    layout: CheckpointLayout,
) -> Result<(), WorkflowError> {
    let format = match layout {
        CheckpointLayout::Stored => {
            repo.checkout(id, dir)?;
            return Ok(());
        }
        CheckpointLayout::Peft => ExportFormat::Peft,
        CheckpointLayout::Coin => ExportFormat::Coin,
        CheckpointLayout::Safetensors => ExportFormat::Safetensors,
    };
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err("create", parent))?;
    let staging = tempfile::Builder::new()
        .prefix(".coin-stage-")
        .tempdir_in(parent)
        .map_err(io_err("create a temporary folder in", parent))?;
    let src = staging.path().join("checkpoint");
    repo.checkout(id, &src)?;
    let dst = staging.path().join("export");
    std::fs::create_dir(&dst).map_err(io_err("create", &dst))?;
    export_adapter(&src, &dst, format)?;
    std::fs::rename(&dst, dir).map_err(io_err("move the written checkpoint to", dir))?;
    Ok(())
}

/// `name` with every character but ASCII letters, digits, `.`, `-` and `_` replaced by `_`
/// (a folder or file name made from a task name).
fn safe_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        format!("_{s}")
    } else {
        s
    }
}

/// Remove `dir` when it exists.
fn clear(dir: &Path) -> Result<(), WorkflowError> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(dir).map_err(io_err("remove", dir)),
        Ok(_) => std::fs::remove_file(dir).map_err(io_err("remove", dir)),
        Err(_) => Ok(()),
    }
}

/// The files of a trainer's output folder that make the checkpoint, in this order.
pub const OUTPUT_FILES: &[&str] = &[
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "non_lora_trainables.safetensors",
    "non_lora_trainables.bin",
    "config.json",
    "trainer_state.json",
];

/// The checkpoint files in a trainer's output folder: regular files only (a symbolic link
/// is not followed), an adapter config and weights required.
pub fn output_files(dir: &Path) -> Result<(Vec<PathBuf>, Vec<String>), WorkflowError> {
    let meta = std::fs::symlink_metadata(dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            WorkflowError::Input(format!(
                "the trainer exited with status 0 but left no output folder '{}' (its command \
                 must write the adapter to {{output_dir}}, or set trainer.output to where it \
                 writes)",
                dir.display()
            ))
        } else {
            WorkflowError::Io {
                op: "read",
                path: dir.to_path_buf(),
                source: e,
            }
        }
    })?;
    if !meta.is_dir() {
        return Err(WorkflowError::Input(format!(
            "the trainer's output '{}' is not a folder (a symbolic link is not followed)",
            dir.display()
        )));
    }
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    for name in OUTPUT_FILES {
        let p = dir.join(name);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_file() => files.push(p),
            Ok(_) => skipped.push(format!(
                "'{}' is not a regular file (a symbolic link is not followed); left out",
                p.display()
            )),
            Err(_) => {}
        }
    }
    let has = |n: &str| files.iter().any(|p| p.file_name() == Some(n.as_ref()));
    if !has("adapter_config.json")
        || !(has("adapter_model.safetensors") || has("adapter_model.bin"))
    {
        return Err(WorkflowError::Input(format!(
            "the trainer exited with status 0 but '{}' holds no adapter (expected \
             adapter_config.json and adapter_model.safetensors or adapter_model.bin)",
            dir.display()
        )));
    }
    Ok((files, skipped))
}

/// Everything an external trainer step needs from `coin train`.
pub struct TrainerStep<'a> {
    /// The repository.
    pub repo: &'a CoinRepo,
    /// The resolved configuration.
    pub cfg: &'a RunConfig,
    /// The task.
    pub def: &'a TaskDef,
    /// The parent checkpoint, if any.
    pub parent: Option<&'a Checkpoint>,
    /// The training file.
    pub train_file: &'a Path,
    /// Its blake3 and record count.
    pub data: &'a crate::tasks::formats::DatasetIdentity,
}

/// A trainer step planned: its key and the values of its command.
pub struct PlannedStep {
    /// The training key.
    pub key: String,
    /// The placeholder values (the output and parent folders included).
    pub values: Values,
    /// The command line, filled in.
    pub command: String,
    /// The folder it runs in.
    pub workdir: PathBuf,
    /// The work folder under `.coin/tmp/external/`.
    pub work: PathBuf,
    /// The trainer code's git state.
    pub code: Value,
    /// The recorded environment.
    pub env: BTreeMap<String, Value>,
}

/// Plan a trainer step: fill in the command (paths under the work folder of its key) and
/// compute the training key (module docs).
pub fn plan_step(s: &TrainerStep<'_>) -> Result<PlannedStep, WorkflowError> {
    let cfg = s.cfg;
    let t = &cfg.trainer;
    let root = s.repo.root().to_path_buf();
    let coin_task = coin_task_name(s.def);
    let step = match s.parent {
        Some(p) => super::eval::trained_tasks(s.repo, p.id)?.len() + 1,
        None => 1,
    };
    let has_adapter = |cp: &Checkpoint| cp.manifest.files.contains_key("adapter_config.json");
    let parent_adapter = s.parent.filter(|cp| has_adapter(cp));
    let mut values = shared_values(cfg, &root, s.def);
    values.extend(
        [
            ("data", abs(s.train_file)),
            (
                "parent",
                parent_adapter.map(|p| p.id.to_string()).unwrap_or_default(),
            ),
            ("seed", cfg.train.seed.to_string()),
            ("step", step.to_string()),
            (
                "method",
                match cfg.train.method {
                    Method::Lora => "lora",
                    Method::Moelora => "moelora",
                }
                .to_string(),
            ),
            ("learning_rate", cfg.train.learning_rate.to_string()),
            ("epochs", cfg.train.num_train_epochs.to_string()),
            ("lora_r", cfg.train.lora_r.to_string()),
            ("lora_alpha", cfg.train.lora_alpha.to_string()),
            ("expert_num", cfg.train.expert_num.to_string()),
            ("batch_size", cfg.train_batch_size(&s.def.name).to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v)),
    );
    // The folders come after the key (they are named by it); their names are fixed here.
    values.insert("parent_dir".into(), String::new());
    values.insert("output_dir".into(), String::new());
    render(&t.command, &values, true, "trainer.command")?;
    let output_template = if t.output.trim().is_empty() {
        "{output_dir}"
    } else {
        t.output.as_str()
    };
    render(output_template, &values, false, "trainer.output")?;
    let dir = workdir(&root, &t.workdir);
    let code = code_state(&dir, &s.repo.coin_dir());
    let env = recorded_env(&t.env);
    let key = command_key(
        json!({
            "format": EXTERNAL_KEY_FORMAT,
            "parent": s.parent.map(|p| p.id.to_string()),
            "task": s.def.name,
            "data": { "blake3": s.data.blake3, "items": s.data.items },
            "template": s.def.template,
            "base_model": cfg.model.name,
            "trainer": {
                "command": t.command,
                "workdir": t.workdir.display().to_string(),
                "parent_format": t.parent_format,
                "output": t.output,
            },
        }),
        &values,
        &code,
        &env,
    )?;
    let work = s
        .repo
        .coin_dir()
        .join("tmp")
        .join("external")
        .join(&key[..16]);
    let name = dir_name(&coin_task, cfg.train.method);
    if let Some(p) = parent_adapter {
        let parent_name = match p.train.as_ref() {
            Some(tr) => {
                let reg = Registry::load(&s.repo.coin_dir().join("tasks"))?;
                let ct = find_task(&reg, &tr.task)
                    .map(coin_task_name)
                    .unwrap_or_else(|_| tr.task.clone());
                dir_name(&ct, cfg.train.method)
            }
            None => format!("parent-{}", p.id.short()),
        };
        values.insert(
            "parent_dir".into(),
            abs(&work.join("parent").join(parent_name)),
        );
    }
    values.insert("output_dir".into(), abs(&work.join("out").join(name)));
    let (command, _) = render(&t.command, &values, true, "trainer.command")?;
    Ok(PlannedStep {
        key,
        values,
        command,
        workdir: dir,
        work,
        code,
        env,
    })
}

/// The environment a command gets: every placeholder as `COIN_<NAME>`.
fn command_env(values: &Values) -> Vec<(String, String)> {
    values
        .iter()
        .map(|(k, v)| (format!("COIN_{}", k.to_uppercase()), v.clone()))
        .collect()
}

/// What a finished trainer step leaves for the commit.
pub struct TrainedStep {
    /// The files to commit.
    pub files: Vec<PathBuf>,
    /// The `external` field of the train record.
    pub record: Value,
    /// The log's bytes (kept in the checkpoint's tree).
    pub log: Vec<u8>,
    /// Notes for the user (files left out).
    pub notes: Vec<String>,
}

/// Run a planned trainer step: write the parent, run the command, find its output.
pub fn run_step(
    s: &TrainerStep<'_>,
    p: &PlannedStep,
    progress: &mut dyn CommandProgress,
) -> Result<TrainedStep, WorkflowError> {
    let t = &s.cfg.trainer;
    std::fs::create_dir_all(&p.work).map_err(io_err("create", &p.work))?;
    let parent_dir = &p.values["parent_dir"];
    if !parent_dir.is_empty() {
        let dir = PathBuf::from(parent_dir);
        clear(&dir)?;
        let parent = s
            .parent
            .ok_or_else(|| WorkflowError::Input("a parent folder without a parent".into()))?;
        materialize(s.repo, parent.id, &dir, t.parent_format)?;
    }
    let out = PathBuf::from(&p.values["output_dir"]);
    if let Some(up) = out.parent() {
        std::fs::create_dir_all(up).map_err(io_err("create", up))?;
    }
    let log = p.work.join("train.log");
    let what = format!("train {}", s.def.name);
    let run = run_command(
        &what,
        &p.command,
        &p.workdir,
        &command_env(&p.values),
        &log,
        progress,
    )?;
    if !run.exit.ok() {
        return Err(failed(&format!("the trainer of {}", s.def.name), &run));
    }
    let output = if t.output.trim().is_empty() {
        out.clone()
    } else {
        let (o, _) = render(&t.output, &p.values, false, "trainer.output")?;
        let o = PathBuf::from(o);
        if o.is_absolute() {
            o
        } else {
            p.workdir.join(o)
        }
    };
    let (files, notes) = output_files(&output)?;
    let (log_bytes, log_len) = read_tail(&log, crate::history::MAX_ATTACHMENT_BYTES)?;
    let truncated = log_len > log_bytes.len() as u64;
    let record = run_record(
        &run,
        &t.command,
        &p.env,
        &p.code,
        json!({
            "kind": "trainer",
            "output": abs(&output),
            "parent_format": t.parent_format,
            "log": {
                "bytes": log_len,
                "truncated": truncated,
                "attachment": LOG_ATTACHMENT,
            },
        }),
    );
    Ok(TrainedStep {
        files,
        record,
        log: log_bytes,
        notes,
    })
}

/// Evaluate checkpoint `id` on `tasks` (empty: the tasks trained on its history) with the
/// external evaluator (module docs): per task, unless an identical run's record is attached
/// (and not `force`), write the checkpoint for the command (once), run it, score its answer
/// file and attach the record.
pub fn evaluate_external(
    repo: &CoinRepo,
    id: CheckpointId,
    tasks: &[String],
    cfg: &RunConfig,
    force: bool,
    progress: &mut dyn CommandProgress,
) -> Result<Vec<TaskEval>, WorkflowError> {
    let e = &cfg.evaluator;
    let tasks = if tasks.is_empty() {
        let t = super::eval::trained_tasks(repo, id)?;
        if t.is_empty() {
            return Err(WorkflowError::Input(format!(
                "checkpoint {} has no trained task on its history; name the tasks with --tasks",
                id.short()
            )));
        }
        t
    } else {
        tasks.to_vec()
    };
    let root = repo.root().to_path_buf();
    let cp = repo.read_checkpoint(id)?;
    let reg = Registry::load(&repo.coin_dir().join("tasks"))?;
    let trained = cp
        .train
        .as_ref()
        .map(|t| t.task.clone())
        .unwrap_or_default();
    let trained_coin = find_task(&reg, &trained)
        .map(coin_task_name)
        .unwrap_or_else(|_| trained.clone());
    let dir = workdir(&root, &e.workdir);
    let code = code_state(&dir, &repo.coin_dir());
    let env = recorded_env(&e.env);
    let work = repo
        .coin_dir()
        .join("tmp")
        .join("external")
        .join(format!("eval-{}", &id.to_string()[..16]));
    let ckpt_name = dir_name(
        if trained.is_empty() {
            "checkpoint"
        } else {
            &trained_coin
        },
        cfg.train.method,
    );
    let _lock = lock_work(&work)?;
    let ckpt_dir = work.join("checkpoint").join(ckpt_name);
    let results = work.join("results");
    let mut written = false;
    let mut out = Vec::new();
    for task in &tasks {
        let def = find_task(&reg, task)?.clone();
        let test = def.resolve(&root, &def.test);
        let stage = if def.name == trained {
            "Finetune".to_string()
        } else {
            trained_coin.clone()
        };
        let mut values = shared_values(cfg, &root, &def);
        values.extend(
            [
                ("stage", stage),
                ("checkpoint_dir", abs(&ckpt_dir)),
                ("checkpoint", id.to_string()),
                ("trained_task", trained.clone()),
                ("results_dir", abs(&results)),
                ("test", abs(&test)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
        );
        let (command, _) = render(&e.command, &values, true, "evaluator.command")?;
        let (answers, _) = render(&e.answers, &values, false, "evaluator.answers")?;
        let test_id = crate::tasks::formats::dataset_identity(&test)?;
        let key = command_key(
            json!({
                "format": EVALUATOR_KEY_FORMAT,
                "checkpoint": id.to_string(),
                "task": def.name,
                "test": { "blake3": test_id.blake3, "items": test_id.items },
                "evaluator": {
                    "command": e.command,
                    "workdir": e.workdir.display().to_string(),
                    "checkpoint_format": e.checkpoint_format,
                    "answers": e.answers,
                },
            }),
            &values,
            &code,
            &env,
        )?;
        if let Some((rec, _)) = cp.evals.get(&def.name).filter(|_| !force) {
            if rec
                .extra
                .get(EVALUATOR_FIELD)
                .and_then(|v| v.get("key"))
                .and_then(Value::as_str)
                == Some(key.as_str())
            {
                out.push(TaskEval {
                    task: def.name.clone(),
                    record: rec.clone(),
                    status: TaskStatus::Cached,
                });
                continue;
            }
        }
        if !written {
            clear(&ckpt_dir)?;
            materialize(repo, id, &ckpt_dir, e.checkpoint_format)?;
            written = true;
        }
        let answers_path = {
            let a = PathBuf::from(&answers);
            if a.is_absolute() {
                a
            } else {
                dir.join(a)
            }
        };
        // A stale answer file from an earlier run must not be scored as this run's.
        clear(&answers_path)?;
        let logs = work.join("logs");
        std::fs::create_dir_all(&logs).map_err(io_err("create", &logs))?;
        let log = logs.join(format!("{}.log", safe_name(&def.name)));
        let what = format!("eval {} on {}", id.short(), def.name);
        let run = run_command(&what, &command, &dir, &command_env(&values), &log, progress)?;
        if !run.exit.ok() {
            return Err(failed(&format!("the evaluator of {}", def.name), &run));
        }
        if !std::fs::symlink_metadata(&answers_path).is_ok_and(|m| m.is_file()) {
            return Err(WorkflowError::Input(format!(
                "the evaluator of {} exited with status 0 but left no answer file '{}' (set \
                 evaluator.answers to where it writes; the log is '{}')",
                def.name,
                answers_path.display(),
                log.display()
            )));
        }
        let tail = last_lines(&file_tail(&log, TAIL_BYTES), 20);
        let mut extra = BTreeMap::new();
        extra.insert(
            EVALUATOR_FIELD.to_string(),
            run_record(
                &run,
                &e.command,
                &env,
                &code,
                json!({
                    "key": key,
                    "answers": abs(&answers_path),
                    "checkpoint_format": e.checkpoint_format,
                    "log_tail": tail,
                }),
            ),
        );
        out.push(score_answer_file(
            repo,
            id,
            &def.name,
            &answers_path,
            cfg,
            None,
            extra,
        )?);
    }
    // The answers and logs are in the records now.
    let _ = std::fs::remove_dir_all(&work);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(pairs: &[(&str, &str)]) -> Values {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn placeholders_are_filled_quoted_and_collected() {
        let v = vals(&[
            ("task", "mini-GQA"),
            ("data", "/a b/it's.json"),
            ("seed", "3"),
        ]);
        let (s, used) = render("run --data {data} --seed {seed} {{x}}", &v, true, "t").unwrap();
        // The shell reads each value back as one word, unchanged.
        assert_eq!(
            shlex::split(&s).unwrap(),
            ["run", "--data", "/a b/it's.json", "--seed", "3", "{x}"]
        );
        assert_eq!(
            used.into_iter().collect::<Vec<_>>(),
            vec!["data".to_string(), "seed".to_string()]
        );
        let (s, _) = render("{task}/{task}.jsonl", &v, false, "t").unwrap();
        assert_eq!(s, "mini-GQA/mini-GQA.jsonl");
        // Values that would run code stay one word, and the shell runs nothing of them.
        let dir = tempfile::tempdir().unwrap();
        let evil = vals(&[("task", "$(touch x); `touch y`; touch z")]);
        let (s, _) = render("printf %s {task}", &evil, true, "t").unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&s)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "$(touch x); `touch y`; touch z"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn unknown_and_unbalanced_placeholders_are_named() {
        let v = vals(&[("task", "x")]);
        let e = render("a {tsk}", &v, true, "trainer.command")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown placeholder '{tsk}'") && e.contains("{task}"),
            "{e}"
        );
        let e = render("a {task", &v, true, "w").unwrap_err().to_string();
        assert!(e.contains("without"), "{e}");
        let e = render("a }", &v, true, "w").unwrap_err().to_string();
        assert!(e.contains("lone"), "{e}");
        let nul = vals(&[("task", "a\0b")]);
        assert!(render("{task}", &nul, true, "w").is_err());
    }

    #[test]
    fn one_process_per_work_folder_and_logs_read_from_their_end() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("tmp/external/abc");
        let held = lock_work(&work).unwrap();
        let e = lock_work(&work).unwrap_err().to_string();
        assert!(
            e.contains("another coin process") && e.contains("abc.lock"),
            "{e}"
        );
        drop(held);
        lock_work(&work).unwrap();
        let log = dir.path().join("log");
        crate::store::fsutil::write_atomic(&log, b"0123456789").unwrap();
        assert_eq!(read_tail(&log, 4).unwrap(), (b"6789".to_vec(), 10));
        assert_eq!(read_tail(&log, 64).unwrap(), (b"0123456789".to_vec(), 10));
    }

    #[test]
    fn the_last_line_skips_blank_lines_and_carriage_returns() {
        assert_eq!(last_line("a\nstep 1\r step 2 \n\n"), " step 2");
        assert_eq!(last_line(""), "");
        assert_eq!(last_lines("1\n2\n3\n", 2), "2\n3");
    }

    #[test]
    fn commands_report_status_signals_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let env = vec![("COIN_TASK".to_string(), "t1".to_string())];
        let mut p = NoCommandProgress;
        let run = run_command(
            "x",
            "echo out $COIN_TASK; echo err >&2; exit 3",
            dir.path(),
            &env,
            &log,
            &mut p,
        )
        .unwrap();
        assert_eq!(run.exit, Exit::Code(3));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("out t1") && text.contains("err"), "{text}");
        let run = run_command("x", "kill -9 $$", dir.path(), &[], &log, &mut p).unwrap();
        assert_eq!(run.exit, Exit::Signal(9));
        assert!(!run.exit.ok());
        let e = run_command("x", "true", &dir.path().join("nope"), &[], &log, &mut p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn code_state_sees_commits_and_edits_but_not_the_coin_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert_eq!(code_state(root, &root.join(".coin")), Value::Null);
        let repo = git2::Repository::init(root).unwrap();
        std::fs::create_dir_all(root.join(".coin")).unwrap();
        crate::store::fsutil::write_atomic(root.join("train.sh"), "echo 1\n").unwrap();
        let mut index = repo.index().unwrap();
        index.add_path(Path::new("train.sh")).unwrap();
        index.write().unwrap();
        let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("t", "t@example.com").unwrap();
        let c = repo
            .commit(Some("HEAD"), &sig, &sig, "one", &tree, &[])
            .unwrap();
        let clean = code_state(root, &root.join(".coin"));
        assert_eq!(clean["commit"], c.to_string());
        assert_eq!(clean["dirty"], false);
        // Files under coin's folder do not make it dirty.
        crate::store::fsutil::write_atomic(root.join(".coin/x"), "y").unwrap();
        assert_eq!(code_state(root, &root.join(".coin"))["dirty"], false);
        // Untracked files are counted, not keyed.
        crate::store::fsutil::write_atomic(root.join("notes.txt"), "n").unwrap();
        let untracked = code_state(root, &root.join(".coin"));
        assert_eq!(untracked["dirty"], false);
        assert_eq!(untracked["untracked"], 1);
        assert_eq!(untracked["changes_blake3"], Value::Null);
        crate::store::fsutil::write_atomic(root.join("train.sh"), "echo 2\n").unwrap();
        let one = code_state(root, &root.join(".coin"));
        assert_eq!(one["dirty"], true);
        crate::store::fsutil::write_atomic(root.join("train.sh"), "echo 3\n").unwrap();
        let two = code_state(root, &root.join(".coin"));
        assert_ne!(one["changes_blake3"], two["changes_blake3"]);
    }

    #[test]
    fn output_folders_need_an_adapter_and_links_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let e = output_files(&out).unwrap_err().to_string();
        assert!(e.contains("left no output folder"), "{e}");
        std::fs::create_dir(&out).unwrap();
        crate::store::fsutil::write_atomic(out.join("adapter_config.json"), "{}").unwrap();
        let e = output_files(&out).unwrap_err().to_string();
        assert!(e.contains("holds no adapter"), "{e}");
        crate::store::fsutil::write_atomic(dir.path().join("secret"), "x").unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.path().join("secret"), out.join("config.json")).unwrap();
        }
        crate::store::fsutil::write_atomic(out.join("adapter_model.bin"), "x").unwrap();
        crate::store::fsutil::write_atomic(out.join("other.txt"), "x").unwrap();
        let (files, notes) = output_files(&out).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["adapter_config.json", "adapter_model.bin"]);
        #[cfg(unix)]
        assert!(notes[0].contains("config.json"), "{notes:?}");
    }
}
