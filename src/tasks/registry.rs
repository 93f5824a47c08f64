//! The task registry and the instruction templates.
//!
//! A repository's tasks live in `.coin/tasks/<name>.toml` (copied from `templates/tasks/` by
//! `coin init`, added by `coin task add`). Instruction templates live in
//! `templates/instructions/{original,diverse,10type}.toml` and are compiled into the binary;
//! a repository may override them in `.coin/instructions/`. Formats: docs/tasks.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::formats::{Qid, TestRecord, TrainRecord, Turn};
use super::scoring::{ScoreMode, ScorerKind};
use super::TaskError;

/// One task definition (`.coin/tasks/<name>.toml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskDef {
    /// The task's name, as shown in reports.
    pub name: String,
    /// Other accepted spellings (matched like names: case, `-`, `_` and spaces ignored).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Whether this is one of CoIN's eight tasks (scoring defaults to compat; else strict).
    #[serde(default)]
    pub coin: bool,
    /// The scorer: one of the eight CoIN scorers, by name.
    pub scorer: String,
    /// The instruction template (a key of the `[tasks]` table of the instruction files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The folder relative paths are resolved against (relative: to the repository root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_root: Option<String>,
    /// The training file (CoIN train.json).
    pub train: String,
    /// The evaluation file (CoIN test.json / val.json).
    pub test: String,
    /// The folder image paths are relative to.
    pub image_root: String,
    /// What the scorer needs besides the test file, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

fn name_key(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '-' | '_' | ' '))
        .flat_map(char::to_lowercase)
        .collect()
}

impl TaskDef {
    /// Parse a definition from TOML text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, TaskError> {
        let def: TaskDef = toml::from_str(text).map_err(|e| TaskError::Format {
            path: path.to_path_buf(),
            what: "task definition",
            message: e.to_string(),
        })?;
        def.validate().map_err(|message| TaskError::Format {
            path: path.to_path_buf(),
            what: "task definition",
            message,
        })?;
        Ok(def)
    }

    /// Check the name and the scorer.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "task name '{}' must be non-empty ASCII letters, digits, '-', '_' or '.'",
                self.name
            ));
        }
        if ScorerKind::from_name(&self.scorer).is_none() {
            return Err(format!(
                "unknown scorer '{}' (one of {})",
                self.scorer,
                ScorerKind::ALL.map(|k| k.name()).join(", ")
            ));
        }
        Ok(())
    }

    /// The TOML text of this definition.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a TaskDef always serialises to TOML")
    }

    /// Whether `name` names this task.
    pub fn matches(&self, name: &str) -> bool {
        let k = name_key(name);
        name_key(&self.name) == k || self.aliases.iter().any(|a| name_key(a) == k)
    }

    /// The scorer.
    pub fn scorer_kind(&self) -> Result<ScorerKind, TaskError> {
        ScorerKind::from_name(&self.scorer).ok_or_else(|| {
            TaskError::Registry(format!(
                "task {}: unknown scorer '{}'",
                self.name, self.scorer
            ))
        })
    }

    /// compat for CoIN's own tasks, strict for every other task.
    pub fn default_mode(&self) -> ScoreMode {
        if self.coin {
            ScoreMode::Compat
        } else {
            ScoreMode::Strict
        }
    }

    /// Resolve one of the task's paths against the data root and the repository root.
    pub fn resolve(&self, repo_root: &Path, p: &str) -> PathBuf {
        let data_root = match &self.data_root {
            Some(d) => repo_root.join(d),
            None => repo_root.to_path_buf(),
        };
        data_root.join(p)
    }
}

/// What [`check_task`] found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TaskCheck {
    /// Training records (each conversation checked).
    pub train_items: usize,
    /// Test records.
    pub test_items: usize,
    /// Images referenced by both files, and how many are missing.
    pub images: super::formats::ImageCheck,
}

