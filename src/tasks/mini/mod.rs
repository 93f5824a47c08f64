//! CoIN-mini: eight small tasks that mirror CoIN's eight, generated deterministically from a
//! seed, with real PNG images drawn by our own code.
//!
//! Files mirror CoIN's layout exactly: `Instructions_Original/<Task>/train.json` (LLaVA
//! conversations) and `test.json`/`val.json` (CoIN test records), images under `cl_dataset/`,
//! and the annotation files CoIN's scorers read (ScienceQA `problems.json` + `pid_splits.json`,
//! `TextVQA_0.5.1_val.json`, GQA `testdev_balanced_questions.json`). The instructions are the
//! Original templates of templates/instructions/original.toml. See docs/coin-mini.md.

pub mod draw;
pub mod pretrain;

use std::path::{Path, PathBuf};

use serde::Serialize;

use self::draw::{Canvas, Shape};
use super::formats::TestRecord;
use super::registry::{InstructionSet, RawItem, TaskDef, TaskTemplate};
use super::rng::SplitMix64;
use super::scoring::ScorerKind;
use super::TaskError;
use crate::store::fsutil::write_atomic;

/// The manifest file at the top of a CoIN-mini folder.
pub const MANIFEST: &str = "coin-mini.json";

/// Version of the generator; bump when the output for a seed changes.
pub const GENERATOR_VERSION: u32 = 3;

const COLORS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 30, 30]),
    ("green", [30, 160, 50]),
    ("blue", [30, 70, 220]),
    ("yellow", [235, 200, 0]),
    ("purple", [140, 40, 180]),
    ("black", [20, 20, 20]),
];

const SHAPES: [(&str, Shape); 6] = [
    ("square", Shape::Square),
    ("circle", Shape::Circle),
    ("triangle", Shape::Triangle),
    ("diamond", Shape::Diamond),
    ("cross", Shape::Cross),
    ("bar", Shape::Bar),
];

/// Words written in TextVQA-mini images and OCR-VQA-mini titles (two are colour names, on
/// purpose: the same word is a colour answer elsewhere).
const WORDS: [&str; 8] = ["red", "blue", "cat", "dog", "sun", "box", "cup", "star"];
const AUTHORS: [&str; 4] = ["ann", "bob", "eve", "tom"];
/// Genres, told by the cover colour.
const GENRES: [(&str, [u8; 3]); 4] = [
    ("history", [230, 140, 140]),
    ("travel", [140, 170, 240]),
    ("science", [150, 220, 150]),
    ("cooking", [240, 220, 120]),
];

/// mini-ScienceQA's options: the first this-many colours, or shapes, in their order.
const SQA_OPTIONS: usize = 4;
const SQA_QUESTIONS: [&str; 2] = [
    "Which color is the shape in the picture?",
    "Which shape is shown in the picture?",
];
const TEXTVQA_QUESTIONS: [&str; 2] = [
    "What word is written in the image?",
    "What does the text say?",
];
const GQA_COLORS_QUESTION: &str = "What colors are the shapes, from left to right?";
const IMAGENET_QUESTION: &str = "What is the object in the image?";
const VIZWIZ_QUESTIONS: [&str; 2] = ["What color is this?", "What is the color of this object?"];
const VQA_COUNT: &str = "How many shapes are there?";
const VQA_MORE_THAN_TWO: &str = "Are there more than two shapes?";
const OCR_QUESTIONS: [&str; 3] = [
    "What is the title of this book?",
    "Who wrote this book?",
    "What is the genre of this book?",
];

