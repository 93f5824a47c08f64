//! What the main commands print for a person (not `--json`): inline snapshots of stdout,
//! stderr and the exit status, in the hermetic [`TestEnvironment`] (fixed author, date and
//! clock, so checkpoint ids are stable; temporary paths read `$TEST_ENV`). A change of wording
//! or layout shows up here as a diff a reviewer reads.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use crate::common::{mask_seconds, TestEnvironment};

const EVAL_A: &str = r#"{"ScienceQA": {"metric": "accuracy", "score": 80.0, "n": 100}}"#;
const EVAL_B: &str = r#"{"ScienceQA": {"metric": "accuracy", "score": 70.5, "n": 100},
                         "TextVQA": {"metric": "accuracy", "score": 50.0, "n": 10}}"#;

/// A repository with two checkpoints on main (ScienceQA, then TextVQA), both with evals.
fn two_checkpoints(env: &TestEnvironment) {
    env.coin(&["init"]).success();
    env.adapter_with_readme("a1", 0.0);
    env.adapter_with_readme("a2", 1.0);
    env.write("eval_a.json", EVAL_A);
    env.write("eval_b.json", EVAL_B);
    env.coin(&[
        "commit",
        "a1",
        "--task",
        "ScienceQA",
        "-m",
        "first",
        "--eval",
        "eval_a.json",
    ])
    .success();
    env.coin(&["commit", "a2", "--task", "TextVQA", "--eval", "eval_b.json"])
        .success();
}

