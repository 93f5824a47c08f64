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
    let table = env.coin(&["metrics", "m.csv"]).success().stdout;
    assert!(table.contains("BWT    -17.50"), "{table}");
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
    let missing = env.coin(&["metrics", "nope.csv"]).code(1);
    assert!(missing.stderr.contains("nope.csv"), "{}", missing.stderr);
    env.write("bad.csv", "A,B\n80,abc\n");
    let bad = env.coin(&["metrics", "bad.csv"]).code(1);
    assert!(
        bad.stderr.contains("'abc' is not a number"),
        "{}",
        bad.stderr
    );
    env.write("big.csv", "A\n120\n");
    let big = env.coin(&["metrics", "big.csv"]).code(1);
    assert!(
        big.stderr.contains("not a score between 0 and 100"),
        "{}",
        big.stderr
    );
}