/// Read a task's train and test files with coin's readers (streaming the train file), check
/// every conversation, refuse image paths that escape the image root, and list missing images.
/// Call it before any work starts; `TaskCheck::images.missing > 0` means some are absent.
pub fn check_task(def: &TaskDef, repo_root: &Path) -> Result<TaskCheck, TaskError> {
    let train = def.resolve(repo_root, &def.train);
    let mut images: Vec<String> = Vec::new();
    let train_items = super::formats::for_each_in_file(&train, |index, r: TrainRecord| {
        r.validate().map_err(|message| TaskError::Record {
            path: train.clone(),
            index,
            message,
        })?;
        images.extend(r.image);
        Ok(())
    })?;
    let test = super::formats::read_test_file(&def.resolve(repo_root, &def.test))?;
    images.extend(test.iter().filter_map(|r| r.image.clone()));
    let root = def.resolve(repo_root, &def.image_root);
    let images = super::formats::check_images(&root, images.iter().map(String::as_str))?;
    Ok(TaskCheck {
        train_items,
        test_items: test.len(),
        images,
    })
}

/// Score answers for a registered task: reads its test file and (where the scorer uses them)
/// its annotations, and scores in `mode` or the task's default mode. The report names the
/// task and the mode; store both with any eval record.
pub fn score_task(
    def: &TaskDef,
    repo_root: &Path,
    answers: &[super::formats::AnswerRecord],
    mode: Option<ScoreMode>,
) -> Result<super::scoring::ScoreReport, TaskError> {
    let kind = def.scorer_kind()?;
    let questions = super::formats::read_test_file(&def.resolve(repo_root, &def.test))?;
    let annotations = match (&def.annotations, kind.annotations_hint()) {
        (Some(a), Some(_)) => Some(super::scoring::load_annotations(
            kind,
            &def.resolve(repo_root, a),
        )?),
        _ => None,
    };
    let mut report = super::scoring::score(
        kind,
        mode.unwrap_or_else(|| def.default_mode()),
        super::scoring::ScoreInput {
            questions: &questions,
            answers,
            annotations: annotations.as_ref(),
        },
    )?;
    report.task = def.name.clone();
    Ok(report)
}

/// The tasks of a repository.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    /// `.coin/tasks`.
    pub dir: PathBuf,
    /// The definitions, sorted by file name.
    pub tasks: Vec<TaskDef>,
}

/// The `.coin/tasks` folder of the repository containing `start` (searching upward for `.coin`).
pub fn find_registry_dir(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|d| d.join(".coin").is_dir())
        .map(|d| d.join(".coin").join("tasks"))
}

impl Registry {
    /// Load every `*.toml` in `dir` (a missing folder is an empty registry).
    pub fn load(dir: &Path) -> Result<Self, TaskError> {
        let mut tasks = Vec::new();
        if dir.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| TaskError::io("list", dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect();
            files.sort();
            for f in files {
                let text = std::fs::read_to_string(&f).map_err(|e| TaskError::io("read", &f, e))?;
                tasks.push(TaskDef::parse(&text, &f)?);
            }
        }
        Ok(Registry {
            dir: dir.to_path_buf(),
            tasks,
        })
    }

    /// The repository root (the folder holding `.coin`).
    pub fn repo_root(&self) -> PathBuf {
        self.dir
            .parent()
            .and_then(Path::parent)
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    }

    /// A task by name or alias.
    pub fn get(&self, name: &str) -> Option<&TaskDef> {
        self.tasks.iter().find(|t| t.matches(name))
    }

    /// Write a new definition to `<dir>/<name>.toml`; refuses to replace one unless `force`,
    /// and refuses a name or alias that another task already answers to.
    pub fn add(&mut self, def: TaskDef, force: bool) -> Result<PathBuf, TaskError> {
        def.validate().map_err(TaskError::Registry)?;
        for other in &self.tasks {
            let clash = std::iter::once(&def.name)
                .chain(&def.aliases)
                .any(|n| other.matches(n));
            if clash && !(force && name_key(&other.name) == name_key(&def.name)) {
                return Err(TaskError::Registry(format!(
                    "a task named '{}' is already registered{}",
                    other.name,
                    if name_key(&other.name) == name_key(&def.name) {
                        " (use --force to replace it)"
                    } else {
                        ""
                    }
                )));
            }
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| TaskError::io("create the folder", &self.dir, e))?;
        let path = self.dir.join(format!("{}.toml", def.name));
        crate::store::fsutil::write_atomic(&path, def.to_toml())
            .map_err(|e| TaskError::io("write", &path, e))?;
        self.tasks
            .retain(|t| name_key(&t.name) != name_key(&def.name));
        self.tasks.push(def);
        Ok(path)
    }
}

