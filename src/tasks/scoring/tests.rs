use super::*;

fn q(id: &str, text: &str, answer: &str) -> TestRecord {
    TestRecord {
        question_id: Qid::text(id),
        image: Some(format!("{id}.png")),
        text: text.into(),
        answer: Some(answer.into()),
        answer_bbox: None,
        size: None,
        answers: None,
    }
}

fn a(id: &str, text: &str) -> AnswerRecord {
    AnswerRecord {
        question_id: Qid::text(id),
        prompt: String::new(),
        text: Some(text.into()),
        answer_id: serde_json::Value::Null,
        model_id: serde_json::Value::Null,
        metadata: serde_json::Value::Null,
    }
}

fn run(
    kind: ScorerKind,
    mode: ScoreMode,
    qs: &[TestRecord],
    ans: &[AnswerRecord],
    ann: Option<&Annotations>,
) -> ScoreReport {
    score(
        kind,
        mode,
        ScoreInput {
            questions: qs,
            answers: ans,
            annotations: ann,
        },
    )
    .unwrap()
}

/// The error text of a compat run without annotations that must fail.
fn compat_error(kind: ScorerKind, qs: &[TestRecord], ans: &[AnswerRecord]) -> String {
    score(
        kind,
        ScoreMode::Compat,
        ScoreInput {
            questions: qs,
            answers: ans,
            annotations: None,
        },
    )
    .unwrap_err()
    .to_string()
}

#[test]
fn names_accept_coin_spellings() {
    assert_eq!(ScorerKind::from_name("OCRVQA"), Some(ScorerKind::OCRVQA));
    assert_eq!(ScorerKind::from_name("ocr-vqa"), Some(ScorerKind::OCRVQA));
    assert_eq!(ScorerKind::from_name("vqav2"), Some(ScorerKind::VQAv2));
    assert_eq!(
        ScorerKind::from_name("scienceqa"),
        Some(ScorerKind::ScienceQA)
    );
    assert_eq!(
        ScorerKind::from_name("ImagetNet"),
        Some(ScorerKind::ImageNet)
    );
    assert_eq!(ScorerKind::from_name("mnist"), None);
    for k in ScorerKind::ALL {
        assert_eq!(ScorerKind::from_name(k.name()), Some(k));
    }
}

#[test]
fn imagenet_compat_substring_and_empty_credit() {
    let qs = [
        q("1", "Q\nI", "golden retriever"),
        q("2", "Q\nI", "cat"),
        q("3", "Q\nI", "dog"),
        q("4", "Q\nI", "Tiger"),
    ];
    // "retriever" ⊂ gt, gt ⊂ "a cat sitting", "" counts, "tiger" ≠ "Tiger" (case-sensitive).
    let ans = [
        a("1", "retriever"),
        a("2", "a cat sitting"),
        a("3", ""),
        a("4", "tiger"),
    ];
    let c = run(ScorerKind::ImageNet, ScoreMode::Compat, &qs, &ans, None);
    assert_eq!(c.n, 4);
    assert!((c.score - 75.0).abs() < 1e-9);
    let s = run(ScorerKind::ImageNet, ScoreMode::Strict, &qs, &ans, None);
    // strict: exact after lower-casing: only "tiger".
    assert!((s.score - 25.0).abs() < 1e-9, "{s:?}");
}

#[test]
fn imagenet_compat_is_index_aligned() {
    let qs = [q("1", "Q\nI", "cat"), q("2", "Q\nI", "dog")];
    // Answers in the other order: compat pairs them by position, strict by id.
    let ans = [a("2", "dog"), a("1", "cat")];
    assert_eq!(
        run(ScorerKind::ImageNet, ScoreMode::Compat, &qs, &ans, None).score,
        0.0
    );
    assert_eq!(
        run(ScorerKind::ImageNet, ScoreMode::Strict, &qs, &ans, None).score,
        100.0
    );
    // compat: zip stops at the shorter list; strict counts the missing answer as wrong.
    let c = run(
        ScorerKind::ImageNet,
        ScoreMode::Compat,
        &qs,
        &ans[1..],
        None,
    );
    assert_eq!((c.n, c.score), (1, 100.0));
    let s = run(
        ScorerKind::ImageNet,
        ScoreMode::Strict,
        &qs,
        &ans[1..],
        None,
    );
    assert_eq!((s.n, s.score), (2, 50.0));
}

#[test]
fn vizwiz_and_vqav2_compat_exact_match_case_insensitive() {
    for kind in [ScorerKind::VizWiz, ScorerKind::VQAv2] {
        let qs = [
            q("1", "Q\nI", "Yes"),
            q("2", "Q\nI", "2"),
            q("3", "Q\nI", "red"),
        ];
        let ans = [a("1", "YES"), a("2", "two"), a("3", "red.")];
        let c = run(kind, ScoreMode::Compat, &qs, &ans, None);
        assert!((c.score - 100.0 / 3.0).abs() < 1e-9, "{kind:?} {c:?}");
        // strict: EvalAI normalisation makes "two" = "2" and "red." = "red".
        let s = run(kind, ScoreMode::Strict, &qs, &ans, None);
        assert_eq!(s.score, 100.0);
    }
}

