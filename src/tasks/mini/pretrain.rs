//! Caption data for "pre-training" a tiny base model before CoIN-mini (`coin demo`).
//!
//! The images are drawn with the same primitives as the CoIN-mini tasks (big shapes, rendered
//! words in an ink colour, two shapes left and right, 1–4 shapes in the quadrants,
//! book covers, grey noise), but the text is a plain description ("a red circle", "the word
//! cat written in blue", "2 shapes: a green square at row 1 column 2 and ..."), asked with
//! prompts no task uses ("Describe the image."). So a model trained on it learns to ground
//! colours, shapes, written words, positions and counts — the image/text format — but not
//! the tasks' questions or answer conventions (lettered options, box strings, yes/no).
//!
//! Written in CoIN's `train.json` format (LLaVA conversations) so the ordinary data pipeline
//! reads it: `DIR/train.json` and `DIR/images/<id>.png`. Deterministic from the seed, drawn
//! from its own stream (`pretrain`), so it never repeats a task item.

use std::path::{Path, PathBuf};

use super::{
    background, book_cover, json_bytes, place, write, AUTHORS, COLORS, GENRES, SHAPES, WORDS,
};
use crate::tasks::formats::{Qid, TrainRecord, Turn};
use crate::tasks::rng::SplitMix64;
use crate::tasks::TaskError;

/// The prompts of the caption data (none of them is a task's question or instruction).
pub const PROMPTS: [&str; 3] = [
    "Describe the image.",
    "What does the picture show?",
    "Give a short caption.",
];

/// The question of a multiple-choice caption item (options and the reply rule follow).
pub const CHOICE_QUESTION: &str = "Which caption fits the picture?";

/// The reply rule of a multiple-choice caption item: a generic "answer with the letter" skill
/// (LLaVA-1.5's own instruction data has multiple-choice items), worded unlike any task's
/// instruction so ScienceQA's answer format stays new to the base.
pub const CHOICE_RULE: &str = "Reply with the letter of the right caption.";

/// The kinds of pictures, one per CoIN-mini image style.
pub const KINDS: [&str; 6] = ["shape", "word", "pair", "grid", "book", "noise"];

/// One caption item.
#[derive(Clone, Debug)]
pub struct Caption {
    /// Which kind of picture (one of [`KINDS`]).
    pub kind: &'static str,
    /// The description.
    pub text: String,
    /// Short questions about the picture with their one- or few-word replies, worded unlike
    /// any task's question (asked instead of the caption for a share of the items).
    pub questions: Vec<(String, String)>,
    /// The PNG bytes.
    pub png: Vec<u8>,
}

fn count_shapes(items: &[String]) -> String {
    match items.len() {
        0 => String::new(),
        1 => items[0].clone(),
        n => format!("{} and {}", items[..n - 1].join(", "), items[n - 1]),
    }
}