/// How a CoIN-mini task maps onto CoIN's folders.
#[derive(Clone, Copy, Debug)]
pub struct MiniTask {
    /// The registered name (`mini-<CoIN task>`).
    pub name: &'static str,
    /// The scorer (and CoIN task it mirrors).
    pub scorer: ScorerKind,
    /// Folder under `Instructions_Original/`.
    pub dir: &'static str,
    /// `test.json` or `val.json`, as CoIN evaluates this task.
    pub test_file: &'static str,
    /// Image folder under `cl_dataset/`.
    pub images: &'static str,
    /// Annotation file or folder under `cl_dataset/`, where CoIN's scorer reads one.
    pub annotations: Option<&'static str>,
    /// Expected accuracy (0..1) of the best answer that ignores the image.
    pub chance: f64,
}

/// The eight tasks in CoIN's order.
pub const TASKS: [MiniTask; 8] = [
    MiniTask {
        name: "mini-ScienceQA",
        scorer: ScorerKind::ScienceQA,
        dir: "ScienceQA",
        test_file: "test.json",
        images: "ScienceQA/images",
        annotations: Some("ScienceQA"),
        chance: 0.25,
    },
    MiniTask {
        name: "mini-TextVQA",
        scorer: ScorerKind::TextVQA,
        dir: "TextVQA",
        test_file: "val.json",
        images: "TextVQA/train_images",
        annotations: Some("TextVQA/TextVQA_0.5.1_val.json"),
        chance: 1.0 / 8.0,
    },
    MiniTask {
        name: "mini-ImageNet",
        scorer: ScorerKind::ImageNet,
        dir: "ImageNet",
        test_file: "test.json",
        images: "ImageNet_withlabel/test",
        annotations: None,
        chance: 1.0 / 6.0,
    },
    MiniTask {
        name: "mini-GQA",
        scorer: ScorerKind::GQA,
        dir: "GQA",
        test_file: "test.json",
        images: "GQA/images",
        annotations: Some("GQA/testdev_balanced_questions.json"),
        chance: 17.0 / 90.0,
    },
    MiniTask {
        name: "mini-VizWiz",
        scorer: ScorerKind::VizWiz,
        dir: "VizWiz",
        test_file: "val.json",
        images: "VizWiz/val",
        annotations: None,
        chance: 1.0 / 7.0,
    },
    MiniTask {
        name: "mini-Grounding",
        scorer: ScorerKind::Grounding,
        dir: "Grounding",
        test_file: "test.json",
        images: "COCO2014/train2014",
        annotations: None,
        chance: 0.25,
    },
    MiniTask {
        name: "mini-VQAv2",
        scorer: ScorerKind::VQAv2,
        dir: "VQAv2",
        test_file: "val.json",
        images: "COCO2014/train2014",
        annotations: None,
        chance: 0.375,
    },
    MiniTask {
        name: "mini-OCRVQA",
        scorer: ScorerKind::OCRVQA,
        dir: "OCRVQA",
        test_file: "test.json",
        images: "OCR-VQA/images",
        annotations: None,
        chance: 5.0 / 24.0,
    },
];

/// The chance level (0..1) of a CoIN-mini task: the expected accuracy of the best answer that
/// ignores the image (uniform answers per question type). Accepts `mini-GQA`, `GQA`, `gqa`, ….
pub fn chance_level(task: &str) -> Option<f64> {
    let key = task.strip_prefix("mini-").unwrap_or(task);
    let kind = ScorerKind::from_name(key)?;
    TASKS.iter().find(|t| t.scorer == kind).map(|t| t.chance)
}

/// Generation settings.
#[derive(Clone, Debug, Serialize)]
pub struct MiniConfig {
    /// The seed.
    pub seed: u64,
    /// Training items per task.
    pub train: usize,
    /// Test items per task.
    pub test: usize,
    /// Image width = height in pixels (at least 32).
    pub image_size: u32,
}

impl Default for MiniConfig {
    fn default() -> Self {
        MiniConfig {
            seed: 0,
            train: 200,
            test: 50,
            image_size: 32,
        }
    }
}

