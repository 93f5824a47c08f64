use crate::common::TestEnvironment;

#[test]
fn metrics_from_csv_table_and_json() {
    let env = TestEnvironment::new();
    env.write("m.csv", "step,A,B,C\nA,80,,\nB,60,70,\nC,50,65,90\n");
    let out = env.coin(&["metrics", "m.csv", "--json"]).success();
    let v = out.json();
    let m = &v["metrics"];
    assert!((m["bwt"].as_f64().unwrap() - (-17.5)).abs() < 1e-9, "{v}");
    assert!((m["mfn"].as_f64().unwrap() - 205.0 / 3.0).abs() < 1e-9);
    assert_eq!(
        m["forgetting_per_task"],
        serde_json::json!([30.0, 5.0, null])
    );
    insta::assert_snapshot!(env.coin_render(&["metrics", "m.csv"]), @r"
    MFT     80.00   mean accuracy right after training each task
    MFN     68.33   mean final accuracy
    MAA     71.11   mean average accuracy over steps
    BWT    -17.50   backward transfer (negative = forgetting)
    FWT         —   forward transfer (needs zero-shot row and upper triangle)
    F       17.50   mean forgetting (best earlier − final)

    task  forgetting
    A          30.00
    B           5.00
    C              —
    ");
    let first = env
        .coin(&["metrics", "m.csv", "--forgetting", "first", "--json"])
        .success()
        .json();
    assert_eq!(first["metrics"]["forgetting_mode"], "first");
}

#[test]
fn metrics_json_input_and_errors() {
    let env = TestEnvironment::new();
    env.write(
        "m.json",
        r#"{"tasks":["A","B"],"matrix":[[80,null],[60,70]]}"#,
    );
    let v = env.coin(&["metrics", "m.json", "--json"]).success().json();
    assert_eq!(v["metrics"]["bwt"].as_f64(), Some(-20.0));
    insta::assert_snapshot!(env.coin_render(&["metrics", "nope.csv"]), @"
    ------- stderr -------
    Error: could not read the matrix file 'nope.csv': No such file or directory (os error 2)
    [exit status: 1]
    ");
    env.write("bad.csv", "A,B\n80,abc\n");
    insta::assert_snapshot!(env.coin_render(&["metrics", "bad.csv"]), @"
    ------- stderr -------
    Error: could not read the matrix in 'bad.csv': row 1, column 'B': 'abc' is not a number (leave the cell empty when there is no score)
    [exit status: 1]
    ");
    env.write("big.csv", "A\n120\n");
    insta::assert_snapshot!(env.coin_render(&["metrics", "big.csv"]), @"
    ------- stderr -------
    Error: the matrix in 'big.csv' is not usable: cell (0, 0) holds 120, which is not a score between 0 and 100
    [exit status: 1]
    ");
}