/// The instruction template of one task in one style.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskTemplate {
    /// How a question and an instruction make the prompt; the instruction must be last.
    #[serde(default = "default_layout")]
    pub layout: String,
    /// The instruction strings.
    pub instructions: Vec<String>,
    /// Whether the strings were checked against CoIN's files (inherits the file's flag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn default_layout() -> String {
    "{question}\n{instruction}".to_string()
}

/// One instruction file: a style (Original, Diverse, 10Type) with a template per task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstructionSet {
    /// The style name.
    pub style: String,
    /// CoIN's older name for it (Type1, Type2, Type3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aka: Option<String>,
    /// Whether the strings were checked against CoIN's published files.
    pub verified: bool,
    /// Templates by task template name.
    pub tasks: BTreeMap<String, TaskTemplate>,
}

/// The instruction files shipped in templates/instructions, by file stem.
pub const BUILTIN_INSTRUCTIONS: [(&str, &str); 3] = [
    (
        "original",
        include_str!("../../templates/instructions/original.toml"),
    ),
    (
        "diverse",
        include_str!("../../templates/instructions/diverse.toml"),
    ),
    (
        "10type",
        include_str!("../../templates/instructions/10type.toml"),
    ),
];

/// The CoIN task definitions shipped in templates/tasks, by file name.
pub const BUILTIN_TASKS: [(&str, &str); 8] = [
    (
        "ScienceQA.toml",
        include_str!("../../templates/tasks/ScienceQA.toml"),
    ),
    (
        "TextVQA.toml",
        include_str!("../../templates/tasks/TextVQA.toml"),
    ),
    (
        "ImageNet.toml",
        include_str!("../../templates/tasks/ImageNet.toml"),
    ),
    ("GQA.toml", include_str!("../../templates/tasks/GQA.toml")),
    (
        "VizWiz.toml",
        include_str!("../../templates/tasks/VizWiz.toml"),
    ),
    (
        "Grounding.toml",
        include_str!("../../templates/tasks/Grounding.toml"),
    ),
    (
        "VQAv2.toml",
        include_str!("../../templates/tasks/VQAv2.toml"),
    ),
    (
        "OCR-VQA.toml",
        include_str!("../../templates/tasks/OCR-VQA.toml"),
    ),
];

impl InstructionSet {
    /// Parse an instruction file.
    pub fn parse(text: &str, path: &Path) -> Result<Self, TaskError> {
        let set: InstructionSet = toml::from_str(text).map_err(|e| TaskError::Format {
            path: path.to_path_buf(),
            what: "instruction template file",
            message: e.to_string(),
        })?;
        for (task, t) in &set.tasks {
            let bad = |m: &str| TaskError::Format {
                path: path.to_path_buf(),
                what: "instruction template file",
                message: format!("task {task}: {m}"),
            };
            if t.instructions.is_empty() {
                return Err(bad("no instructions"));
            }
            if !t.layout.ends_with("{instruction}") || !t.layout.contains("{question}") {
                return Err(bad(
                    "the layout must contain {question} and end with {instruction}",
                ));
            }
            if t.instructions
                .iter()
                .any(|i| i.contains('\n') || i.is_empty())
            {
                return Err(bad("an instruction must be one non-empty line"));
            }
        }
        Ok(set)
    }

    /// A shipped style by name (`original`/`type1`, `diverse`/`type2`, `10type`/`type3`).
    pub fn builtin(style: &str) -> Result<Self, TaskError> {
        let key = match name_key(style).as_str() {
            "original" | "origin" | "type1" => "original",
            "diverse" | "type2" => "diverse",
            "10type" | "type3" => "10type",
            _ => {
                return Err(TaskError::Registry(format!(
                    "unknown instruction style '{style}' (original, diverse or 10type)"
                )))
            }
        };
        let (_, text) = BUILTIN_INSTRUCTIONS
            .iter()
            .find(|(k, _)| *k == key)
            .expect("every key above is shipped");
        Self::parse(
            text,
            Path::new(&format!("templates/instructions/{key}.toml")),
        )
    }