/// What was generated, per task (also written as `coin-mini.json`).
#[derive(Clone, Debug, Serialize)]
pub struct MiniManifest {
    /// Generator version.
    pub generator: u32,
    /// The settings.
    pub config: MiniConfig,
    /// One entry per task.
    pub tasks: Vec<MiniTaskSummary>,
}

/// One generated task.
#[derive(Clone, Debug, Serialize)]
pub struct MiniTaskSummary {
    /// Registered name.
    pub name: String,
    /// Scorer.
    pub scorer: String,
    /// Train file, relative to the folder.
    pub train: String,
    /// Test file, relative to the folder.
    pub test: String,
    /// Image root, relative to the folder.
    pub image_root: String,
    /// Annotation path relative to the folder, if any.
    pub annotations: Option<String>,
    /// Chance level (0..1).
    pub chance: f64,
    /// Number of training items.
    pub n_train: usize,
    /// Number of test items.
    pub n_test: usize,
}

/// The registry entries of a CoIN-mini folder at `data_root` (relative to the repository root,
/// or absolute). Not CoIN tasks, so their default scoring mode is strict.
pub fn task_defs(data_root: &str) -> Vec<TaskDef> {
    TASKS
        .iter()
        .map(|t| TaskDef {
            name: t.name.to_string(),
            aliases: vec![],
            coin: false,
            scorer: t.scorer.name().to_string(),
            template: Some(template_key(t.scorer).to_string()),
            data_root: Some(data_root.to_string()),
            train: format!("Instructions_Original/{}/train.json", t.dir),
            test: format!("Instructions_Original/{}/{}", t.dir, t.test_file),
            image_root: "cl_dataset".to_string(),
            annotations: t.annotations.map(|a| format!("cl_dataset/{a}")),
            description: Some(format!(
                "CoIN-mini task mirroring CoIN {}; chance {:.1}%",
                t.scorer.name(),
                100.0 * t.chance
            )),
        })
        .collect()
}

fn template_key(kind: ScorerKind) -> &'static str {
    match kind {
        ScorerKind::OCRVQA => "OCRVQA",
        k => k.name(),
    }
}

/// Every word, letter, number and phrase that can appear in CoIN-mini questions, instructions
/// and answers (one phrase per line), for training a tokenizer that covers it.
pub fn coin_mini_corpus() -> String {
    let mut lines: Vec<String> = Vec::new();
    if let Ok(set) = InstructionSet::builtin("original") {
        for t in set.tasks.values() {
            lines.extend(t.instructions.iter().cloned());
        }
    }
    lines.extend(SQA_QUESTIONS.iter().map(|s| s.to_string()));
    lines.extend(TEXTVQA_QUESTIONS.iter().map(|s| s.to_string()));
    lines.push(IMAGENET_QUESTION.to_string());
    lines.extend(VIZWIZ_QUESTIONS.iter().map(|s| s.to_string()));
    lines.push(VQA_COUNT.to_string());
    lines.push(VQA_MORE_THAN_TWO.to_string());
    lines.extend(OCR_QUESTIONS.iter().map(|s| s.to_string()));
    for (c, _) in COLORS {
        for (c2, _) in COLORS {
            lines.push(format!("{c} and {c2}"));
        }
        for (s, _) in SHAPES {
            lines.push(format!("the {c} {s}"));
        }
    }
    lines.push(GQA_COLORS_QUESTION.to_string());
    for (c, _) in COLORS {
        for (c2, _) in COLORS {
            lines.push(format!("Is the {c} shape to the left of the {c2} shape?"));
        }
    }
    for (i, l) in ["A", "B", "C", "D"].iter().enumerate() {
        for (c, _) in COLORS {
            lines.push(format!("{l}. {c}"));
        }
        for (s, _) in SHAPES {
            lines.push(format!("{l}. {s}"));
        }
        lines.push(format!("{}", i + 1));
    }
    let answers: Vec<&str> = WORDS
        .iter()
        .chain(AUTHORS.iter())
        .copied()
        .chain(GENRES.iter().map(|g| g.0))
        .chain(["yes", "no", "unanswerable"])
        .collect();
    lines.extend(answers.iter().map(|s| s.to_string()));
    for r in [0, 2] {
        for c in [0, 2] {
            lines.push(bbox_text(c, r, c + 2, r + 2));
        }
    }
    lines.join("\n") + "\n"
}

