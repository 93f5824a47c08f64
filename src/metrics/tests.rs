use super::*;

fn m(rows: Vec<Vec<Option<f64>>>) -> AccuracyMatrix {
    let t = rows.first().map_or(0, Vec::len);
    AccuracyMatrix {
        tasks: (0..t).map(|i| format!("t{i}")).collect(),
        rows,
        zero_shot: None,
    }
}

fn close(a: Option<f64>, b: f64) {
    let a = a.expect("metric present");
    assert!((a - b).abs() < 1e-9, "{a} != {b}");
}

#[test]
fn three_task_lower_triangle() {
    // a[k][j]
    let mat = m(vec![
        vec![Some(80.0), None, None],
        vec![Some(60.0), Some(70.0), None],
        vec![Some(50.0), Some(65.0), Some(90.0)],
    ]);
    let r = mat.metrics(ForgettingMode::MaxEarlier).unwrap();
    close(r.mft, (80.0 + 70.0 + 90.0) / 3.0);
    close(r.mfn, (50.0 + 65.0 + 90.0) / 3.0);
    close(
        r.maa,
        (80.0 + (60.0 + 70.0) / 2.0 + (50.0 + 65.0 + 90.0) / 3.0) / 3.0,
    );
    close(r.bwt, ((50.0 - 80.0) + (65.0 - 70.0)) / 2.0);
    assert_eq!(r.fwt, None);
    assert_eq!(r.forgetting_per_task, vec![Some(30.0), Some(5.0), None]);
    close(r.forgetting, 17.5);
    // Identity from the literature: MFN − MFT = ((T−1)/T)·BWT.
    let lhs = r.mfn.unwrap() - r.mft.unwrap();
    close(Some(lhs), 2.0 / 3.0 * r.bwt.unwrap());
}

#[test]
fn max_earlier_differs_from_first() {
    // Task 0 improves at step 1 then drops: max-earlier uses 90, first uses 80.
    let mat = m(vec![
        vec![Some(80.0), None, None],
        vec![Some(90.0), Some(70.0), None],
        vec![Some(60.0), Some(70.0), Some(50.0)],
    ]);
    let a = mat.metrics(ForgettingMode::MaxEarlier).unwrap();
    let b = mat.metrics(ForgettingMode::First).unwrap();
    assert_eq!(a.forgetting_per_task[0], Some(30.0));
    assert_eq!(b.forgetting_per_task[0], Some(20.0));
    // Negative forgetting (improvement) is kept, not clipped.
    let c = m(vec![vec![Some(10.0), None], vec![Some(20.0), Some(5.0)]])
        .metrics(ForgettingMode::First)
        .unwrap();
    assert_eq!(c.forgetting_per_task, vec![Some(-10.0), None]);
}

#[test]
fn fwt_needs_zero_shot_and_upper_triangle() {
    let mut mat = m(vec![
        vec![Some(80.0), Some(20.0), Some(30.0)],
        vec![Some(60.0), Some(70.0), Some(35.0)],
        vec![Some(50.0), Some(65.0), Some(90.0)],
    ]);
    assert_eq!(mat.metrics(ForgettingMode::MaxEarlier).unwrap().fwt, None);
    mat.zero_shot = Some(vec![Some(10.0), Some(15.0), Some(25.0)]);
    let r = mat.metrics(ForgettingMode::MaxEarlier).unwrap();
    close(r.fwt, ((20.0 - 15.0) + (35.0 - 25.0)) / 2.0);
}

#[test]
fn single_step_and_empty() {
    let r = m(vec![vec![Some(42.0)]])
        .metrics(ForgettingMode::MaxEarlier)
        .unwrap();
    close(r.mft, 42.0);
    close(r.mfn, 42.0);
    close(r.maa, 42.0);
    assert_eq!(r.bwt, None);
    assert_eq!(r.forgetting, None);
    let empty = AccuracyMatrix {
        tasks: vec!["a".into()],
        rows: vec![],
        zero_shot: None,
    };
    let r = empty.metrics(ForgettingMode::MaxEarlier).unwrap();
    assert_eq!((r.mft, r.mfn, r.maa), (None, None, None));
}