#[test]
fn vqa_strict_uses_soft_accuracy_when_ten_answers_exist() {
    let mut rec = q("1", "Q\nI", "red");
    rec.answers = Some(
        [
            "red", "red", "blue", "blue", "blue", "blue", "blue", "blue", "blue", "blue",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    );
    let c = run(
        ScorerKind::VQAv2,
        ScoreMode::Compat,
        std::slice::from_ref(&rec),
        &[a("1", "red")],
        None,
    );
    assert_eq!(c.score, 100.0);
    let s = run(
        ScorerKind::VQAv2,
        ScoreMode::Strict,
        &[rec],
        &[a("1", "red")],
        None,
    );
    let expected = 100.0 * (2.0 * (1.0 / 3.0) + 8.0 * (2.0 / 3.0)) / 10.0;
    assert!((s.score - expected).abs() < 1e-9, "{s:?}");
}

#[test]
fn ocrvqa_compat_skips_unanswerable_predictions() {
    let qs = [
        q("1", "Q\nI", "Unanswerable"),
        q("2", "Q\nI", "John Smith"),
        q("3", "Q\nI", "Cooking"),
    ];
    let ans = [
        a("1", "Unanswerable"),
        a("2", "john smith"),
        a("3", "cooking "),
    ];
    let c = run(ScorerKind::OCRVQA, ScoreMode::Compat, &qs, &ans, None);
    // 1 is skipped (wrong, still counted), 2 right, 3 wrong (trailing space).
    assert_eq!(c.n, 3);
    assert!((c.score - 100.0 / 3.0).abs() < 1e-9);
    let s = run(ScorerKind::OCRVQA, ScoreMode::Strict, &qs, &ans, None);
    assert_eq!(s.score, 100.0);
}

#[test]
fn gqa_compat_strips_trailing_periods_and_scores_only_predicted_balanced() {
    let mut ann = HashMap::new();
    ann.insert(
        "1".to_string(),
        GqaQuestion {
            answer: "yes".into(),
            is_balanced: true,
        },
    );
    ann.insert(
        "2".to_string(),
        GqaQuestion {
            answer: "left".into(),
            is_balanced: true,
        },
    );
    ann.insert(
        "3".to_string(),
        GqaQuestion {
            answer: "no".into(),
            is_balanced: false,
        },
    );
    ann.insert(
        "4".to_string(),
        GqaQuestion {
            answer: "red".into(),
            is_balanced: true,
        },
    );
    let ann = Annotations::GQA(ann);
    let qs = [
        q("1", "Q\nI", "yes"),
        q("2", "Q\nI", "left"),
        q("3", "Q\nI", "no"),
        q("4", "Q\nI", "red"),
    ];
    let ans = [a("1", " Yes."), a("2", "left "), a("3", "no")];
    let c = run(ScorerKind::GQA, ScoreMode::Compat, &qs, &ans, Some(&ann));
    // 1 wrong (" yes": CoIN trims nothing but periods), 2 wrong (trailing space kept),
    // 3 unbalanced skipped, 4 unpredicted skipped.
    assert_eq!(c.n, 2);
    assert_eq!(c.score, 0.0);
    let s = run(ScorerKind::GQA, ScoreMode::Strict, &qs, &ans, None);
    assert_eq!(s.n, 4);
    assert_eq!(s.score, 75.0);
    assert!(score(
        ScorerKind::GQA,
        ScoreMode::Compat,
        ScoreInput {
            questions: &qs,
            answers: &ans,
            annotations: None
        }
    )
    .is_err());
}

#[test]
fn scienceqa_parsers() {
    assert_eq!(sqa_parse_compat("B"), Some('B'));
    assert_eq!(sqa_parse_compat("C. the moon"), Some('C'));
    assert_eq!(sqa_parse_compat("I think it is a dog"), Some('I'));
    assert_eq!(sqa_parse_compat("answer: d"), Some('D'));
    assert_eq!(sqa_parse_compat("FAILED"), None);
    assert_eq!(sqa_parse_compat("F"), Some('F'));
    assert_eq!(sqa_parse_strict("B"), Some('B'));
    assert_eq!(sqa_parse_strict(" C. the moon"), Some('C'));
    assert_eq!(sqa_parse_strict("(D)"), Some('D'));
    assert_eq!(sqa_parse_strict("The answer is A."), Some('A'));
    assert_eq!(sqa_parse_strict("I think it is a dog"), None);
    assert_eq!(sqa_parse_strict("b"), None);
}

fn sqa_annotations() -> Annotations {
    let mut problems = HashMap::new();
    for (id, n, ans) in [("10", 2, 0), ("11", 3, 2), ("12", 4, 1), ("13", 2, 1)] {
        problems.insert(
            id.to_string(),
            SqaProblem {
                n_choices: n,
                answer: ans,
            },
        );
    }
    problems.insert(
        "99".into(),
        SqaProblem {
            n_choices: 2,
            answer: 0,
        },
    );
    Annotations::ScienceQA {
        problems,
        test_ids: vec!["10".into(), "11".into(), "12".into(), "13".into()],
    }
}

#[test]
fn scienceqa_compat_and_strict() {
    let ann = sqa_annotations();
    let qs = [
        q("10", "Which?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly.", "A"),
        q("11", "Which?\nA. x\nB. y\nC. z\nAnswer with the option's letter from the given choices directly.", "C"),
        q("12", "Which?\nA. x\nB. y\nC. z\nD. w\nAnswer with the option's letter from the given choices directly.", "B"),
        q("13", "Which?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly.", "B"),
    ];
    // 10: "a dog" → 'A' by the single-letter-word rule (compat right, strict wrong);
    // 11: "C. z" right in both; 12: "E" beyond the choices: wrong in both; 13: no answer.
    let ans = [a("10", "a dog"), a("11", "C. z"), a("12", "E")];
    let c = run(
        ScorerKind::ScienceQA,
        ScoreMode::Compat,
        &qs,
        &ans,
        Some(&ann),
    );
    assert_eq!(c.n, 4);
    assert_eq!(c.score, 50.0);
    let s = run(
        ScorerKind::ScienceQA,
        ScoreMode::Strict,
        &qs,
        &ans,
        Some(&ann),
    );
    assert_eq!(s.score, 25.0);
    // strict without annotations: the questions file's letters and option counts.
    let s2 = run(ScorerKind::ScienceQA, ScoreMode::Strict, &qs, &ans, None);
    assert_eq!(s2.score, 25.0);
    assert!(score(
        ScorerKind::ScienceQA,
        ScoreMode::Compat,
        ScoreInput {
            questions: &qs,
            answers: &ans,
            annotations: None
        }
    )
    .is_err());
}

#[test]
fn textvqa_compat_soft_accuracy_and_ten_answer_rule() {
    let ten: Vec<String> = [
        "Coca-Cola",
        "coca cola",
        "coca cola",
        "coke",
        "coke",
        "coke",
        "coke",
        "pepsi",
        "the coke",
        "coke",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut map = HashMap::new();
    map.insert("img1".to_string(), ten.clone());
    map.insert("img2".to_string(), vec!["x".to_string(); 3]);
    let ann = Annotations::TextVQA(map);
    let qs = [
        q(
            "img1",
            "What brand?\nAnswer the question using a single word or phrase.",
            "coke",
        ),
        q(
            "img2",
            "What?\nAnswer the question using a single word or phrase.",
            "x",
        ),
    ];
    let mut ans1 = a("img1", "Coca-Cola.");
    ans1.prompt = qs[0].text.clone();
    let c = run(
        ScorerKind::TextVQA,
        ScoreMode::Compat,
        &qs[..1],
        std::slice::from_ref(&ans1),
        Some(&ann),
    );
    // "coca cola" appears 3 times among the normalised answers → soft score 0.9.
    assert!((c.score - 90.0).abs() < 1e-9, "{c:?}");
    let mut ans2 = a("img2", "x");
    ans2.prompt = qs[1].text.clone();
    let e = score(
        ScorerKind::TextVQA,
        ScoreMode::Compat,
        ScoreInput {
            questions: &qs,
            answers: &[ans1.clone(), ans2.clone()],
            annotations: Some(&ann),
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("requires 10"), "{e}");
    // strict: fewer than 10 answers use min(1, matches/3): 3 matches → 1.
    let s = run(
        ScorerKind::TextVQA,
        ScoreMode::Strict,
        &qs,
        &[ans1, ans2],
        Some(&ann),
    );
    assert!((s.score - 95.0).abs() < 1e-9, "{s:?}");
    // strict without annotations: the single answer of the questions file, normalised.
    let s2 = run(
        ScorerKind::TextVQA,
        ScoreMode::Strict,
        &qs,
        &[a("img1", "The Coke"), a("img2", "y")],
        None,
    );
    assert_eq!(s2.score, 50.0);
}

#[test]
fn grounding_parsers_and_iou() {
    // compat drops the last digit of y2 (and the first character).
    assert_eq!(
        bbox_parse_compat("[0.12, 0.34, 0.56, 0.78]"),
        Some([0.12, 0.34, 0.56, 0.7])
    );
    assert_eq!(
        bbox_parse_compat("[1.0, 0.5, 0.9, 0.9]"),
        Some([0.0, 0.5, 0.9, 0.0])
    );
    assert_eq!(bbox_parse_compat("[0.1, 0.2, 0.3]"), None);
    assert_eq!(bbox_parse_compat("no box"), None);
    assert_eq!(
        bbox_parse_strict("[0.12, 0.34, 0.56, 0.78]"),
        Some([0.12, 0.34, 0.56, 0.78])
    );
    assert_eq!(
        bbox_parse_strict("The box is (1, 2, 3, 4)."),
        Some([1.0, 2.0, 3.0, 4.0])
    );
    assert_eq!(bbox_parse_strict("[0.1, 0.2, 0.3]"), None);
    assert_eq!(
        bbox_parse_gt("[0.1, 0.2, 0.5, 0.9]"),
        Some([0.1, 0.2, 0.5, 0.9])
    );
    assert!((iou([0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 1.5, 1.0]) - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(iou([0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0]), 0.0);
    assert_eq!(iou([1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]), 0.0);
}

#[test]
fn grounding_compat_and_strict() {
    let mut g1 = q("1", "the red square\nPlease provide the bounding box coordinate of the region this sentence describes.", "");
    g1.answer = None;
    g1.answer_bbox = Some("[0.10, 0.10, 0.50, 0.59]".into());
    g1.size = Some([64.0, 64.0]);
    let mut g2 = g1.clone();
    g2.question_id = Qid::text("2");
    g2.answer_bbox = Some("[0.0, 0.0, 0.5, 0.5]".into());
    // g1: y2 0.59 truncated to 0.5 → IoU 0.4/0.49 = 0.816 → still right; g2: exact but
    // "0.5" → "0." ... the y2 "0.50" → "0.5": right. Then a near miss: g3.
    let mut g3 = g1.clone();
    g3.question_id = Qid::text("3");
    g3.answer_bbox = Some("[0.1, 0.1, 0.2, 0.19]".into());
    let qs = [g1, g2, g3];
    let ans = [
        a("1", "[0.10, 0.10, 0.50, 0.59]"),
        a("2", "[0.00, 0.00, 0.50, 0.50]"),
        a("3", "[0.10, 0.10, 0.20, 0.19]"),
    ];
    // g3 compat: y2 0.19 → 0.1 → zero-height box → IoU 0 → wrong.
    let c = run(ScorerKind::Grounding, ScoreMode::Compat, &qs, &ans, None);
    assert!((c.score - 200.0 / 3.0).abs() < 1e-9, "{c:?}");
    let s = run(ScorerKind::Grounding, ScoreMode::Strict, &qs, &ans, None);
    assert_eq!(s.score, 100.0);
    // strict counts unanswered questions as wrong; compat only scores the answers given.
    let s = run(
        ScorerKind::Grounding,
        ScoreMode::Strict,
        &qs,
        &ans[..1],
        None,
    );
    assert!((s.score - 100.0 / 3.0).abs() < 1e-9);
    let c = run(
        ScorerKind::Grounding,
        ScoreMode::Compat,
        &qs,
        &ans[..1],
        None,
    );
    assert_eq!((c.n, c.score), (1, 100.0));
}

#[test]
fn strict_rejects_unknown_and_duplicate_answers() {
    let qs = [q("1", "Q\nI", "x")];
    for ans in [vec![a("2", "x")], vec![a("1", "x"), a("1", "y")]] {
        assert!(score(
            ScorerKind::VQAv2,
            ScoreMode::Strict,
            ScoreInput {
                questions: &qs,
                answers: &ans,
                annotations: None
            }
        )
        .is_err());
    }
    // compat: an unknown id is an error too (CoIN's dict lookup raises KeyError).
    assert!(score(
        ScorerKind::VQAv2,
        ScoreMode::Compat,
        ScoreInput {
            questions: &qs,
            answers: &[a("2", "x")],
            annotations: None
        }
    )
    .is_err());
}

#[test]
fn annotations_load_from_files() {
    let d = tempfile::tempdir().unwrap();
    #[allow(clippy::disallowed_methods)]
    {
        std::fs::write(
            d.path().join("problems.json"),
            r#"{"10": {"choices": ["a", "b"], "answer": 1, "split": "test"}}"#,
        )
        .unwrap();
        std::fs::write(
            d.path().join("pid_splits.json"),
            r#"{"train": [1, 2, {"x": [3]}], "test": ["10", 11]}"#,
        )
        .unwrap();
        std::fs::write(
            d.path().join("tv.json"),
            r#"{"data": [{"question_id": 7, "image_id": "i", "question": "What?", "answers": ["a"]}]}"#,
        )
        .unwrap();
        std::fs::write(
            d.path().join("gqa.json"),
            r#"{"q1": {"answer": "no", "isBalanced": true}}"#,
        )
        .unwrap();
    }
    let Annotations::ScienceQA { problems, test_ids } =
        load_annotations(ScorerKind::ScienceQA, d.path()).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        (problems["10"].answer, problems["10"].n_choices, test_ids),
        (1, 2, vec!["10".to_string(), "11".to_string()])
    );
    let Annotations::TextVQA(t) =
        load_annotations(ScorerKind::TextVQA, &d.path().join("tv.json")).unwrap()
    else {
        panic!()
    };
    assert!(t.contains_key("7"));
    let Annotations::GQA(g) =
        load_annotations(ScorerKind::GQA, &d.path().join("gqa.json")).unwrap()
    else {
        panic!()
    };
    assert_eq!(g["q1"].answer, "no");
    assert!(load_annotations(ScorerKind::GQA, &d.path().join("missing.json")).is_err());
}

#[test]
fn scoring_no_question_is_an_error_for_every_scorer_and_mode() {
    let empty_sqa = Annotations::ScienceQA {
        problems: HashMap::new(),
        test_ids: Vec::new(),
    };
    let tv = Annotations::TextVQA(HashMap::new());
    let unbalanced = Annotations::GQA(HashMap::from([(
        "1".to_string(),
        GqaQuestion {
            answer: "yes".into(),
            is_balanced: false,
        },
    )]));
    let qs = [q("1", "Q\nI", "[0.1, 0.1, 0.5, 0.5]")];
    for kind in ScorerKind::ALL {
        for mode in [ScoreMode::Compat, ScoreMode::Strict] {
            let ann = match (kind, mode) {
                (ScorerKind::ScienceQA, ScoreMode::Compat) => Some(&empty_sqa),
                (ScorerKind::TextVQA, ScoreMode::Compat) => Some(&tv),
                (ScorerKind::GQA, ScoreMode::Compat) => Some(&unbalanced),
                _ => None,
            };
            // No answers at all (with and without questions); answers but nothing scored,
            // where a scorer can get there (elsewhere an answer to an unknown question is its
            // own error).
            let answer = [a("1", "yes")];
            let no_answers: &[AnswerRecord] = &[];
            let mut cases: Vec<(&[TestRecord], &[AnswerRecord])> =
                vec![(&qs, no_answers), (&[], no_answers)];
            if mode == ScoreMode::Compat && matches!(kind, ScorerKind::ScienceQA | ScorerKind::GQA)
            {
                cases.push((&[], &answer));
            }
            for (questions, answers) in cases {
                let e = score(
                    kind,
                    mode,
                    ScoreInput {
                        questions,
                        answers,
                        annotations: ann,
                    },
                )
                .unwrap_err();
                assert!(
                    matches!(e, TaskError::NothingScored { .. }),
                    "{kind:?} {mode:?}: {e}"
                );
                assert!(e.to_string().contains("no question was scored"), "{e}");
            }
        }
    }
    // Compat GQA: answers exist but none is a balanced question.
    let e = score(
        ScorerKind::GQA,
        ScoreMode::Compat,
        ScoreInput {
            questions: &qs,
            answers: &[a("1", "yes")],
            annotations: Some(&unbalanced),
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.ends_with("no answered question is a balanced question of the annotation file"),
        "{e}"
    );
    let e = score(
        ScorerKind::OCRVQA,
        ScoreMode::Strict,
        ScoreInput {
            questions: &[],
            answers: &[],
            annotations: None,
        },
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "cannot score OCR-VQA: no question was scored, the answer file holds no answers"
    );
}

#[test]
fn ids_from_files_are_escaped_in_scoring_errors() {
    let qs = [q("1", "Q\nI", "yes")];
    let e = score(
        ScorerKind::VQAv2,
        ScoreMode::Compat,
        ScoreInput {
            questions: &qs,
            answers: &[a("\u{1b}]0;pwned\u{7}", "yes")],
            annotations: None,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(!e.contains('\u{1b}') && !e.contains('\u{7}'), "{e:?}");
    assert!(
        e.contains("question \\u{1b}]0;pwned\\u{7} of the answer file"),
        "{e}"
    );
}

/// A record with its `question_id` parsed from JSON (`132` or `"132"`), keeping its type.
fn with_id<T: Clone>(rec: &T, json_id: &str, set: impl Fn(&mut T, Qid)) -> T {
    let mut r = rec.clone();
    set(&mut r, serde_json::from_str(json_id).unwrap());
    r
}

#[test]
fn compat_matches_ids_as_each_coin_scorer_does() {
    let qs = [
        with_id(&q("x", "Q\nI", "yes"), "301", |r, id| r.question_id = id),
        with_id(&q("x", "Q\nI", "no"), "\"302\"", |r, id| r.question_id = id),
    ];
    let ans = [
        with_id(&a("x", "yes"), "301.0", |r, id| r.question_id = id),
        with_id(&a("x", "no"), "302", |r, id| r.question_id = id),
    ];
    // eval_vqav2.py: str() on both sides, so 302 finds "302", but 301.0 is "301.0".
    let e = compat_error(ScorerKind::VQAv2, &qs, &ans);
    assert!(
        e.contains("question 301.0 of the answer file is not in the questions file"),
        "{e}"
    );
    let c = run(ScorerKind::VQAv2, ScoreMode::Compat, &qs, &ans[1..], None);
    assert_eq!((c.n, c.score), (1, 100.0));
    // eval_vizwiz.py: as written, so 301.0 finds 301 and 302 does not find "302".
    let c = run(ScorerKind::VizWiz, ScoreMode::Compat, &qs, &ans[..1], None);
    assert_eq!((c.n, c.score), (1, 100.0));
    let e = compat_error(ScorerKind::VizWiz, &qs, &ans);
    assert!(
        e.contains(
            "question 302 of the answer file is not in the questions file as written (a number;"
        ),
        "{e}"
    );
    // Strict matches by text: 301.0 is not 301, 302 is "302".
    let s = run(ScorerKind::VizWiz, ScoreMode::Strict, &qs, &ans[1..], None);
    assert_eq!((s.n, s.score), (2, 50.0));
}

#[test]
fn compat_gqa_and_scienceqa_never_match_number_ids() {
    let mut ann = HashMap::new();
    ann.insert(
        "7".to_string(),
        GqaQuestion {
            answer: "yes".into(),
            is_balanced: true,
        },
    );
    let ann = Annotations::GQA(ann);
    let qs = [q("7", "Q\nI", "yes")];
    let ans = [with_id(&a("x", "yes"), "7", |r, id| r.question_id = id)];
    let e = score(
        ScorerKind::GQA,
        ScoreMode::Compat,
        ScoreInput {
            questions: &qs,
            answers: &ans,
            annotations: Some(&ann),
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("question 7 is not in the annotation file (it is written as a number"),
        "{e}"
    );
    assert_eq!(
        run(ScorerKind::GQA, ScoreMode::Strict, &qs, &ans, None).score,
        100.0
    );

    let mut problems = HashMap::new();
    problems.insert(
        "7".to_string(),
        SqaProblem {
            n_choices: 2,
            answer: 0,
        },
    );
    let sqa = Annotations::ScienceQA {
        problems,
        test_ids: vec!["7".into()],
    };
    let ans = [with_id(&a("x", "A"), "7", |r, id| r.question_id = id)];
    let c = run(
        ScorerKind::ScienceQA,
        ScoreMode::Compat,
        &qs,
        &ans,
        Some(&sqa),
    );
    assert_eq!((c.n, c.score), (1, 0.0));
    let w = id_warning(
        ScorerKind::ScienceQA,
        ScoreMode::Compat,
        &ans,
        Path::new("m.jsonl"),
    )
    .unwrap();
    assert!(
        w.starts_with("1 answer line(s) of 'm.jsonl' have a number"),
        "{w}"
    );
    assert!(id_warning(
        ScorerKind::ScienceQA,
        ScoreMode::Strict,
        &ans,
        Path::new("m")
    )
    .is_none());
    let c = run(
        ScorerKind::ScienceQA,
        ScoreMode::Compat,
        &qs,
        &[a("7", "A")],
        Some(&sqa),
    );
    assert_eq!(c.score, 100.0);
}

#[test]
fn id_warning_names_the_file_and_the_consequence() {
    let ans = [
        a("1", "x"),
        with_id(&a("x", "y"), "2", |r, id| r.question_id = id),
    ];
    let f = Path::new("dir/merge.jsonl");
    for (kind, mode, says) in [
        (ScorerKind::VQAv2, ScoreMode::Compat, "str()"),
        (
            ScorerKind::OCRVQA,
            ScoreMode::Compat,
            "looks ids up as written",
        ),
        (ScorerKind::ImageNet, ScoreMode::Compat, "by line"),
        (
            ScorerKind::OCRVQA,
            ScoreMode::Strict,
            "strict mode treats 12 and \"12\" as the same",
        ),
    ] {
        let w = id_warning(kind, mode, &ans, f).unwrap();
        assert!(
            w.starts_with("'dir/merge.jsonl' mixes question ids written as strings (\"1\") and as numbers (2)")
                && w.contains(says),
            "{w}"
        );
    }
    assert!(id_warning(ScorerKind::OCRVQA, ScoreMode::Compat, &ans[..1], f).is_none());
}

#[test]
fn grounding_compat_scales_before_the_iou() {
    // From tests/fixtures/compat/grounding: IoU 0.5 up to one ulp. On the normalised boxes it
    // is 0.5000000000000001; scaled by 640 (CoIN) 0.49999999999999994.
    let (pred, gt) = ([0.12, 0.03, 0.62, 0.26], [0.12, 0.03, 0.62, 0.49]);
    assert!(iou_compat(pred, gt) > 0.5);
    assert!(!grounding_hit_compat(pred, gt, [640.0, 480.0]));
    // And the other way round.
    let (pred, gt) = ([0.63, 0.57, 0.97, 0.585], [0.63, 0.57, 0.97, 0.6]);
    assert!(iou_compat(pred, gt) <= 0.5);
    assert!(grounding_hit_compat(pred, gt, [612.0, 612.0]));
    // The parser trims nothing before dropping the first character.
    assert_eq!(
        bbox_parse_compat(" [-0.3, 0.0, 0.4, 1.05]"),
        Some([-0.3, 0.0, 0.4, 1.0])
    );
    // Without a size CoIN raises KeyError; compat says so.
    let mut g = q("g", "Q\nI", "");
    g.answer = None;
    g.answer_bbox = Some("[0.1, 0.1, 0.5, 0.5]".into());
    let e = score(
        ScorerKind::Grounding,
        ScoreMode::Compat,
        ScoreInput {
            questions: &[g.clone()],
            answers: &[a("g", "[0.1, 0.1, 0.5, 0.51]")],
            annotations: None,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("question g has no \"size\""), "{e}");
    g.size = Some([10.0, 20.0]);
    let c = run(
        ScorerKind::Grounding,
        ScoreMode::Compat,
        &[g],
        &[a("g", "[0.1, 0.1, 0.5, 0.51]")],
        None,
    );
    assert_eq!(c.score, 100.0);
}

#[test]
fn compat_percentages_follow_coins_order_of_operations() {
    // 23 of 160: `c / n * 100` is 14.374999…, `100 * c / n` is 14.375; CoIN prints them with
    // `%.2f` as 14.37 and 14.38.
    let qs: Vec<TestRecord> = (0..160).map(|i| q(&i.to_string(), "Q\nI", "yes")).collect();
    let ans: Vec<AnswerRecord> = (0..160)
        .map(|i| a(&i.to_string(), if i < 23 { "yes" } else { "no" }))
        .collect();
    let printed = |r: &ScoreReport| format!("{:.2}", r.score);
    // eval_vizwiz.py / eval_ocrvqa.py …: 100. * right / total.
    let r = run(ScorerKind::VizWiz, ScoreMode::Compat, &qs, &ans, None);
    assert_eq!((printed(&r), r.n), ("14.38".to_string(), 160));
    let r = run(ScorerKind::OCRVQA, ScoreMode::Compat, &qs, &ans, None);
    assert_eq!(printed(&r), "14.38");
    // eval_gqa.py: avg(l) * 100.
    let gqa: HashMap<String, GqaQuestion> = (0..160)
        .map(|i| {
            let q = GqaQuestion {
                answer: "yes".into(),
                is_balanced: true,
            };
            (i.to_string(), q)
        })
        .collect();
    let ann = Annotations::GQA(gqa);
    let r = run(ScorerKind::GQA, ScoreMode::Compat, &qs, &ans, Some(&ann));
    assert_eq!(printed(&r), "14.37");
    // Strict keeps 100 * c / n.
    let r = run(ScorerKind::GQA, ScoreMode::Strict, &qs, &ans, None);
    assert_eq!(printed(&r), "14.38");
    // eval_science_qa.py: correct / total * 100.
    let problems = (0..160)
        .map(|i| {
            let p = SqaProblem {
                n_choices: 2,
                answer: 0,
            };
            (i.to_string(), p)
        })
        .collect();
    let ann = Annotations::ScienceQA {
        problems,
        test_ids: (0..160).map(|i: i32| i.to_string()).collect(),
    };
    let sqa: Vec<AnswerRecord> = (0..160)
        .map(|i| a(&i.to_string(), if i < 23 { "A" } else { "B" }))
        .collect();
    let r = run(
        ScorerKind::ScienceQA,
        ScoreMode::Compat,
        &qs,
        &sqa,
        Some(&ann),
    );
    assert_eq!(printed(&r), "14.37");
    // TextVQA: 100. * (sum / n): 0.1437499… * 100 here too.
    let ten = |s: &str| vec![s.to_string(); 10];
    let tv: HashMap<String, Vec<String>> = (0..160).map(|i| (i.to_string(), ten("yes"))).collect();
    let ann = Annotations::TextVQA(tv);
    let r = run(
        ScorerKind::TextVQA,
        ScoreMode::Compat,
        &qs,
        &ans,
        Some(&ann),
    );
    assert_eq!(printed(&r), format!("{:.2}", 100.0 * (23.0_f64 / 160.0)));
}

#[test]
fn compat_keeps_the_later_of_two_questions_with_one_id() {
    // eval_vizwiz.py L18 builds a dict from the list: the later record wins.
    let qs = [q("7", "Q\nI", "red"), q("7", "Q\nI", "blue")];
    let ans = [a("7", "BLUE")];
    for kind in [ScorerKind::VizWiz, ScorerKind::VQAv2, ScorerKind::OCRVQA] {
        let r = run(kind, ScoreMode::Compat, &qs, &ans, None);
        assert_eq!((r.n, r.score), (1, 100.0), "{kind:?}");
    }
    let f = Path::new("dir/val.json");
    let w = questions_warning(ScorerKind::VizWiz, ScoreMode::Compat, &qs, f).unwrap();
    assert!(
        w.starts_with("1 record(s) of 'dir/val.json' repeat a question id (first: 7)")
            && w.contains("keeps the later record"),
        "{w}"
    );
    assert!(questions_warning(ScorerKind::VizWiz, ScoreMode::Compat, &qs[..1], f).is_none());
    assert!(questions_warning(ScorerKind::VizWiz, ScoreMode::Strict, &qs, f).is_none());
    assert!(questions_warning(ScorerKind::ImageNet, ScoreMode::Compat, &qs, f).is_none());
}

#[test]
fn id_type_warning_names_both_files() {
    let qs = [
        with_id(&q("x", "Q\nI", "yes"), "301", |r, id| r.question_id = id),
        with_id(&q("x", "Q\nI", "no"), "302", |r, id| r.question_id = id),
    ];
    let (af, qf) = (Path::new("merge.jsonl"), Path::new("val.json"));
    let strings = [a("301", "yes")];
    let floats = [with_id(&a("x", "yes"), "301.0", |r, id| r.question_id = id)];
    // VizWiz looks ids up as written: "301" is not 301 (CoIN: KeyError), 301.0 is.
    let w = id_type_warning(ScorerKind::VizWiz, ScoreMode::Compat, &qs, &strings, af, qf).unwrap();
    assert!(
        w.starts_with("'merge.jsonl' writes question id 301 as a string, and no id of 'val.json' is written so [eval_vizwiz.py L18, L25]")
            && w.contains("KeyError"),
        "{w}"
    );
    assert!(id_type_warning(ScorerKind::VizWiz, ScoreMode::Compat, &qs, &floats, af, qf).is_none());
    // VQAv2 converts with str(): "301" is 301, 301.0 is "301.0".
    assert!(id_type_warning(ScorerKind::VQAv2, ScoreMode::Compat, &qs, &strings, af, qf).is_none());
    let w = id_type_warning(ScorerKind::VQAv2, ScoreMode::Compat, &qs, &floats, af, qf).unwrap();
    assert!(w.contains("as a float"), "{w}");
    // Strict mode and the scorers that do not look answers up in the questions file: nothing.
    for (kind, mode) in [
        (ScorerKind::VizWiz, ScoreMode::Strict),
        (ScorerKind::ImageNet, ScoreMode::Compat),
        (ScorerKind::TextVQA, ScoreMode::Compat),
    ] {
        assert!(id_type_warning(kind, mode, &qs, &strings, af, qf).is_none());
    }
}

#[test]
fn scienceqa_compat_upper_cases_the_whole_word() {
    // `res[0].upper()` of "ß" is "SS": no option, not "S".
    assert_eq!(sqa_parse_compat("ß"), None);
    assert_eq!(sqa_parse_compat("b"), Some('B'));
    assert_eq!(sqa_parse_compat("x ß b"), Some('X'));
}

#[test]
fn imagenet_compat_reads_every_questions_answer() {
    // eval_ImagetNet.py L17 reads `answer` of every question, answered or not.
    let mut unanswered = q("2", "Q\nI", "dog");
    unanswered.answer = None;
    let qs = [q("1", "Q\nI", "cat"), unanswered];
    let e = compat_error(ScorerKind::ImageNet, &qs, &[a("1", "cat")]);
    assert!(e.contains("question 2 has no \"answer\""), "{e}");
}

#[test]
fn compat_stops_at_an_answer_line_without_text_as_coin_does() {
    let qs = [q("1", "Q\nI", "yes"), q("2", "Q\nI", "no")];
    let mut none = a("2", "");
    none.text = None;
    let ans = [a("1", "yes"), none];
    for kind in [
        ScorerKind::VizWiz,
        ScorerKind::VQAv2,
        ScorerKind::OCRVQA,
        ScorerKind::ImageNet,
    ] {
        let e = compat_error(kind, &qs, &ans);
        assert!(
            e.contains("the answer line for question 2 has no \"text\""),
            "{kind:?}: {e}"
        );
        // Strict scores it as an empty answer.
        let r = run(kind, ScoreMode::Strict, &qs, &ans, None);
        assert_eq!((r.n, r.score), (2, 50.0), "{kind:?}");
    }
    // Grounding catches it (eval_grounding.py L69-75): wrong, counted.
    let mut g = q("2", "Q\nI", "");
    g.answer_bbox = Some("[0.1, 0.1, 0.5, 0.5]".into());
    g.size = Some([10.0, 10.0]);
    let r = run(
        ScorerKind::Grounding,
        ScoreMode::Compat,
        &[g],
        &ans[1..],
        None,
    );
    assert_eq!((r.n, r.score), (1, 0.0));
}

#[test]
fn grounding_compat_reads_numbers_as_python_float_does() {
    // float() takes single underscores between digits (PEP 515).
    assert_eq!(py_float(" 0.1_0 "), Some(0.1));
    assert_eq!(py_float("1e1_0"), Some(1e10));
    for bad in ["1__0", "_1", "1_", "1_.5", "0.5e0_", "in_f", ""] {
        assert_eq!(py_float(bad), None, "{bad}");
    }
    assert_eq!(
        bbox_parse_compat(" [0.1_0, 0.1, 0.5, 0.55]"),
        Some([0.1, 0.1, 0.5, 0.5])
    );
}

#[test]
fn grounding_compat_needs_answer_bbox_strict_takes_answer() {
    // eval_grounding.py L63 reads `answer_bbox`; strict falls back to `answer`.
    let mut g = q("1", "Q\nI", "[0.1, 0.1, 0.5, 0.5]");
    g.size = Some([10.0, 10.0]);
    let ans = [a("1", " [0.1, 0.1, 0.5, 0.51]")];
    let e = compat_error(ScorerKind::Grounding, std::slice::from_ref(&g), &ans);
    assert!(e.contains("question 1 has no \"answer_bbox\""), "{e}");
    let r = run(ScorerKind::Grounding, ScoreMode::Strict, &[g], &ans, None);
    assert_eq!((r.n, r.score), (1, 100.0));
}