fn coord(k: usize) -> String {
    format!("{:.2}", k as f64 / 4.0)
}

fn bbox_text(x0: usize, y0: usize, x1: usize, y1: usize) -> String {
    format!(
        "[{}, {}, {}, {}]",
        coord(x0),
        coord(y0),
        coord(x1),
        coord(y1)
    )
}

/// One generated item: the raw item, its image, and task-specific extras.
struct Item {
    raw: RawItem,
    png: Vec<u8>,
    /// Grounding: the box string (the `answer` of train records is the same string).
    bbox: Option<String>,
    /// ScienceQA: the choices and the answer index.
    choices: Option<(Vec<String>, usize)>,
}

/// A book cover (OCR-VQA-like): the genre's colour, a title word near the top, an author name
/// near the bottom. Returns the canvas and the genre index, title and author.
fn book_cover(
    rng: &mut SplitMix64,
    size: u32,
    scale: i64,
) -> (Canvas, usize, &'static str, &'static str) {
    let genre = rng.below(GENRES.len());
    let mut canvas = Canvas::new(size, GENRES[genre].1);
    let title = *rng.pick(&WORDS);
    let author = *rng.pick(&AUTHORS);
    let ink = [20, 20, 20];
    canvas.rect(0, 0, i64::from(size), scale, ink);
    // Centred (version 3; version 2's random offsets are still drawn, and ignored).
    let centred = |len: usize| ((i64::from(size) - len as i64 * 6 * scale) / 2).max(0);
    let _ = rng.below((i64::from(size) - title.len() as i64 * 6 * scale).max(1) as usize);
    canvas.text(centred(title.len()), 3 * scale, title, scale, ink);
    let _ = rng.below((i64::from(size) - author.len() as i64 * 6 * scale).max(1) as usize);
    canvas.text(
        centred(author.len()),
        i64::from(size) - 9 * scale,
        author,
        scale,
        ink,
    );
    (canvas, genre, title, author)
}

fn background(rng: &mut SplitMix64, size: u32) -> Canvas {
    let g = 225 + rng.below(25) as u8;
    Canvas::new(size, [g, g, g.saturating_sub(rng.below(10) as u8)])
}

/// A centre and radius for one shape. A big shape is centred (±1/16 of the image) with a
/// radius of 0.30–0.36 of the side: a tiny vision tower trained from scratch cannot learn
/// shapes at any position in a demo's budget (trained for 1,000 steps on freely placed
/// shapes, it named 25 % of them, chance 17 %), so where a shape is stays a weak cue and what
/// it is the strong one. A small shape (GQA's pairs) is placed anywhere.
fn place(rng: &mut SplitMix64, size: u32, big: bool) -> (f64, f64, f64) {
    let s = f64::from(size);
    if big {
        let r = s * (0.30 + 0.06 * rng.unit());
        let cx = s * (0.5 + (rng.unit() - 0.5) / 8.0);
        let cy = s * (0.5 + (rng.unit() - 0.5) / 8.0);
        return (cx, cy, r);
    }
    let r = s * (0.18 + 0.06 * rng.unit());
    let cx = r + (s - 2.0 * r) * rng.unit();
    let cy = r + (s - 2.0 * r) * rng.unit();
    (cx, cy, r)
}