#[test]
fn init_and_commit() {
    let env = TestEnvironment::new();
    insta::assert_snapshot!(env.coin_render(&["init"]), @r"
    ------- stderr -------
    Initialized a coin repository in '$TEST_ENV/work' in a new git repository.
    ");
    insta::assert_snapshot!(env.coin_render(&["init"]), @r"
    ------- stderr -------
    Error: '$TEST_ENV/work' is already a coin repository
    [exit status: 1]
    ");
    env.adapter_with_readme("a1", 0.0);
    env.write("eval_a.json", EVAL_A);
    insta::assert_snapshot!(env.coin_render(&[
        "commit", "a1", "--task", "ScienceQA", "-m", "first", "--eval", "eval_a.json",
    ]), @r"
    d3ca151475ed6be4470c4b24116ce9f37b641227
    ------- stderr -------
    Committed d3ca151475ed on branch 'main' (3 files, 5 tensors).
    ");
    insta::assert_snapshot!(env.coin_render(&["commit", "missing", "--task", "ScienceQA"]), @"
    ------- stderr -------
    Error: could not read '$TEST_ENV/work/missing': No such file or directory (os error 2)
    [exit status: 1]
    ");
}

#[test]
fn log_show_status_and_diff() {
    let env = TestEnvironment::new();
    two_checkpoints(&env);
    insta::assert_snapshot!(env.coin_render(&["log"]), @r"
    735c0e978166 (main)  2001-02-03 04:05
        TextVQA
        eval: ScienceQA 70.50, TextVQA 50.00
    d3ca151475ed  2001-02-03 04:05
        ScienceQA: first
        eval: ScienceQA 80.00
    ");
    insta::assert_snapshot!(env.coin_render(&["show", "HEAD~1"]), @r"
    checkpoint d3ca151475ed6be4470c4b24116ce9f37b641227
    date       2001-02-03 04:05
    task       ScienceQA
    message    first
    adapter    lora

    files:
      adapter_config.json  (46 bytes)
      adapter_model.safetensors  (1296 bytes, 5 tensors)
        base_model.model.layers.0.q_proj.lora_A.weight  F32  [4, 16]  9ece6af40f1a
        base_model.model.layers.0.q_proj.lora_B.weight  F32  [16, 4]  b2e92936a4c9
        base_model.model.layers.0.v_proj.lora_A.weight  F16  [4, 16]  b0a9a3cda819
        base_model.model.layers.0.v_proj.lora_B.weight  BF16  [16, 4]  0d5310a3a21b
        step  I64  [1]  6eb9c35a210e
      extra/README.md  (11 bytes)

    eval:
      ScienceQA   80.00  accuracy  n=100  (commit)
    ");
    insta::assert_snapshot!(env.coin_render(&["status"]), @r"
    On branch main
    Head: 735c0e978166 TextVQA
    2 checkpoint(s) on this branch
    ");
    insta::assert_snapshot!(env.coin_render(&["diff", "HEAD~1", "HEAD"]), @"
    A d3ca151475ed  B 735c0e978166

    task              A         B     delta
    ScienceQA     80.00     70.50     -9.50  forgetting
    TextVQA           —     50.00         —

    Forgetting vs the best earlier score on A's path (1 checkpoint):
    task           best            at         B      drop
    ScienceQA     80.00  d3ca151475ed     70.50      9.50

    changed  adapter_model.safetensors
    changed  extra/README.md
    2 tensor change(s), 3 unchanged:
      changed  adapter_model.safetensors:base_model.model.layers.0.q_proj.lora_B.weight  F32 [16, 4]  rel_l2 0.8763
      changed  adapter_model.safetensors:base_model.model.layers.0.v_proj.lora_B.weight  BF16 [16, 4]  rel_l2 0.8763
    ");
    insta::assert_snapshot!(env.coin_render(&["show", "nope"]), @"
    ------- stderr -------
    Error: unknown revision 'nope'
    Hint: A revision is a checkpoint id (or a unique prefix of 4+ hex digits), a branch, a tag or HEAD, optionally followed by ~N; see `coin log`.
    [exit status: 1]
    ");
}

#[test]
fn checkout_fsck_and_gc() {
    let env = TestEnvironment::new();
    two_checkpoints(&env);
    insta::assert_snapshot!(env.coin_render(&["checkout", "HEAD~1", "--output", "out"]), @r"
    ------- stderr -------
    Wrote 3 file(s) of d3ca151475ed to 'out'.
    ");
    insta::assert_snapshot!(env.coin_render(&["checkout", "HEAD~1", "--output", "out"]), @r"
    ------- stderr -------
    Error: '$TEST_ENV/work/out' exists and is not empty; choose a new directory
    [exit status: 1]
    ");
    insta::assert_snapshot!(env.coin_render(&["fsck"]), @r"
    ------- stderr -------
    Checked 11 objects and 2 checkpoints: no problems.
    ");
    insta::assert_snapshot!(env.coin_render(&["gc"]), @r"
    ------- stderr -------
    Removed 0 unreachable objects (0 bytes); kept 11.
    ");
    // One flipped byte in the first object (by id): fsck names it and exits 1.
    let mut objects: Vec<std::path::PathBuf> = std::fs::read_dir(env.path(".coin/objects"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().len() == 2 && p.is_dir())
        .flat_map(|d| std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()))
        .collect();
    objects.sort();
    let victim = &objects[0];
    let mut bytes = std::fs::read(victim).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    let mut perms = std::fs::metadata(victim).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(victim, perms).unwrap();
    std::fs::write(victim, bytes).unwrap();
    insta::assert_snapshot!(env.coin_render(&["fsck"]), @"
    object 0d5310a3a21bc52bd3e1817588017a711c0216678c6a8cb1e05c8c2c23572c66: '$TEST_ENV/work/.coin/objects/0d/5310a3a21bc52bd3e1817588017a711c0216678c6a8cb1e05c8c2c23572c66': its content does not match its id (the file was modified or damaged)
    ------- stderr -------
    Error: fsck found 1 problem(s) in 11 objects and 2 checkpoints
    [exit status: 1]
    ");
}

#[test]
fn branch_tag_and_switch() {
    let env = TestEnvironment::new();
    two_checkpoints(&env);
    insta::assert_snapshot!(env.coin_render(&["branch", "alt", "HEAD~1"]), @r"
    ------- stderr -------
    Created branch 'alt' at d3ca151475ed.
    ");
    insta::assert_snapshot!(env.coin_render(&["branch"]), @r"
      alt  d3ca151475ed
    * main  735c0e978166
    ");
    insta::assert_snapshot!(env.coin_render(&["tag", "v1", "HEAD~1"]), @r"
    ------- stderr -------
    Tagged d3ca151475ed as 'v1'.
    ");
    insta::assert_snapshot!(env.coin_render(&["tag"]), @"v1  d3ca151475ed");
    insta::assert_snapshot!(env.coin_render(&["switch", "alt"]), @r"
    ------- stderr -------
    Switched to branch 'alt'.
    ");
    insta::assert_snapshot!(env.coin_render(&["switch", "-c", "other"]), @r"
    ------- stderr -------
    Created branch 'other' at d3ca151475ed.
    Switched to branch 'other'.
    ");
    insta::assert_snapshot!(env.coin_render(&["status"]), @r"
    On branch other
    Head: d3ca151475ed ScienceQA: first
    1 checkpoint(s) on this branch
    ");
    insta::assert_snapshot!(env.coin_render(&["switch", "nope"]), @"
    ------- stderr -------
    Error: no branch named 'nope'
    Hint: List branches with `coin branch`; create one with `coin switch -c NAME`.
    [exit status: 1]
    ");
}

/// Two orders from a shared first step, scored with `eval --record`: main trains A then B,
/// alt trains A then C.
#[test]
fn eval_record_matrix_and_compare() {
    let env = TestEnvironment::new();
    env.coin(&["init"]).success();
    for (name, shift) in [("a", 0.0), ("b", 1.0), ("c", 2.0)] {
        env.adapter_with_readme(name, shift);
    }
    env.write(
        "r1.json",
        r#"{"A": {"metric": "accuracy", "score": 80.0, "n": 50}}"#,
    );
    env.write(
        "r2.json",
        r#"{"A": {"metric": "accuracy", "score": 60.0, "n": 50},
            "B": {"metric": "accuracy", "score": 90.0, "n": 40}}"#,
    );
    env.write(
        "r3.json",
        r#"{"A": {"metric": "accuracy", "score": 75.0, "n": 50},
            "C": {"metric": "accuracy", "score": 55.5, "n": 20}}"#,
    );
    env.coin(&["commit", "a", "--task", "A"]).success();
    insta::assert_snapshot!(env.coin_render(&["eval", "--record", "r1.json"]), @r"
    ------- stderr -------
    Recorded 1 eval result(s) on 3dba696e6cc9.
    ");
    env.coin(&["branch", "alt"]).success();
    env.coin(&["commit", "b", "--task", "B"]).success();
    insta::assert_snapshot!(env.coin_render(&["eval", "--record", "r2.json"]), @r"
    ------- stderr -------
    Recorded 2 eval result(s) on de48c2867a97.
    ");
    env.coin(&["switch", "alt"]).success();
    env.coin(&["commit", "c", "--task", "C"]).success();
    env.coin(&["eval", "--record", "r3.json"]).success();

    insta::assert_snapshot!(env.coin_render(&["matrix", "main"]), @r"
    after step             A       B
    1 A 3dba696e6cc9   80.00       —
    2 B de48c2867a97   60.00   90.00

    MFT     85.00   mean accuracy right after training each task
    MFN     75.00   mean final accuracy
    MAA     77.50   mean average accuracy over steps
    BWT    -20.00   backward transfer (negative = forgetting)
    FWT         —   forward transfer (needs zero-shot row and upper triangle)
    F       20.00   mean forgetting (best earlier − final)

    task  forgetting
    A          20.00
    B              —
    ");
    insta::assert_snapshot!(env.coin_render(&["matrix", "main", "--format", "paper"]), @r"
                 A       B     MFT     MFN     MAA     BWT     FWT       F
    main     60.00   90.00   85.00   75.00   77.50  -20.00       —   20.00
    ");
    insta::assert_snapshot!(env.coin_render(&["matrix", "main", "--csv"]), @r"
    step,A,B
    A,80,
    B,60,90
    ");
    insta::assert_snapshot!(env.coin_render(&["compare", "main", "alt"]), @r"
    main (de48c2867a97): A → B
    alt (ae2a27c66790): A → C

                 A       B       C     MFT     MFN     MAA     BWT     FWT       F
    main     60.00   90.00       —   85.00   75.00   77.50  -20.00       —   20.00
    alt      75.00       —   55.50   67.75   65.25   72.62   -5.00       —    5.00

    wall time: not recorded (no train or eval record of these branches holds its seconds: imports, `coin commit`, `eval --record`)

    main and alt share 1 checkpoint(s) up to 3dba696e6cc9 (1 step(s): A)
    ");
    insta::assert_snapshot!(env.coin_render(&["log", "main"]), @r"
    de48c2867a97 (main)  2001-02-03 04:05
        B
        eval: A 60.00, B 90.00
    3dba696e6cc9  2001-02-03 04:05
        A
        eval: A 80.00
    ");
}

#[test]
fn metrics_of_a_csv_matrix() {
    let env = TestEnvironment::new();
    env.write(
        "m.csv",
        "step,A,B,C\nzero-shot,10,20,30\n1,80,25,35\n2,60,90,40\n3,50,70,85\n",
    );
    insta::assert_snapshot!(env.coin_render(&["metrics", "m.csv"]), @r"
    MFT     85.00   mean accuracy right after training each task
    MFN     68.33   mean final accuracy
    MAA     74.44   mean average accuracy over steps
    BWT    -25.00   backward transfer (negative = forgetting)
    FWT      7.50   forward transfer (needs zero-shot row and upper triangle)
    F       25.00   mean forgetting (best earlier − final)

    task  forgetting
    A          30.00
    B          20.00
    C              —
    ");
    insta::assert_snapshot!(env.coin_render(&["metrics", "m.csv", "--forgetting", "first"]), @r"
    MFT     85.00   mean accuracy right after training each task
    MFN     68.33   mean final accuracy
    MAA     74.44   mean average accuracy over steps
    BWT    -25.00   backward transfer (negative = forgetting)
    FWT      7.50   forward transfer (needs zero-shot row and upper triangle)
    F       25.00   mean forgetting (first − final)

    task  forgetting
    A          30.00
    B          20.00
    C              —
    ");
}

#[test]
fn score_an_answer_file() {
    let env = TestEnvironment::new();
    let instr = "Answer the question using a single word or phrase.";
    let qs = serde_json::json!([
        {"question_id": 1, "image": "a.jpg", "text": format!("What color?\n{instr}"), "answer": "Red"},
        {"question_id": 2, "image": "b.jpg", "text": format!("How many?\n{instr}"), "answer": "2"},
        {"question_id": 3, "image": "c.jpg", "text": format!("Is it?\n{instr}"), "answer": "yes"},
    ]);
    env.write("val.json", serde_json::to_string(&qs).unwrap());
    env.write(
        "answers.jsonl",
        "{\"question_id\": 1, \"prompt\": \"What color?\", \"text\": \"red\"}\n\
         {\"question_id\": 2, \"prompt\": \"How many?\", \"text\": \"two\"}\n",
    );
    let score = |extra: &[&str]| {
        let mut args = vec![
            "score",
            "--task",
            "VQAv2",
            "--questions",
            "val.json",
            "--answers",
            "answers.jsonl",
        ];
        args.extend_from_slice(extra);
        env.coin_render(&args)
    };
    insta::assert_snapshot!(score(&[]), @"VQAv2 accuracy (compat): 50.00 over 2 questions");
    insta::assert_snapshot!(score(&["--mode", "strict"]), @"VQAv2 accuracy (strict): 66.67 over 3 questions");
}

#[test]
fn bench_data_and_task_list_and_show() {
    let env = TestEnvironment::new();
    env.coin(&["init"]).success();
    insta::assert_snapshot!(mask_seconds(&env.coin_render(&[
        "bench-data", "coin-mini", "--out", "mini", "--train", "4", "--test", "2",
    ])), @r"
    task             scorer     train  test  chance
    mini-ScienceQA   ScienceQA      4     2   25.0%
    mini-TextVQA     TextVQA        4     2   12.5%
    mini-ImageNet    ImageNet       4     2   16.7%
    mini-GQA         GQA            4     2   18.9%
    mini-VizWiz      VizWiz         4     2   14.3%
    mini-Grounding   Grounding      4     2   25.0%
    mini-VQAv2       VQAv2          4     2   37.5%
    mini-OCRVQA      OCR-VQA        4     2   20.8%
    ------- stderr -------
    Generating mini-ScienceQA.
    Generating mini-TextVQA.
    Generating mini-ImageNet.
    Generating mini-GQA.
    Generating mini-VizWiz.
    Generating mini-Grounding.
    Generating mini-VQAv2.
    Generating mini-OCRVQA.
    Wrote CoIN-mini (seed 0) to mini in [secs] s.
    ");
    insta::assert_snapshot!(env.coin_render(&["task", "add", "--coin-mini", "mini"]), @r"
    ------- stderr -------
    Registered task mini-ScienceQA.
    Registered task mini-TextVQA.
    Registered task mini-ImageNet.
    Registered task mini-GQA.
    Registered task mini-VizWiz.
    Registered task mini-Grounding.
    Registered task mini-VQAv2.
    Registered task mini-OCRVQA.
    ");
    insta::assert_snapshot!(env.coin_render(&["task", "list"]), @r"
    task            scorer     mode    test
    GQA             GQA        compat  playground/Instructions_Original/GQA/test.json
    Grounding       Grounding  compat  playground/Instructions_Original/Grounding/test.json
    ImageNet        ImageNet   compat  playground/Instructions_Original/ImageNet/test.json
    OCR-VQA         OCRVQA     compat  playground/Instructions_Original/OCRVQA/test.json
    ScienceQA       ScienceQA  compat  playground/Instructions_Original/ScienceQA/test.json
    TextVQA         TextVQA    compat  playground/Instructions_Original/TextVQA/val.json
    VQAv2           VQAv2      compat  playground/Instructions_Original/VQAv2/val.json
    VizWiz          VizWiz     compat  playground/Instructions_Original/VizWiz/val.json
    mini-GQA        GQA        strict  Instructions_Original/GQA/test.json
    mini-Grounding  Grounding  strict  Instructions_Original/Grounding/test.json
    mini-ImageNet   ImageNet   strict  Instructions_Original/ImageNet/test.json
    mini-OCRVQA     OCR-VQA    strict  Instructions_Original/OCRVQA/test.json
    mini-ScienceQA  ScienceQA  strict  Instructions_Original/ScienceQA/test.json
    mini-TextVQA    TextVQA    strict  Instructions_Original/TextVQA/val.json
    mini-VQAv2      VQAv2      strict  Instructions_Original/VQAv2/val.json
    mini-VizWiz     VizWiz     strict  Instructions_Original/VizWiz/val.json
    ");
    insta::assert_snapshot!(env.coin_render(&["task", "show", "mini-GQA"]), @r#"
    name = "mini-GQA"
    aliases = []
    coin = false
    scorer = "GQA"
    template = "GQA"
    data_root = "mini"
    train = "Instructions_Original/GQA/train.json"
    test = "Instructions_Original/GQA/test.json"
    image_root = "cl_dataset"
    annotations = "cl_dataset/GQA/testdev_balanced_questions.json"
    description = "CoIN-mini task mirroring CoIN GQA; chance 18.9%"
    # default scoring mode: strict
    # train: $TEST_ENV/work/mini/Instructions_Original/GQA/train.json
    # test: $TEST_ENV/work/mini/Instructions_Original/GQA/test.json
    # image_root: $TEST_ENV/work/mini/cl_dataset
    "#);
    insta::assert_snapshot!(env.coin_render(&["task", "show", "mnist"]), @r"
    ------- stderr -------
    Error: unknown task 'mnist'
    Hint: CoIN tasks: ScienceQA, TextVQA, ImageNet, GQA, VizWiz, Grounding, VQAv2, OCR-VQA; `coin task list` shows registered ones.
    [exit status: 1]
    ");
}

#[test]
fn model_init_tiny() {
    let env = TestEnvironment::new();
    insta::assert_snapshot!(env.coin_render(&["model", "init", "--tiny", "m", "--seed", "3"]), @r"
    ------- stderr -------
    Wrote a tiny random LLaVA-1.5 to $TEST_ENV/work/m.
    ");
    // An existing model folder is not overwritten unless asked.
    insta::assert_snapshot!(env.coin_render(&["model", "init", "--tiny", "m"]), @"
    ------- stderr -------
    Error: 'm' exists and is not empty
    Hint: Pick a new folder, or pass --force to write the model over its files.
    [exit status: 1]
    ");
    insta::assert_snapshot!(env.coin_render(&["model", "init", "--tiny", "m", "--force"]), @"
    ------- stderr -------
    Wrote a tiny random LLaVA-1.5 to $TEST_ENV/work/m.
    ");
    // An empty folder is fine.
    std::fs::create_dir(env.path("empty")).unwrap();
    insta::assert_snapshot!(env.coin_render(&["model", "init", "--tiny", "empty"]), @"
    ------- stderr -------
    Wrote a tiny random LLaVA-1.5 to $TEST_ENV/work/empty.
    ");
}

/// A cause is printed once, after the message: a path given by the user that does not exist
/// is a user error (exit 1); a store file that cannot be read for another reason is an
/// internal error (exit 255).
#[test]
fn causes_are_printed_once() {
    let env = TestEnvironment::new();
    two_checkpoints(&env);
    insta::assert_snapshot!(env.coin_render(&["commit", "missing", "--task", "ScienceQA"]), @"
    ------- stderr -------
    Error: could not read '$TEST_ENV/work/missing': No such file or directory (os error 2)
    [exit status: 1]
    ");
    insta::assert_snapshot!(env.coin_render(&["commit", "a1", "--task", "ScienceQA", "--eval", "nope.json"]), @"
    ------- stderr -------
    Error: could not read the eval results file 'nope.json': No such file or directory (os error 2)
    [exit status: 1]
    ");
    // Object files that are links to themselves: opening one fails with ELOOP.
    let objects = env.path(".coin/objects");
    let files: Vec<std::path::PathBuf> = std::fs::read_dir(&objects)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().len() == 2 && p.is_dir())
        .flat_map(|d| std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()))
        .collect();
    for victim in &files {
        std::fs::remove_file(victim).unwrap();
        std::os::unix::fs::symlink(victim, victim).unwrap();
    }
    let out = env.coin(&["checkout", "HEAD", "--output", "out"]);
    let stderr = env.normalize(&out.stderr);
    assert_eq!(
        stderr.matches("Too many levels of symbolic links").count(),
        1,
        "{stderr}"
    );
    insta::assert_snapshot!(env.render(&out), @"
    ------- stderr -------
    Error: file 'adapter_config.json' of checkpoint 735c0e978166 cannot be rebuilt: could not open '$TEST_ENV/work/.coin/objects/25/b77caebf395e93392e915d65e73e51a74ff8cb92cbb144e9587b2977174f1d': Too many levels of symbolic links (os error 40)
    Hint: Run `coin fsck` for details.
    [exit status: 255]
    ");
}
