#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;

use crate::history::CheckpointId;
use serde_json::json;

use super::*;
use crate::history::{CommitRequest, EvalRecord};
use crate::metrics::{parse_matrix_csv, parse_matrix_json};

pub(crate) struct Fixture {
    pub dir: tempfile::TempDir,
    pub repo: CoinRepo,
    n: usize,
}

pub(crate) fn record(score: f64) -> EvalRecord {
    EvalRecord {
        metric: "accuracy".into(),
        score,
        n: 10,
        extra: BTreeMap::new(),
    }
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        CoinRepo::init(dir.path()).expect("init");
        let repo = CoinRepo::open(dir.path()).expect("open");
        Fixture { dir, repo, n: 0 }
    }

    /// Commit a checkpoint trained on `task` (or a base checkpoint when `base`) with eval
    /// records in its tree.
    pub fn commit(&mut self, task: &str, base: bool, evals: &[(&str, f64)]) -> CheckpointId {
        self.n += 1;
        let file = self.dir.path().join(format!("w{}.bin", self.n));
        std::fs::write(&file, format!("weights {}", self.n)).expect("write");
        let mut train_extra = BTreeMap::new();
        if base {
            train_extra.insert(KIND_FIELD.to_string(), json!(KIND_BASE));
        }
        let req = CommitRequest {
            paths: vec![file],
            task: task.to_string(),
            evals: evals
                .iter()
                .map(|(t, s)| (t.to_string(), record(*s)))
                .collect(),
            train_extra,
            ..CommitRequest::default()
        };
        self.repo.commit(&req).expect("commit").id
    }

    pub fn note(&self, id: CheckpointId, evals: &[(&str, f64)]) {
        let recs: BTreeMap<String, EvalRecord> = evals
            .iter()
            .map(|(t, s)| (t.to_string(), record(*s)))
            .collect();
        self.repo.add_eval_records(id, &recs).expect("note");
    }
}

#[test]
fn rows_columns_and_null_cells() {
    let mut f = Fixture::new();
    f.commit("A", false, &[("A", 80.0)]);
    f.commit("B", false, &[("A", 70.0), ("B", 90.0)]);
    let tip = f.commit("C", false, &[("B", 85.0), ("C", 60.0)]);
    let bm = build_matrix(&f.repo, tip).expect("matrix");
    assert_eq!(bm.matrix.tasks, ["A", "B", "C"]);
    assert_eq!(
        bm.matrix.rows,
        vec![
            vec![Some(80.0), None, None],
            vec![Some(70.0), Some(90.0), None],
            vec![None, Some(85.0), Some(60.0)],
        ]
    );
    assert_eq!(bm.checkpoints.len(), 3);
    assert_eq!(bm.checkpoints[2].id, tip);
    assert!(bm.zero_shot.is_none());
    let m = bm.metrics(ForgettingMode::MaxEarlier).expect("metrics");
    assert_eq!(m.mft, Some((80.0 + 90.0 + 60.0) / 3.0));
    assert_eq!(
        m.mfn,
        Some((85.0 + 60.0) / 2.0),
        "the missing A cell is skipped"
    );
    assert_eq!(m.fwt, None);
    // The metrics are exactly those of the metrics module on the same matrix.
    assert_eq!(
        m,
        bm.matrix.metrics(ForgettingMode::MaxEarlier).expect("same")
    );
    // An earlier revision gives the prefix.
    let prefix = build_matrix(&f.repo, bm.checkpoints[1].id).expect("prefix");
    assert_eq!(prefix.matrix.tasks, ["A", "B"]);
    assert_eq!(prefix.matrix.rows.len(), 2);
}

#[test]
fn zero_shot_row_and_upper_triangle_give_fwt() {
    let mut f = Fixture::new();
    f.commit("zero-shot", true, &[("A", 10.0), ("B", 20.0)]);
    f.commit("A", false, &[("A", 80.0), ("B", 30.0)]);
    let tip = f.commit("B", false, &[("A", 60.0), ("B", 90.0)]);
    let bm = build_matrix(&f.repo, tip).expect("matrix");
    assert_eq!(bm.matrix.tasks, ["A", "B"]);
    assert_eq!(bm.matrix.zero_shot, Some(vec![Some(10.0), Some(20.0)]));
    assert_eq!(bm.zero_shot.as_ref().map(|r| r.task.as_str()), Some("base"));
    assert_eq!(bm.checkpoints.len(), 2, "the base checkpoint is not a step");
    let m = bm.metrics(ForgettingMode::MaxEarlier).expect("metrics");
    assert_eq!(m.fwt, Some(30.0 - 20.0));
    assert_eq!(m.bwt, Some(60.0 - 80.0));
    assert_eq!(m.forgetting, Some(20.0));
}