/// Radius and centres of GQA's two shapes: the middle of the left and of the right half,
/// ±1/32 of the side across and ±1/16 up and down (version 1 placed them anywhere in their
/// half; see [`place`] for why the positions are now nearly fixed).
pub(crate) fn pair_layout(rng: &mut SplitMix64, size: u32) -> (f64, [(f64, f64); 2]) {
    let s = f64::from(size);
    let x0 = s * (0.25 + (rng.unit() - 0.5) / 16.0);
    let x1 = s * (0.75 + (rng.unit() - 0.5) / 16.0);
    let y0 = s * (0.5 + (rng.unit() - 0.5) / 8.0);
    let y1 = s * (0.5 + (rng.unit() - 0.5) / 8.0);
    (s * 0.2, [(x0, y0), (x1, y1)])
}

/// The top-left corner of a word of `len` letters drawn at `scale`: centred, ±2 px.
pub(crate) fn word_corner(rng: &mut SplitMix64, size: u32, len: usize, scale: i64) -> (i64, i64) {
    let w = len as i64 * 6 * scale;
    let h = 7 * scale;
    // Version 2 moved the word by ±2 px; version 3 draws the same numbers and ignores them.
    let _ = (rng.below(5), rng.below(5));
    let x = ((i64::from(size) - w) / 2).max(0);
    let y = ((i64::from(size) - h) / 2).max(0);
    (x, y)
}