/// Draw one caption item.
pub fn caption_item(rng: &mut SplitMix64, size: u32) -> Caption {
    let s = f64::from(size);
    let scale = i64::from((size / 32).max(1));
    let mut canvas = background(rng, size);
    let mut questions: Vec<(String, String)> = Vec::new();
    let k = rng.below(KINDS.len());
    let text = match KINDS[k] {
        "shape" => {
            let (c, sh) = (rng.below(COLORS.len()), rng.below(SHAPES.len()));
            let (cx, cy, r) = place(rng, size, true);
            canvas.shape(SHAPES[sh].1, cx, cy, r, COLORS[c].1);
            questions = vec![
                ("Name the colour of the object.".into(), COLORS[c].0.into()),
                ("Name the object.".into(), SHAPES[sh].0.into()),
            ];
            format!("a {} {}", COLORS[c].0, SHAPES[sh].0)
        }
        "word" => {
            let word = *rng.pick(&WORDS);
            let ink = rng.below(COLORS.len());
            let (x, y) = super::word_corner(rng, size, word.len(), scale);
            canvas.text(x, y, word, scale, COLORS[ink].1);
            questions = vec![
                ("Read the text.".into(), word.into()),
                ("Name the colour of the text.".into(), COLORS[ink].0.into()),
            ];
            format!("the word {word} written in {}", COLORS[ink].0)
        }
        "pair" => {
            let sh = rng.distinct(SHAPES.len(), 2);
            let co = rng.distinct(COLORS.len(), 2);
            let (r, centres) = super::pair_layout(rng, size);
            for i in 0..2 {
                let (cx, cy) = centres[i];
                canvas.shape(SHAPES[sh[i]].1, cx, cy, r, COLORS[co[i]].1);
            }
            for (i, side) in ["left", "right"].iter().enumerate() {
                questions.push((
                    format!("Name the object on the {side}."),
                    SHAPES[sh[i]].0.into(),
                ));
                questions.push((
                    format!("Name the colour of the object on the {side}."),
                    COLORS[co[i]].0.into(),
                ));
                questions.push((
                    format!("Where is the {}?", SHAPES[sh[i]].0),
                    format!("on the {side}"),
                ));
            }
            format!(
                "a {} {} on the left and a {} {} on the right",
                COLORS[co[0]].0, SHAPES[sh[0]].0, COLORS[co[1]].0, SHAPES[sh[1]].0
            )
        }
        "grid" => {
            // 1–4 shapes in distinct quadrants (rows and columns 1–2), as VQAv2-mini and
            // Grounding-mini draw them.
            let n = 1 + rng.below(4);
            let mut cells = rng.distinct(4, n);
            cells.sort_unstable();
            let half = s / 2.0;
            let mut parts = Vec::new();
            for &c in &cells {
                let (co, sh) = (rng.below(COLORS.len()), rng.below(SHAPES.len()));
                let (cx, cy) = (
                    (c % 2) as f64 * half + half / 2.0,
                    (c / 2) as f64 * half + half / 2.0,
                );
                canvas.shape(SHAPES[sh].1, cx, cy, s * 0.2, COLORS[co].1);
                questions.push((
                    format!("Where is the {} {}?", COLORS[co].0, SHAPES[sh].0),
                    format!("at row {} column {}", c / 2 + 1, c % 2 + 1),
                ));
                parts.push(format!(
                    "a {} {} at row {} column {}",
                    COLORS[co].0,
                    SHAPES[sh].0,
                    c / 2 + 1,
                    c % 2 + 1
                ));
            }
            let noun = if n == 1 { "shape" } else { "shapes" };
            questions.push(("Count the objects.".into(), n.to_string()));
            format!("{n} {noun}: {}", count_shapes(&parts))
        }
        "book" => {
            let (cover, genre, title, author) = book_cover(rng, size, scale);
            canvas = cover;
            questions = vec![
                ("Read the title.".into(), title.into()),
                ("Name the author.".into(), author.into()),
                ("Name the kind of book.".into(), GENRES[genre].0.into()),
            ];
            format!("a {} book called {title} by {author}", GENRES[genre].0)
        }
        _ => {
            for p in canvas.pixels.chunks_mut(3) {
                let g = 90 + rng.below(80) as u8;
                p.copy_from_slice(&[g, g, g]);
            }
            questions = vec![("Name the object.".into(), "nothing".into())];
            "grey noise without any object".to_string()
        }
    };
    Caption {
        kind: KINDS[k],
        text,
        questions,
        png: canvas.png(),
    }
}

