//! coin's own events (`.coin/hooks/<event>`) and the `[gates]` settings they get.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::store::fsutil;

use super::super::repo::CoinRepo;
use super::super::HistoryError;
use super::{coin_exe, is_executable, set_mode, shipped_hooks, HookContext, HookOutcome};

/// The `[gates]` table of `.coin/config.toml`: the one parser of that table, used by
/// [`CoinRepo::gates_config`] and by the run configuration (which refuses a broken table the
/// same way before any work).
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatesConfig {
    /// `max_forgetting`: the largest drop (points) the sample gate lets through.
    #[serde(default)]
    pub max_forgetting: Option<f64>,
}

impl GatesConfig {
    /// Parse and check the value of the `[gates]` table; the error says what is wrong, in
    /// words (the caller names the file).
    pub fn from_value(value: toml::Value) -> Result<GatesConfig, String> {
        if !value.is_table() {
            return Err("it is not a table".into());
        }
        let gates: GatesConfig = value.try_into().map_err(|e: toml::de::Error| {
            format!(
                "{} (the key is max_forgetting, a number of points >= 0)",
                e.message()
            )
        })?;
        match gates.max_forgetting {
            Some(x) if !(x.is_finite() && x >= 0.0) => {
                Err("max_forgetting must be a number of points >= 0".into())
            }
            _ => Ok(gates),
        }
    }
}

impl CoinRepo {
    /// `.coin/hooks/`.
    pub fn event_hooks_dir(&self) -> PathBuf {
        self.coin_dir().join("hooks")
    }

    /// The `[gates]` table of `.coin/config.toml` (absent file or table: no gates).
    pub fn gates_config(&self) -> Result<GatesConfig, HistoryError> {
        let path = self.coin_dir().join("config.toml");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(GatesConfig::default()),
            Err(e) => return Err(HistoryError::io("read", &path)(e)),
        };
        let table: toml::Table = toml::from_str(&text).map_err(|e| HistoryError::Config {
            what: format!("configuration '{}'", path.display()),
            message: e.to_string(),
        })?;
        let Some(gates) = table.get("gates") else {
            return Ok(GatesConfig::default());
        };
        GatesConfig::from_value(gates.clone()).map_err(|message| HistoryError::Config {
            what: format!("[gates] in '{}'", path.display()),
            message,
        })
    }

    /// Run coin event hook `event` (see the module docs for the contract). `Ok(None)` when no
    /// hook is installed for it. The hook's output is captured, never printed.
    pub fn run_event(
        &self,
        event: &str,
        ctx: &HookContext,
    ) -> Result<Option<HookOutcome>, HistoryError> {
        let path = self.event_hooks_dir().join(event);
        if !is_executable(&path) {
            return Ok(None);
        }
        let gates = self.gates_config()?;
        let mut cmd = Command::new(&path);
        if let Some(c) = ctx.checkpoint {
            cmd.arg(c.to_string());
        }
        cmd.args(&ctx.extra_args)
            .current_dir(self.root())
            .stdin(Stdio::null())
            .env("COIN_EVENT", event)
            .env("COIN_REPO", self.root())
            .env("COIN_DIR", self.coin_dir())
            .env(
                "COIN_CHECKPOINT",
                ctx.checkpoint.map(|c| c.to_string()).unwrap_or_default(),
            )
            .env(
                "COIN_PARENT",
                ctx.parent.map(|c| c.to_string()).unwrap_or_default(),
            )
            .env("COIN_BRANCH", ctx.branch.clone().unwrap_or_default())
            .env("COIN_TASK", ctx.task.clone().unwrap_or_default())
            .env_remove("COIN_MAX_FORGETTING");
        if let Some(x) = gates.max_forgetting {
            cmd.env("COIN_MAX_FORGETTING", x.to_string());
        }
        if let Some(exe) = coin_exe() {
            cmd.env("COIN_EXE", exe);
        }
        let start = Instant::now();
        let out = cmd
            .output()
            .map_err(HistoryError::io(format!("run the {event} hook"), &path))?;
        Ok(Some(HookOutcome {
            event: event.to_string(),
            path,
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        }))
    }

    /// Copy the shipped coin event hooks (`hooks/coin/`, or `from` when given) into
    /// `.coin/hooks/`; existing files are kept. Returns the files written.
    pub fn install_event_hooks(&self, from: Option<&Path>) -> Result<Vec<String>, HistoryError> {
        let dir = self.event_hooks_dir();
        std::fs::create_dir_all(&dir).map_err(HistoryError::io("create directory", &dir))?;
        let files: Vec<(String, Vec<u8>)> = match from {
            Some(src) => {
                let mut v = Vec::new();
                for e in std::fs::read_dir(src).map_err(HistoryError::io("read directory", src))? {
                    let e = e.map_err(HistoryError::io("read directory", src))?;
                    let p = e.path();
                    if p.is_file() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let bytes = std::fs::read(&p).map_err(HistoryError::io("read", &p))?;
                        v.push((name, bytes));
                    }
                }
                v
            }
            None => shipped_hooks("coin")
                .into_iter()
                .map(|(n, b)| (n, b.to_vec()))
                .collect(),
        };
        let mut written = Vec::new();
        for (name, bytes) in files {
            let dest = dir.join(&name);
            if dest.exists() {
                continue;
            }
            fsutil::write_atomic(&dest, &bytes).map_err(HistoryError::io("write", &dest))?;
            set_mode(&dest, 0o755)?;
            written.push(name);
        }
        Ok(written)
    }
}