#[test]
fn notes_override_commit_records_and_untrained_tasks_follow() {
    let mut f = Fixture::new();
    let a = f.commit("A", false, &[("A", 50.0)]);
    let tip = f.commit("B", false, &[("A", 40.0), ("B", 70.0)]);
    f.note(a, &[("A", 55.0), ("Extra", 12.5)]);
    f.note(tip, &[("b", 75.0)]);
    let bm = build_matrix(&f.repo, tip).expect("matrix");
    assert_eq!(bm.matrix.tasks, ["A", "B", "Extra"]);
    assert_eq!(bm.matrix.rows[0], vec![Some(55.0), None, Some(12.5)]);
    // The note's "b" names task B (spelling ignored) and wins over the tree's "B" record.
    assert_eq!(bm.matrix.rows[1][0], Some(40.0));
    assert_eq!(bm.matrix.rows[1][1], Some(75.0));
}

#[test]
fn consecutive_steps_of_one_task_collapse_and_repeats_are_refused() {
    let mut f = Fixture::new();
    f.commit("A", false, &[("A", 50.0)]);
    let a2 = f.commit("A", false, &[("A", 65.0)]);
    let b = f.commit("B", false, &[("A", 60.0), ("B", 70.0)]);
    let bm = build_matrix(&f.repo, b).expect("matrix");
    assert_eq!(bm.matrix.rows[0][0], Some(65.0));
    assert_eq!(bm.checkpoints[0].id, a2);
    let again = f.commit("A", false, &[]);
    let msg = build_matrix(&f.repo, again)
        .expect_err("repeat")
        .to_string();
    assert!(msg.contains("'A' is trained twice"), "{msg}");
}

#[test]
fn csv_and_json_read_back_through_the_metrics_readers() {
    let mut f = Fixture::new();
    f.commit("base", true, &[("A", 10.25), ("B", 1.0 / 3.0)]);
    f.commit("A", false, &[("A", 80.125)]);
    let tip = f.commit("B", false, &[("A", 60.0), ("B", 90.0)]);
    let bm = build_matrix(&f.repo, tip).expect("matrix");
    let back = parse_matrix_csv(&bm.to_csv()).expect("csv");
    assert_eq!(back, bm.matrix, "CSV round trip (full precision)");
    let m = bm.metrics(ForgettingMode::First).expect("metrics");
    let j = bm.to_json(&m);
    for key in ["tasks", "checkpoints", "matrix", "metrics", "zero_shot"] {
        assert!(j.get(key).is_some(), "missing {key}");
    }
    let mkeys: Vec<&String> = j["metrics"].as_object().expect("object").keys().collect();
    for key in [
        "mft",
        "mfn",
        "maa",
        "bwt",
        "fwt",
        "forgetting",
        "forgetting_per_task",
    ] {
        assert!(mkeys.iter().any(|k| *k == key), "metrics lacks {key}");
    }
    assert_eq!(j["checkpoints"][1]["id"], json!(tip.to_string()));
    let back = parse_matrix_json(&j.to_string()).expect("json");
    assert_eq!(back, bm.matrix);
    let table = bm.to_table();
    assert!(table.contains("80.12") && table.contains("—"), "{table}");
    assert!(table.contains("0 zero-shot"), "{table}");
}

#[test]
fn paper_table_has_final_row_and_summary() {
    let mut f = Fixture::new();
    f.commit("A", false, &[("A", 80.0)]);
    let tip = f.commit("B", false, &[("A", 60.0), ("B", 90.0)]);
    let bm = build_matrix(&f.repo, tip).expect("matrix");
    let m = bm.metrics(ForgettingMode::MaxEarlier).expect("metrics");
    let t = paper_table(&[PaperRow {
        label: "main".into(),
        tasks: &bm.matrix.tasks,
        final_row: bm.final_row(),
        metrics: &m,
    }]);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 2, "{t}");
    for h in ["A", "B", "MFT", "MFN", "MAA", "BWT", "FWT", "F"] {
        assert!(lines[0].split_whitespace().any(|w| w == h), "{t}");
    }
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        cells,
        ["main", "60.00", "90.00", "85.00", "75.00", "77.50", "-20.00", "—", "20.00"]
    );
}