/// Every caption word, for training a tokenizer that covers them (one phrase per line).
pub fn caption_corpus() -> String {
    let mut lines: Vec<String> = PROMPTS.iter().map(|p| p.to_string()).collect();
    for (c, _) in COLORS {
        for (s, _) in SHAPES {
            lines.push(format!("a {c} {s}"));
        }
        for w in WORDS {
            lines.push(format!("the word {w} written in {c}"));
        }
    }
    for r in 1..=2 {
        for c in 1..=2 {
            lines.push(format!("at row {r} column {c}"));
        }
    }
    for (g, _) in GENRES {
        for a in AUTHORS {
            lines.push(format!("a {g} book called cat by {a}"));
        }
    }
    lines.push("on the left and on the right".into());
    lines.push("1 shape: 2 shapes: 3 shapes: 4 shapes:".into());
    lines.push("grey noise without any object".into());
    for q in [
        "Name the colour of the object.",
        "Name the object.",
        "Read the text.",
        "Name the colour of the text.",
        "Name the object on the left.",
        "Name the colour of the object on the right.",
        "Where is the circle? on the left",
        "Where is the red bar? at row 1 column 2",
        "Count the objects.",
        "Read the title.",
        "Name the author.",
        "Name the kind of book.",
        "nothing",
    ] {
        lines.push(q.into());
    }
    lines.push(CHOICE_QUESTION.into());
    lines.push(CHOICE_RULE.into());
    for l in ["A", "B", "C", "D"] {
        lines.push(format!("{l}. "));
    }
    // A reply is a letter after a space (`ASSISTANT: B`): twice, so BPE merges the pair.
    lines.push("the letter A B C D".into());
    lines.push("the letter A B C D".into());
    lines.join("\n") + "\n"
}

/// A multiple-choice caption item: `item`'s picture, 2–4 captions of pictures of the same
/// kind as options (all different, one of them `item`'s), the letter of `item`'s as the reply.
/// Returns (prompt without `<image>`, reply).
pub fn choice_prompt(rng: &mut SplitMix64, item: &Caption, size: u32) -> (String, String) {
    let n = 2 + rng.below(3);
    let mut options = vec![item.text.clone()];
    // Distractors: captions of fresh pictures of the same kind (their images are discarded);
    // any kind once that has been tried long enough (grey noise has a single caption).
    let mut tries = 0;
    while options.len() < n {
        tries += 1;
        let other = caption_item(rng, size);
        if (other.kind == item.kind || tries > 60) && !options.contains(&other.text) {
            options.push(other.text);
        }
    }
    let order = rng.distinct(options.len(), options.len());
    let letters = ["A", "B", "C", "D"];
    let mut prompt = format!("{CHOICE_QUESTION}\n");
    let mut reply = String::new();
    for (slot, &o) in order.iter().enumerate() {
        prompt.push_str(&format!("{}. {}\n", letters[slot], options[o]));
        if o == 0 {
            reply = letters[slot].to_string();
        }
    }
    prompt.push_str(CHOICE_RULE);
    (prompt, reply)
}

/// Which items of the pre-training data are not plain captions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CaptionMix {
    /// Share (0–1) of multiple-choice items ([`choice_prompt`]).
    pub choice: f64,
    /// Share (0–1) of short questions ([`Caption::questions`]).
    pub questions: f64,
}

impl CaptionMix {
    /// Captions only.
    pub const CAPTIONS: CaptionMix = CaptionMix {
        choice: 0.0,
        questions: 0.0,
    };
}

