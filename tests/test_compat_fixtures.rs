//! `coin score --mode compat` against the numbers CoIN's own scorer scripts print on the
//! answer files in tests/fixtures/compat (how each number was made: the README there).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use crate::common::{Output, TestEnvironment};

fn fixture(rel: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/compat")
        .join(rel)
        .display()
        .to_string()
}

fn score(task: &str, dir: &str, questions: &str, annotations: Option<&str>) -> Output {
    let env = TestEnvironment::new();
    let (q, a) = (
        fixture(&format!("{dir}/{questions}")),
        fixture(&format!("{dir}/answers.jsonl")),
    );
    let mut args = vec!["score", "--task", task, "--questions", &q, "--answers", &a];
    let ann = annotations.map(|p| fixture(&format!("{dir}/{p}")));
    if let Some(p) = &ann {
        args.extend(["--annotations", p.as_str()]);
    }
    args.extend(["--mode", "compat", "--json"]);
    env.coin(&args)
}

/// The score and count, as CoIN prints them (two decimals).
fn printed(out: &Output) -> (String, u64) {
    let v = out.json();
    (
        format!("{:.2}", v["score"].as_f64().unwrap()),
        v["n"].as_u64().unwrap(),
    )
}

#[test]
fn grounding_iou_at_one_half_lands_where_coins_lands() {
    // eval_grounding.py printed "Samples: 10 / Accuracy: 60.00%". Comparing the normalised
    // boxes and dropping a leading space (coin before) gave 30.00: each of the first 8 boxes
    // has an IoU of 0.5 up to one ulp, on the other side of 0.5 before scaling, and
    // " [-0.3, …" lost its sign.
    let out = score("Grounding", "grounding", "test.json", None).success();
    assert_eq!(printed(&out), ("60.00".into(), 10));
    assert_eq!(out.stderr, "");
}

#[test]
fn gqa_keeps_whitespace_around_predictions() {
    // convert_gqa_for_eval.py + eval_gqa.py printed "Accuracy: 33.33%": " no", "left ",
    // "\ttable" and "blue\n" are wrong, "Red." is right.
    let out = score(
        "GQA",
        "gqa",
        "test.json",
        Some("testdev_balanced_questions.json"),
    )
    .success();
    assert_eq!(printed(&out), ("33.33".into(), 6));
}

#[test]
fn scienceqa_never_matches_ids_written_as_numbers() {
    // eval_science_qa.py printed "Total: 4, Correct: 2, Accuracy: 50.00%": the answers to 11
    // and 13 are written as numbers and count as FAILED.
    let out = score("ScienceQA", "scienceqa", "test.json", Some("")).success();
    assert_eq!(printed(&out), ("50.00".into(), 4));
    assert!(
        out.stderr.starts_with("Warning: 2 answer line(s) of '")
            && out
                .stderr
                .contains("scienceqa/answers.jsonl' have a number as question_id"),
        "{}",
        out.stderr
    );
}

#[test]
fn vqav2_matches_mixed_ids_through_str() {
    // eval_vqav2.py printed "Samples: 3 / Accuracy: 66.67%".
    let out = score("VQAv2", "vqav2", "val.json", None).success();
    assert_eq!(printed(&out), ("66.67".into(), 3));
    assert!(
        out.stderr.contains("vqav2/answers.jsonl' mixes question ids written as strings (\"301\") and as numbers (302)")
            && out.stderr.contains("str()"),
        "{}",
        out.stderr
    );
}

#[test]
fn vizwiz_fails_on_an_id_of_the_other_type_as_coin_does() {
    // eval_vizwiz.py raised KeyError: '301' (the answer's "301" against the question's 301).
    let out = score("VizWiz", "vizwiz", "val.json", None).code(1);
    assert!(
        out.stderr
            .contains("vizwiz/answers.jsonl' mixes question ids"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(
            "question 301 of the answer file is not in the questions file as written (a string;"
        ),
        "{}",
        out.stderr
    );
}