#[test]
fn compare_reports_shared_prefix() {
    let mut f = Fixture::new();
    let a = f.commit("A", false, &[("A", 80.0)]);
    f.commit("B", false, &[("A", 60.0), ("B", 90.0)]);
    f.repo.create_branch("alt", a).expect("branch");
    f.repo.switch("alt", false).expect("switch");
    f.commit("C", false, &[("A", 70.0), ("C", 50.0)]);
    let c = crate::workflow::compare::compare(
        &f.repo,
        &["main".to_string(), "alt".to_string()],
        ForgettingMode::MaxEarlier,
    )
    .expect("compare");
    assert_eq!(c.branches.len(), 2);
    assert_eq!(c.branches[0].matrix.matrix.tasks, ["A", "B"]);
    assert_eq!(c.branches[1].matrix.matrix.tasks, ["A", "C"]);
    assert_eq!(c.branches[1].metrics.mfn, Some(60.0));
    assert_eq!(c.shared.len(), 1);
    assert_eq!(c.shared[0].last_shared, Some(a));
    assert_eq!(c.shared[0].shared_checkpoints, 1);
    assert_eq!(c.shared[0].shared_tasks, ["A"]);
    let text = c.to_text();
    assert!(text.contains("main ("), "{text}");
    assert!(text.contains("A → C"), "{text}");
    assert!(text.contains("share 1 checkpoint(s)"), "{text}");
    let j = c.to_json();
    assert_eq!(j["shared"][0]["shared_tasks"], json!(["A"]));
    assert_eq!(j["branches"][1]["final"], json!([70.0, 50.0]));
    let unknown = crate::workflow::compare::compare(
        &f.repo,
        &["nope".to_string()],
        ForgettingMode::MaxEarlier,
    );
    assert!(unknown.is_err());
}

#[test]
fn gk_records_fill_their_own_matrix_and_stay_out_of_accuracy() {
    let mut f = Fixture::new();
    let gk = |score: f64| EvalRecord {
        metric: crate::history::records::GK_METRIC.into(),
        score,
        n: 4,
        extra: BTreeMap::new(),
    };
    let a = f.commit("A", false, &[("A", 80.0)]);
    let tip = f.commit("B", false, &[("A", 70.0), ("B", 90.0)]);
    let notes = |id, recs: &[(&str, f64)]| {
        let recs: BTreeMap<String, EvalRecord> =
            recs.iter().map(|(t, s)| (t.to_string(), gk(*s))).collect();
        f.repo.add_eval_records(id, &recs).expect("note");
    };
    notes(a, &[("GK:A", 60.0)]);
    notes(tip, &[("GK:A", 45.0), ("GK:B", 50.0), ("GK:Z", 30.0)]);
    let acc = build_matrix(&f.repo, tip).expect("accuracy");
    assert_eq!(acc.matrix.tasks, ["A", "B"]);
    assert_eq!(
        acc.matrix.rows,
        vec![vec![Some(80.0), None], vec![Some(70.0), Some(90.0)]]
    );
    let g = build_matrix_of(&f.repo, tip, MatrixMetric::GeneralKnowledge).expect("gk");
    // Same rows; columns in training order, then judged tasks never trained; a missing cell
    // stays missing.
    assert_eq!(g.checkpoints, acc.checkpoints);
    assert_eq!(g.matrix.tasks, ["A", "B", "Z"]);
    assert_eq!(
        g.matrix.rows,
        vec![
            vec![Some(60.0), None, None],
            vec![Some(45.0), Some(50.0), Some(30.0)]
        ]
    );
    let m = g.metrics(ForgettingMode::MaxEarlier).expect("metrics");
    assert_eq!(m.mft, Some(55.0)); // (60 + 50) / 2
    assert_eq!(m.mfn, Some(47.5)); // (45 + 50) / 2
    assert_eq!(m.bwt, Some(-15.0)); // 45 − 60
}