/// Generate `n` caption items into `out` (`train.json`, `images/`); returns the train file.
/// `mix` says which share of them are multiple-choice items and short questions; the rest
/// are plain captions. Same seed, size, count and mix → same bytes.
pub fn generate_captions(
    out: &Path,
    seed: u64,
    n: usize,
    size: u32,
    mix: CaptionMix,
) -> Result<PathBuf, TaskError> {
    if size < 32 || n == 0 {
        return Err(TaskError::Registry(format!(
            "caption data needs an image size of at least 32 and at least one item (got {size}, \
             {n})"
        )));
    }
    let mut rng = SplitMix64::derive(seed, "pretrain");
    let mut records = Vec::with_capacity(n);
    let mut pngs = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("caption-{i:05}");
        let image = format!("images/{id}.png");
        let item = caption_item(&mut rng, size);
        let u = rng.unit();
        let (prompt, reply) = if u < mix.choice {
            choice_prompt(&mut rng, &item, size)
        } else if u < mix.choice + mix.questions && !item.questions.is_empty() {
            rng.pick(&item.questions).clone()
        } else {
            (rng.pick(&PROMPTS).to_string(), item.text.clone())
        };
        pngs.push((out.join(&image), item.png));
        records.push(TrainRecord {
            id: Qid::text(id.clone()),
            image: Some(image),
            conversations: vec![
                Turn {
                    from: "human".into(),
                    value: format!("<image>\n{prompt}"),
                },
                Turn {
                    from: "gpt".into(),
                    value: reply,
                },
            ],
        });
    }
    // Every file is written atomically (fsync + rename); overlap those waits.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(16)
        .build()
        .map_err(TaskError::Threads)?;
    pool.install(|| {
        use rayon::prelude::*;
        pngs.par_iter()
            .try_for_each(|(path, bytes): &(PathBuf, Vec<u8>)| write(path, bytes))
    })?;
    let file = out.join("train.json");
    write(&file, &json_bytes(&records))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::tasks::formats::{check_images, read_train_file};

    fn words(text: &str) -> BTreeSet<String> {
        text.split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn captions_are_deterministic_and_read_back() {
        let a = tempfile::tempdir().expect("temp dir");
        let b = tempfile::tempdir().expect("temp dir");
        let c = tempfile::tempdir().expect("temp dir");
        let fa = generate_captions(a.path(), 5, 40, 32, CaptionMix::CAPTIONS).expect("generates");
        let fb = generate_captions(b.path(), 5, 40, 32, CaptionMix::CAPTIONS).expect("generates");
        generate_captions(c.path(), 6, 40, 32, CaptionMix::CAPTIONS).expect("generates");
        let bytes = |d: &Path, f: &str| std::fs::read(d.join(f)).expect("file exists");
        assert_eq!(bytes(a.path(), "train.json"), bytes(b.path(), "train.json"));
        assert_eq!(
            bytes(a.path(), "images/caption-00007.png"),
            bytes(b.path(), "images/caption-00007.png")
        );
        assert_ne!(bytes(a.path(), "train.json"), bytes(c.path(), "train.json"));
        let records = read_train_file(&fa).expect("CoIN train format");
        assert_eq!(records.len(), 40);
        assert_eq!(fb, b.path().join("train.json"));
        for r in &records {
            r.validate().expect("valid conversation");
            assert_eq!(r.conversations.len(), 2);
            let prompt = r.conversations[0]
                .value
                .strip_prefix("<image>\n")
                .expect("image first");
            assert!(PROMPTS.contains(&prompt), "{prompt}");
        }
        let check = check_images(a.path(), records.iter().filter_map(|r| r.image.as_deref()))
            .expect("paths inside the folder");
        assert_eq!((check.referenced, check.missing), (40, 0));
        assert!(generate_captions(a.path(), 5, 0, 32, CaptionMix::CAPTIONS).is_err());
        assert!(generate_captions(a.path(), 5, 3, 16, CaptionMix::CAPTIONS).is_err());
    }

    #[test]
    fn captions_cover_the_task_vocabulary_but_not_the_task_formats() {
        let mut rng = SplitMix64::derive(9, "pretrain");
        let items: Vec<Caption> = (0..600).map(|_| caption_item(&mut rng, 32)).collect();
        let kinds: BTreeSet<&str> = items.iter().map(|c| c.kind).collect();
        assert_eq!(kinds, KINDS.iter().copied().collect());
        let seen: BTreeSet<String> = items.iter().flat_map(|c| words(&c.text)).collect();
        let vocab = COLORS
            .iter()
            .map(|c| c.0)
            .chain(SHAPES.iter().map(|s| s.0))
            .chain(WORDS)
            .chain(AUTHORS)
            .chain(GENRES.iter().map(|g| g.0))
            .chain(["left", "right", "1", "2", "3", "4", "row", "column"]);
        for w in vocab {
            assert!(seen.contains(w), "no caption mentions '{w}'");
        }
        // Every caption word is in the tokenizer corpus.
        let corpus = words(&caption_corpus());
        for w in &seen {
            assert!(corpus.contains(w), "'{w}' is missing from caption_corpus()");
        }
        // The tasks' answer conventions never appear: no lettered options, no box strings,
        // no yes/no, no `unanswerable`; and no prompt is a task question or instruction.
        for c in &items {
            let replies = std::iter::once(&c.text).chain(c.questions.iter().map(|q| &q.1));
            for text in replies {
                assert!(!text.contains('['), "{text}");
                for w in ["yes", "no", "unanswerable", "A", "B", "C", "D"] {
                    assert!(!words(text).contains(w), "{text}: '{w}'");
                }
            }
        }
        // Every kind but noise asks about what its caption says; every question word is in
        // the tokenizer corpus; no question is a task line.
        let task_lines: BTreeSet<String> = super::super::coin_mini_corpus()
            .lines()
            .map(str::to_string)
            .collect();
        for c in &items {
            assert!(!c.questions.is_empty(), "{}", c.kind);
            for (q, a) in &c.questions {
                assert!(!task_lines.contains(q.as_str()), "'{q}' is a task line");
                for w in words(q).iter().chain(words(a).iter()) {
                    assert!(
                        corpus.contains(w),
                        "'{w}' of '{q}' is missing from the corpus"
                    );
                }
                if c.kind != "noise" && !q.starts_with("Count") && !q.starts_with("Where") {
                    assert!(
                        words(&c.text).contains(a.as_str()),
                        "{q} -> {a} vs '{}'",
                        c.text
                    );
                }
            }
        }
        for p in PROMPTS {
            assert!(!task_lines.contains(p), "'{p}' is a task line");
        }
    }

    /// Multiple-choice items: 2–4 distinct options of the picture's kind, the reply is the
    /// letter of the picture's own caption, the wording is no task's; a share of 0.5 gives
    /// about half of them.
    #[test]
    fn choice_items_reply_with_the_letter_of_the_pictures_caption() {
        let mut rng = SplitMix64::derive(4, "pretrain");
        let mut counts = [0usize; 5];
        for _ in 0..200 {
            let item = caption_item(&mut rng, 32);
            let (prompt, reply) = choice_prompt(&mut rng, &item, 32);
            let lines: Vec<&str> = prompt.lines().collect();
            assert_eq!(lines[0], CHOICE_QUESTION);
            assert_eq!(*lines.last().expect("rule"), CHOICE_RULE);
            let options: Vec<&str> = lines[1..lines.len() - 1].to_vec();
            counts[options.len()] += 1;
            let mut texts = BTreeSet::new();
            for (i, o) in options.iter().enumerate() {
                let letter = ["A", "B", "C", "D"][i];
                let text = o
                    .strip_prefix(&format!("{letter}. "))
                    .unwrap_or_else(|| panic!("option {i} is lettered: {o}"));
                assert!(
                    texts.insert(text.to_string()),
                    "repeated option in {prompt}"
                );
                assert_eq!(text == item.text, reply == letter, "{prompt} -> {reply}");
            }
            assert!(texts.contains(&item.text), "{prompt}");
        }
        assert_eq!(counts[0] + counts[1], 0);
        assert!(
            counts[2] > 30 && counts[3] > 30 && counts[4] > 30,
            "{counts:?}"
        );
        let task_lines: BTreeSet<String> = super::super::coin_mini_corpus()
            .lines()
            .map(str::to_string)
            .collect();
        for p in [CHOICE_QUESTION, CHOICE_RULE] {
            assert!(!task_lines.contains(p), "'{p}' is a task line");
        }
        // 60 items of a mix, read back through the CoIN train reader.
        let sixty = |choice: f64, questions: f64| {
            let dir = tempfile::tempdir().expect("temp dir");
            let f = generate_captions(dir.path(), 5, 60, 32, CaptionMix { choice, questions })
                .expect("generates");
            read_train_file(&f).expect("CoIN train format")
        };
        let records = sixty(0.5, 0.0);
        let choice = records
            .iter()
            .filter(|r| r.conversations[0].value.contains(CHOICE_QUESTION))
            .count();
        assert!((15..=45).contains(&choice), "{choice} of 60");
        // A share of short questions: about half of the items ask one of their questions.
        let records = sixty(0.0, 0.5);
        let asked = records
            .iter()
            .filter(|r| {
                let p = r.conversations[0].value.trim_start_matches("<image>\n");
                !PROMPTS.contains(&p)
            })
            .count();
        assert!((15..=45).contains(&asked), "{asked} of 60");
    }
}