    /// The template of a task (matched like task names).
    pub fn task(&self, template: &str) -> Result<&TaskTemplate, TaskError> {
        let k = name_key(template);
        self.tasks
            .iter()
            .find(|(name, _)| name_key(name) == k)
            .map(|(_, t)| t)
            .ok_or_else(|| {
                TaskError::Registry(format!(
                    "the {} instructions have no template '{template}'",
                    self.style
                ))
            })
    }
}

/// A task item before a template is applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RawItem {
    /// The id (train `id`, test `question_id`).
    pub id: String,
    /// The image path relative to the image root.
    pub image: Option<String>,
    /// The question (may span several lines, e.g. ScienceQA's options).
    pub question: String,
    /// The answer (Grounding: the box string).
    pub answer: String,
}

impl TaskTemplate {
    /// The instruction item `id` gets: `instructions[blake3(id) % len]`.
    pub fn instruction_for(&self, id: &str) -> &str {
        let h = blake3::hash(id.as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&h.as_bytes()[..8]);
        let i = (u64::from_le_bytes(b) % self.instructions.len() as u64) as usize;
        &self.instructions[i]
    }

    /// The prompt text (question + instruction, instruction last).
    pub fn prompt(&self, item: &RawItem) -> String {
        self.layout
            .replace("{question}", &item.question)
            .replace("{instruction}", self.instruction_for(&item.id))
    }

    /// The CoIN train record of an item.
    pub fn train_record(&self, item: &RawItem) -> TrainRecord {
        let prompt = self.prompt(item);
        let human = if item.image.is_some() {
            format!("<image>\n{prompt}")
        } else {
            prompt
        };
        TrainRecord {
            id: Qid::text(item.id.clone()),
            image: item.image.clone(),
            conversations: vec![
                Turn {
                    from: "human".into(),
                    value: human,
                },
                Turn {
                    from: "gpt".into(),
                    value: item.answer.clone(),
                },
            ],
        }
    }