fn gen_item(task: &MiniTask, rng: &mut SplitMix64, id: &str, image: String, size: u32) -> Item {
    let s = f64::from(size);
    let scale = i64::from((size / 32).max(1));
    let mut canvas = background(rng, size);
    let mut bbox = None;
    let mut choices = None;
    let (question, answer) = match task.scorer {
        ScorerKind::ScienceQA => {
            // The options of a question kind are always the same four, in the same order
            // (version 3): the letter is a function of the picture. With version 2's 4 of 6
            // options in random order, a tiny model could not learn to match the option texts
            // against the picture in a demo's budget (its loss stayed at ln 4; coin-mini.md).
            let by_color = rng.chance(0.5);
            let (color, shape) = if by_color {
                (rng.below(SQA_OPTIONS), rng.below(SHAPES.len()))
            } else {
                (rng.below(COLORS.len()), rng.below(SQA_OPTIONS))
            };
            let (cx, cy, r) = place(rng, size, true);
            canvas.shape(SHAPES[shape].1, cx, cy, r, COLORS[color].1);
            let (names, right): (Vec<&str>, usize) = if by_color {
                (COLORS.iter().map(|c| c.0).collect(), color)
            } else {
                (SHAPES.iter().map(|c| c.0).collect(), shape)
            };
            let opts: Vec<usize> = (0..SQA_OPTIONS).collect();
            let answer_idx = right;
            let letters = ['A', 'B', 'C', 'D'];
            let mut q = SQA_QUESTIONS[usize::from(!by_color)].to_string();
            for (l, o) in letters.iter().zip(&opts) {
                q.push_str(&format!("\n{l}. {}", names[*o]));
            }
            choices = Some((
                opts.iter().map(|o| names[*o].to_string()).collect(),
                answer_idx,
            ));
            (q, letters[answer_idx].to_string())
        }
        ScorerKind::TextVQA => {
            let word = *rng.pick(&WORDS);
            let ink = COLORS[rng.below(COLORS.len())].1;
            let (x, y) = word_corner(rng, size, word.len(), scale);
            canvas.text(x, y, word, scale, ink);
            (rng.pick(&TEXTVQA_QUESTIONS).to_string(), word.to_string())
        }
        ScorerKind::ImageNet => {
            let shape = rng.below(SHAPES.len());
            let (cx, cy, r) = place(rng, size, true);
            canvas.shape(
                SHAPES[shape].1,
                cx,
                cy,
                r,
                COLORS[rng.below(COLORS.len())].1,
            );
            (IMAGENET_QUESTION.to_string(), SHAPES[shape].0.to_string())
        }
        ScorerKind::GQA => {
            let sh = rng.distinct(SHAPES.len(), 2);
            let co = rng.distinct(COLORS.len(), 2);
            // object 0 in the left half, object 1 in the right half.
            let (r, centres) = pair_layout(rng, size);
            for i in 0..2 {
                let (cx, cy) = centres[i];
                canvas.shape(SHAPES[sh[i]].1, cx, cy, r, COLORS[co[i]].1);
            }
            // Version 3 asks for both colours in their left-to-right order (two times in
            // three) or whether one colour is left of the other. Version 2 asked for the
            // colour of a named shape, the shape of a named colour and a relation between two
            // named shapes; a tiny model did not learn to find one of the shapes by a word of
            // the question (docs/coin-mini.md). The pictures, and the numbers drawn for the
            // questions, are version 2's.
            if rng.below(3) == 1 {
                let left_first = rng.chance(0.5);
                let (a, b) = if left_first {
                    (co[0], co[1])
                } else {
                    (co[1], co[0])
                };
                (
                    format!(
                        "Is the {} shape to the left of the {} shape?",
                        COLORS[a].0, COLORS[b].0
                    ),
                    if left_first { "yes" } else { "no" }.to_string(),
                )
            } else {
                let _ = rng.below(2);
                (
                    GQA_COLORS_QUESTION.to_string(),
                    format!("{} and {}", COLORS[co[0]].0, COLORS[co[1]].0),
                )
            }
        }
        ScorerKind::VizWiz => {
            let q = rng.pick(&VIZWIZ_QUESTIONS).to_string();
            let k = rng.below(COLORS.len() + 1);
            if k == COLORS.len() {
                // An unusable photo: grey noise, no object.
                for p in canvas.pixels.chunks_mut(3) {
                    let g = 90 + rng.below(80) as u8;
                    p.copy_from_slice(&[g, g, g]);
                }
                (q, "unanswerable".to_string())
            } else {
                let (cx, cy, r) = place(rng, size, true);
                canvas.shape(SHAPES[rng.below(SHAPES.len())].1, cx, cy, r, COLORS[k].1);
                (q, COLORS[k].0.to_string())
            }
        }
        ScorerKind::Grounding => {
            // Version 3: one shape, in the middle of one of the four quadrants; the box is
            // the quadrant's. Version 2 drew three small shapes in cells of a 4×4 grid and
            // asked for one of them: a tiny model did not learn to find a small shape by the
            // words of the question (0–5 % right, chance 6 %); it does read where one big
            // shape is (docs/coin-mini.md).
            let q = rng.below(4);
            let (sh, co) = (rng.below(SHAPES.len()), rng.below(COLORS.len()));
            let (col, row) = (q % 2, q / 2);
            let half = s / 2.0;
            let (cx, cy) = (
                col as f64 * half + half / 2.0,
                row as f64 * half + half / 2.0,
            );
            canvas.shape(SHAPES[sh].1, cx, cy, s * 0.2, COLORS[co].1);
            let b = bbox_text(2 * col, 2 * row, 2 * col + 2, 2 * row + 2);
            bbox = Some(b.clone());
            (format!("the {} {}", COLORS[co].0, SHAPES[sh].0), b)
        }
        ScorerKind::VQAv2 => {
            // Version 3: 1–4 shapes in the middle of distinct quadrants, as large as GQA's
            // and Grounding's (version 2: in 8-px cells of a 4×4 grid; a tiny tower barely
            // sees shapes that small: 37.5–62.5 % right after training, chance 37.5 %).
            let n = 1 + rng.below(4);
            let quadrants = rng.distinct(4, n);
            let half = s / 2.0;
            let mut present = Vec::new();
            for &q in &quadrants {
                let color = rng.below(COLORS.len());
                present.push(color);
                let (cx, cy) = (
                    (q % 2) as f64 * half + half / 2.0,
                    (q / 2) as f64 * half + half / 2.0,
                );
                canvas.shape(
                    SHAPES[rng.below(SHAPES.len())].1,
                    cx,
                    cy,
                    s * 0.2,
                    COLORS[color].1,
                );
            }
            if rng.chance(0.5) {
                (VQA_COUNT.to_string(), n.to_string())
            } else {
                // Version 2 asked "Is there a C shape?": a tiny model answered it no better
                // than chance (it does not learn to look for the colour the question names;
                // docs/coin-mini.md). The numbers drawn for it are still drawn.
                let absent = (0..COLORS.len()).filter(|c| !present.contains(c)).count();
                let _ = if rng.chance(0.5) {
                    rng.below(present.len())
                } else {
                    rng.below(absent)
                };
                (
                    VQA_MORE_THAN_TWO.to_string(),
                    if n > 2 { "yes" } else { "no" }.to_string(),
                )
            }
        }
        ScorerKind::OCRVQA => {
            let (cover, genre, title, author) = book_cover(rng, size, scale);
            canvas = cover;
            let k = rng.below(3);
            let a = match k {
                0 => title,
                1 => author,
                _ => GENRES[genre].0,
            };
            (OCR_QUESTIONS[k].to_string(), a.to_string())
        }
    };
    Item {
        raw: RawItem {
            id: id.to_string(),
            image: Some(image),
            question,
            answer,
        },
        png: canvas.png(),
        bbox,
        choices,
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), TaskError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| TaskError::io("create the folder", parent, e))?;
    }
    write_atomic(path, bytes).map_err(|e| TaskError::io("write", path, e))
}

