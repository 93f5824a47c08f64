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
    // The error names both files.
    assert!(
        out.stderr.contains("Hint: Check the files: --questions '")
            && out.stderr.contains("vizwiz/answers.jsonl'."),
        "{}",
        out.stderr
    );
}

#[test]
fn textvqa_normalises_and_averages_as_m4c_evaluator() {
    // eval_textvqa.py printed "Samples: 80 / Accuracy: 25.87%". 100 * (sum / n), as CoIN
    // computes it, prints 25.87; 100 * sum / n prints 25.88. "x" followed by 40 periods keeps
    // 8 of them (re.sub's count is re.UNICODE = 32), "red\x1fcar" is "red car" (Python's
    // split() breaks at U+001F), "" matches the answers "?" (normalised to "").
    let out = score(
        "TextVQA",
        "textvqa",
        "test.json",
        Some("TextVQA_0.5.1_val.json"),
    )
    .success();
    assert_eq!(printed(&out), ("25.87".into(), 80));
}

#[test]
fn imagenet_pairs_by_line_and_matches_substrings() {
    // eval_ImagetNet.py printed "Samples: 12 / Accuracy: 58.33%": ids are not read, "cat" is
    // right for "bobcat", "" is right, "Cat" and "café" against "cafe\u{301}" are wrong, the two
    // questions without an answer line are not counted.
    let out = score("ImageNet", "imagenet", "test.json", None).success();
    assert_eq!(printed(&out), ("58.33".into(), 12));
}

#[test]
fn ocrvqa_skips_unanswerable_and_lower_cases() {
    // eval_ocrvqa.py printed "Samples: 0 / Accuracy: 53.33%" (8 of 15 lines; its sample count
    // is always 0): "Unanswerable" is skipped even when right, "UNANSWERABLE" is not; "Straße"
    // is not "STRASSE" lower-cased; the final sigma of "ΟΔΟΣ"; 7.0 finds question 7.
    let out = score("OCR-VQA", "ocrvqa", "test.json", None).success();
    assert_eq!(printed(&out), ("53.33".into(), 15));
}

#[test]
fn vizwiz_and_vqav2_compare_upper_case() {
    // eval_vizwiz.py and eval_vqav2.py both printed "Samples: 11 / Accuracy: 72.73%":
    // "Straße" = "STRASSE", "ﬁsh" = "FISH", "ǆ" = "ǅ", "i" = "ı" once upper-cased; " red",
    // "yes." and "two" are wrong. VizWiz finds question 7 by 7.0, VQAv2 by "7".
    for (task, dir) in [("VizWiz", "vizwiz_case"), ("VQAv2", "vqav2_case")] {
        let out = score(task, dir, "val.json", None).success();
        assert_eq!(printed(&out), ("72.73".into(), 11), "{task}");
    }
}

#[test]
fn scienceqa_percentage_is_correct_over_total_times_100() {
    // eval_science_qa.py printed "Total: 160, Correct: 23, Accuracy: 14.37%": 23 / 160 * 100
    // is 14.374999…, while 100 * 23 / 160 is 14.375 and prints 14.38.
    let out = score("ScienceQA", "scienceqa_rounding", "test.json", Some("")).success();
    assert_eq!(printed(&out), ("14.37".into(), 160));
}

#[test]
fn gqa_percentage_is_average_times_100() {
    // eval_gqa.py printed "Accuracy: 14.37%" (avg(l) * 100 with 23 of 160 balanced answers;
    // unbalanced and unanswered questions do not count, the later line for 5000 wins).
    let out = score(
        "GQA",
        "gqa_rounding",
        "test.json",
        Some("testdev_balanced_questions.json"),
    )
    .success();
    assert_eq!(printed(&out), ("14.37".into(), 160));
}

#[test]
fn printed_line_rounds_as_coin_prints() {
    // The text line prints `%.2f` of the same number (half-even on the exact binary value,
    // as Python's format does).
    let env = TestEnvironment::new();
    let dir = "scienceqa_rounding";
    let (q, a, ann) = (
        fixture(&format!("{dir}/test.json")),
        fixture(&format!("{dir}/answers.jsonl")),
        fixture(dir),
    );
    let out = env
        .coin(&[
            "score",
            "--task",
            "ScienceQA",
            "--questions",
            &q,
            "--answers",
            &a,
            "--annotations",
            &ann,
        ])
        .success();
    assert_eq!(
        out.stdout,
        "ScienceQA accuracy (compat): 14.37 over 160 questions\n"
    );
}

#[test]
fn grounding_parses_boxes_as_python_does() {
    // eval_grounding.py printed "Samples: 16 / Accuracy: 43.75%": "0.1_0" is 0.1 for float(),
    // "0.1__0" is an error, a null text is wrong but counted, "+0.1", "1e-1", NaN, newlines
    // and spaces around the box, and the later of two records for "gdup" is the one that counts.
    let out = score("Grounding", "grounding_case", "test.json", None).success();
    assert_eq!(printed(&out), ("43.75".into(), 16));
    assert!(
        out.stderr
            .contains("grounding_case/test.json' repeat a question id (first: gdup)"),
        "{}",
        out.stderr
    );
}