    /// The CoIN test record of an item (`answer`; Grounding callers set `answer_bbox`/`size`).
    pub fn test_record(&self, item: &RawItem) -> TestRecord {
        TestRecord {
            question_id: Qid::text(item.id.clone()),
            image: item.image.clone(),
            text: self.prompt(item),
            answer: Some(item.answer.clone()),
            answer_bbox: None,
            size: None,
            answers: None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    #[test]
    fn shipped_task_definitions_parse_and_cover_the_eight_scorers() {
        let mut kinds = Vec::new();
        for (file, text) in BUILTIN_TASKS {
            let def = TaskDef::parse(text, Path::new(file)).unwrap();
            assert!(def.coin);
            assert_eq!(def.default_mode(), ScoreMode::Compat);
            kinds.push(def.scorer_kind().unwrap());
            let set = InstructionSet::builtin("original").unwrap();
            set.task(def.template.as_deref().unwrap()).unwrap();
        }
        assert_eq!(kinds, ScorerKind::ALL.to_vec());
    }

    #[test]
    fn shipped_instruction_styles_parse() {
        for style in ["original", "Type2", "10Type"] {
            let set = InstructionSet::builtin(style).unwrap();
            assert!(!set.verified, "unverified strings must say so");
            assert_eq!(set.tasks.len(), 8, "{style}");
        }
        let ten = InstructionSet::builtin("10type").unwrap();
        assert!(ten.tasks.values().all(|t| t.instructions.len() == 10));
        assert!(InstructionSet::builtin("type4").is_err());
    }

    #[test]
    fn applying_a_template_gives_coin_records() {
        let set = InstructionSet::builtin("original").unwrap();
        let t = set.task("VQAv2").unwrap();
        let item = RawItem {
            id: "7".into(),
            image: Some("a.png".into()),
            question: "How many?".into(),
            answer: "2".into(),
        };
        let tr = t.train_record(&item);
        assert_eq!(
            tr.conversations[0].value,
            "<image>\nHow many?\nAnswer the question using a single word or phrase."
        );
        assert_eq!(tr.conversations[1].value, "2");
        tr.validate().unwrap();
        let te = t.test_record(&item);
        assert_eq!(te.question_without_instruction(), "How many?");
        assert_eq!(
            te.instruction(),
            "Answer the question using a single word or phrase."
        );
        // 10Type picks a stable instruction per id, and uses several across ids.
        let ten = InstructionSet::builtin("10type").unwrap();
        let t = ten.task("vqav2").unwrap();
        let picks: std::collections::HashSet<&str> = (0..100)
            .map(|i| t.instruction_for(&i.to_string()))
            .collect();
        assert!(picks.len() >= 8);
        assert_eq!(t.instruction_for("x"), t.instruction_for("x"));
    }

    #[test]
    fn bad_template_files_are_refused() {
        let p = Path::new("x.toml");
        assert!(InstructionSet::parse(
            "style='x'\nverified=false\n[tasks.A]\ninstructions=[]\n",
            p
        )
        .is_err());
        assert!(InstructionSet::parse("style='x'\nverified=false\n[tasks.A]\nlayout='{instruction}\\n{question}'\ninstructions=['i']\n", p).is_err());
        // A valid file parses (so the refusals above are about the broken part).
        assert!(InstructionSet::parse(
            "style='x'\nverified=false\n[tasks.A]\ninstructions=['i']\n",
            p
        )
        .is_ok());
        assert!(InstructionSet::parse(
            "style='x'\nverified=false\n[tasks.A]\ninstructions=[\"two\\nlines\"]\n",
            p
        )
        .is_err());
    }

    #[test]
    fn check_task_reads_files_and_lists_missing_images() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("imgs")).unwrap();
        std::fs::write(root.join("imgs/a.png"), b"x").unwrap();
        std::fs::write(root.join("train.json"), r#"[{"id": 1, "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ\nI"}, {"from": "gpt", "value": "x"}]}]"#).unwrap();
        std::fs::write(
            root.join("test.json"),
            r#"[{"question_id": 1, "image": "b.png", "text": "Q\nI", "answer": "x"}]"#,
        )
        .unwrap();
        let def = TaskDef {
            name: "t".into(),
            aliases: vec![],
            coin: false,
            scorer: "GQA".into(),
            template: None,
            data_root: None,
            train: "train.json".into(),
            test: "test.json".into(),
            image_root: "imgs".into(),
            annotations: None,
            description: None,
        };
        let c = check_task(&def, root).unwrap();
        assert_eq!(
            (
                c.train_items,
                c.test_items,
                c.images.referenced,
                c.images.missing
            ),
            (1, 1, 2, 1)
        );
        assert_eq!(c.images.first_missing, vec!["b.png"]);
        std::fs::write(
            root.join("test.json"),
            r#"[{"question_id": 1, "image": "../../etc/passwd", "text": "Q\nI", "answer": "x"}]"#,
        )
        .unwrap();
        assert!(matches!(
            check_task(&def, root),
            Err(TaskError::ImagePathEscapes { .. })
        ));
    }

    #[test]
    fn registry_add_get_and_upward_search() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join(".coin")).unwrap();
        std::fs::create_dir_all(d.path().join("sub/deeper")).unwrap();
        let dir = find_registry_dir(&d.path().join("sub/deeper")).unwrap();
        assert_eq!(dir, d.path().join(".coin/tasks"));
        let mut reg = Registry::load(&dir).unwrap();
        assert!(reg.tasks.is_empty());
        let def = TaskDef::parse(BUILTIN_TASKS[7].1, Path::new("OCR-VQA.toml")).unwrap();
        reg.add(def.clone(), false).unwrap();
        assert!(reg.add(def.clone(), false).is_err());
        reg.add(def.clone(), true).unwrap();
        let reg = Registry::load(&dir).unwrap();
        assert_eq!(reg.tasks, vec![def]);
        assert!(reg.get("ocrvqa").is_some());
        assert!(reg.get("OCR_VQA").is_some());
        assert!(reg.get("gqa").is_none());
        assert_eq!(reg.repo_root(), d.path());
        let bad = "name = 'x y'\nscorer = 'GQA'\ntrain = 'a'\ntest = 'b'\nimage_root = 'c'\n";
        assert!(TaskDef::parse(bad, Path::new("b.toml")).is_err());
        let bad = "name = 'x'\nscorer = 'MNIST'\ntrain = 'a'\ntest = 'b'\nimage_root = 'c'\n";
        assert!(TaskDef::parse(bad, Path::new("b.toml")).is_err());
    }
}