fn json_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    let mut b = serde_json::to_vec_pretty(v).expect("generated records always serialise");
    b.push(b'\n');
    b
}

/// Generate CoIN-mini into `out`. Same config, same bytes.
pub fn generate(
    out: &Path,
    cfg: &MiniConfig,
    mut progress: impl FnMut(&str),
) -> Result<MiniManifest, TaskError> {
    if cfg.image_size < 32 {
        return Err(TaskError::Registry(format!(
            "--image-size must be at least 32 (got {})",
            cfg.image_size
        )));
    }
    if cfg.train == 0 || cfg.test == 0 {
        return Err(TaskError::Registry(
            "--train and --test must be at least 1".into(),
        ));
    }
    let set = InstructionSet::builtin("original")?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(16)
        .build()
        .map_err(TaskError::Threads)?;
    let mut summaries = Vec::new();
    for task in &TASKS {
        progress(task.name);
        let template: &TaskTemplate = set.task(template_key(task.scorer))?;
        let mut train_records = Vec::with_capacity(cfg.train);
        let mut test_records: Vec<TestRecord> = Vec::with_capacity(cfg.test);
        let mut sqa_problems = serde_json::Map::new();
        let mut sqa_splits: [Vec<String>; 2] = [Vec::new(), Vec::new()];
        let mut extra_ann = Vec::new();
        let mut pngs: Vec<(PathBuf, Vec<u8>)> = Vec::with_capacity(cfg.train + cfg.test);
        for (split, n) in [("train", cfg.train), ("test", cfg.test)] {
            let mut rng = SplitMix64::derive(cfg.seed, &format!("{}/{split}", task.name));
            let prefix = task.dir.to_lowercase();
            for i in 0..n {
                let id = format!("{prefix}-{split}-{i:05}");
                let image = format!("{}/{id}.png", task.images);
                let mut item = gen_item(task, &mut rng, &id, image.clone(), cfg.image_size);
                pngs.push((
                    out.join("cl_dataset").join(&image),
                    std::mem::take(&mut item.png),
                ));
                if let Some((choices, answer)) = &item.choices {
                    sqa_problems.insert(
                        id.clone(),
                        serde_json::json!({
                            "question": item.raw.question.lines().next().unwrap_or(""),
                            "choices": choices, "answer": answer, "split": split,
                            "image": format!("{id}.png"),
                        }),
                    );
                    sqa_splits[usize::from(split == "test")].push(id.clone());
                }
                if split == "train" {
                    train_records.push(template.train_record(&item.raw));
                } else {
                    let mut rec = template.test_record(&item.raw);
                    if let Some(b) = &item.bbox {
                        rec.answer = None;
                        rec.answer_bbox = Some(b.clone());
                        rec.size = Some([f64::from(cfg.image_size); 2]);
                    }
                    match task.scorer {
                        ScorerKind::TextVQA => extra_ann.push(serde_json::json!({
                            "question_id": id, "image_id": id, "question": item.raw.question,
                            "answers": vec![item.raw.answer.clone(); 10],
                        })),
                        ScorerKind::GQA => extra_ann.push(serde_json::json!([id, {
                            "question": item.raw.question, "answer": item.raw.answer,
                            "isBalanced": true, "imageId": id,
                            // Fields CoIN's eval_gqa.py reads for its per-type breakdowns.
                            "types": {"structural": if matches!(item.raw.answer.as_str(), "yes" | "no") { "verify" } else { "query" }, "semantic": "attr", "detailed": "mini"},
                            "groups": {"global": null, "local": null},
                            "semantic": [], "entailed": [], "equivalent": [id],
                        }])),
                        _ => {}
                    }
                    test_records.push(rec);
                }
            }
        }
        // Every file is written atomically (fsync + rename); overlap those waits.
        pool.install(|| {
            use rayon::prelude::*;
            pngs.par_iter()
                .try_for_each(|(path, bytes)| write(path, bytes))
        })?;
        let dir = out.join("Instructions_Original").join(task.dir);
        write(&dir.join("train.json"), &json_bytes(&train_records))?;
        write(&dir.join(task.test_file), &json_bytes(&test_records))?;
        let ann_root = out.join("cl_dataset");
        match task.scorer {
            ScorerKind::ScienceQA => {
                write(
                    &ann_root.join("ScienceQA/problems.json"),
                    &json_bytes(&sqa_problems),
                )?;
                let splits = serde_json::json!({"train": sqa_splits[0], "test": sqa_splits[1]});
                write(
                    &ann_root.join("ScienceQA/pid_splits.json"),
                    &json_bytes(&splits),
                )?;
            }
            ScorerKind::TextVQA => {
                let v = serde_json::json!({"dataset_type": "val", "dataset_name": "textvqa-mini", "data": extra_ann});
                write(
                    &ann_root.join("TextVQA/TextVQA_0.5.1_val.json"),
                    &json_bytes(&v),
                )?;
            }
            ScorerKind::GQA => {
                let mut m = serde_json::Map::new();
                for pair in extra_ann {
                    if let serde_json::Value::Array(mut kv) = pair {
                        let v = kv.pop().unwrap_or_default();
                        let k = kv
                            .pop()
                            .and_then(|k| k.as_str().map(str::to_string))
                            .unwrap_or_default();
                        m.insert(k, v);
                    }
                }
                write(
                    &ann_root.join("GQA/testdev_balanced_questions.json"),
                    &json_bytes(&m),
                )?;
            }
            _ => {}
        }
        summaries.push(MiniTaskSummary {
            name: task.name.to_string(),
            scorer: task.scorer.name().to_string(),
            train: format!("Instructions_Original/{}/train.json", task.dir),
            test: format!("Instructions_Original/{}/{}", task.dir, task.test_file),
            image_root: "cl_dataset".to_string(),
            annotations: task.annotations.map(|a| format!("cl_dataset/{a}")),
            chance: task.chance,
            n_train: cfg.train,
            n_test: cfg.test,
        });
    }
    let manifest = MiniManifest {
        generator: GENERATOR_VERSION,
        config: cfg.clone(),
        tasks: summaries,
    };
    write(&out.join(MANIFEST), &json_bytes(&manifest))?;
    Ok(manifest)
}

#[cfg(test)]
mod tests;