#[test]
fn partial_run_uses_trained_tasks_only() {
    // Two of three tasks trained: MFN averages the trained columns only.
    let mat = AccuracyMatrix {
        tasks: vec!["a".into(), "b".into(), "c".into()],
        rows: vec![
            vec![Some(80.0), None, None],
            vec![Some(40.0), Some(60.0), None],
        ],
        zero_shot: None,
    };
    let r = mat.metrics(ForgettingMode::MaxEarlier).unwrap();
    close(r.mfn, 50.0);
    close(r.bwt, -40.0);
}

#[test]
fn validation_errors() {
    let bad_len = AccuracyMatrix {
        tasks: vec!["a".into(), "b".into()],
        rows: vec![vec![Some(1.0)]],
        zero_shot: None,
    };
    assert!(matches!(
        bad_len.validate(),
        Err(MatrixError::RowLength {
            row: 0,
            got: 1,
            tasks: 2
        })
    ));
    let bad_score = m(vec![vec![Some(101.0)]]);
    assert!(matches!(
        bad_score.validate(),
        Err(MatrixError::BadScore { .. })
    ));
    let nan = m(vec![vec![Some(f64::NAN)]]);
    assert!(nan.validate().is_err());
    let too_many = AccuracyMatrix {
        tasks: vec!["a".into()],
        rows: vec![vec![Some(1.0)], vec![Some(1.0)]],
        zero_shot: None,
    };
    assert!(matches!(
        too_many.validate(),
        Err(MatrixError::TooManyRows { .. })
    ));
}

#[test]
fn csv_with_labels_and_zero_shot() {
    let text = "step,ScienceQA,TextVQA\nzero-shot,20,10\nScienceQA,80,\nTextVQA,60,70\n";
    let mat = parse_matrix_csv(text).unwrap();
    assert_eq!(mat.tasks, vec!["ScienceQA", "TextVQA"]);
    assert_eq!(
        mat.rows,
        vec![vec![Some(80.0), None], vec![Some(60.0), Some(70.0)]]
    );
    assert_eq!(mat.zero_shot, Some(vec![Some(20.0), Some(10.0)]));
}

#[test]
fn csv_without_labels_and_bad_cell() {
    let mat = parse_matrix_csv("a,b\n80,\n60,70\n").unwrap();
    assert_eq!(mat.rows.len(), 2);
    let err = parse_matrix_csv("a,b\n80,x\n").unwrap_err();
    assert!(err.to_string().contains("'x' is not a number"), "{err}");
    assert!(err.to_string().contains("column 'b'"), "{err}");
    // A ragged row is a CSV error, not a panic.
    assert!(parse_matrix_csv("a,b\n1,2,3\n").is_err());
}

#[test]
fn json_round_trip() {
    let mat = parse_matrix_json(r#"{"tasks":["a","b"],"matrix":[[80,null],[60,70]]}"#).unwrap();
    assert_eq!(mat.rows[0], vec![Some(80.0), None]);
    let err = parse_matrix_json(r#"{"tasks":["a"],"matrix":"x"}"#).unwrap_err();
    assert!(err.to_string().contains("could not parse the JSON"));
}

mod props {
    use super::super::*;
    use proptest::prelude::*;

    fn lower_triangle(t: usize) -> impl Strategy<Value = AccuracyMatrix> {
        proptest::collection::vec(0.0f64..=100.0, t * t).prop_map(move |cells| AccuracyMatrix {
            tasks: (0..t).map(|i| format!("t{i}")).collect(),
            rows: (0..t)
                .map(|k| (0..t).map(|j| (j <= k).then(|| cells[k * t + j])).collect())
                .collect(),
            zero_shot: None,
        })
    }

    proptest! {
        #[test]
        fn identity_mfn_mft_bwt(mat in (2usize..9).prop_flat_map(lower_triangle)) {
            let r = mat.metrics(ForgettingMode::MaxEarlier).unwrap();
            let t = mat.steps() as f64;
            let lhs = r.mfn.unwrap() - r.mft.unwrap();
            let rhs = (t - 1.0) / t * r.bwt.unwrap();
            prop_assert!((lhs - rhs).abs() < 1e-9);
            // Max-earlier forgetting is never below first-based forgetting.
            let f = mat.metrics(ForgettingMode::First).unwrap();
            for (a, b) in r.forgetting_per_task.iter().zip(&f.forgetting_per_task) {
                if let (Some(a), Some(b)) = (a, b) { prop_assert!(a >= b); }
            }
            // First-based mean forgetting is exactly −BWT on a full lower triangle.
            prop_assert!((f.forgetting.unwrap() + r.bwt.unwrap()).abs() < 1e-9);
        }
    }
}
