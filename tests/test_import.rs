//! `coin import coin-run`: CoIN-shaped trees generated here (current and old layout, LoRA and
//! MoELoRA, partial), imported and read back with `coin matrix`.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::common::TestEnvironment;

/// Answers of every question file: four questions per task.
const GT: [&str; 4] = ["cat", "dog", "red", "two"];

#[derive(Clone, Copy, PartialEq)]
enum Layout {
    Current,
    Old,
}

#[derive(Clone, Copy, PartialEq)]
enum Method {
    Lora,
    Moe,
}

struct Tree {
    root: PathBuf,
    layout: Layout,
}

fn tensor(shape: (usize, usize), v: f32) -> Tensor {
    Tensor::full(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
}

impl Tree {
    fn new(env: &TestEnvironment, name: &str, layout: Layout) -> Tree {
        let root = env.path(name);
        std::fs::create_dir_all(&root).unwrap();
        let t = Tree { root, layout };
        // Question files (with the tiny model's dims nothing else is read).
        let instr = match layout {
            Layout::Current => "playground/Instructions_Original",
            Layout::Old => "playground/Instructions",
        };
        for (task, file) in [
            ("ImageNet", "test.json"),
            ("VizWiz", "val.json"),
            ("VQAv2", "val.json"),
        ] {
            let qs: Vec<serde_json::Value> = GT
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    serde_json::json!({"question_id": i + 1, "image": format!("{task}/{i}.jpg"),
                    "text": format!("<image>\nWhat is it?\nAnswer the question using a single word or phrase."),
                    "answer": a})
                })
                .collect();
            t.write(
                &format!("{instr}/{task}/{file}"),
                serde_json::to_string(&qs).unwrap(),
            );
        }
        t
    }

    fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) {
        let p = self.root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }

    fn stage_dir(&self, task: &str, method: Method) -> String {
        match (self.layout, method) {
            (Layout::Current, Method::Lora) => format!("checkpoints/LLaVA/CoIN/{task}_llava_lora"),
            (Layout::Current, Method::Moe) => {
                format!("checkpoints/LLaVA/CoIN/{task}_llava_MOE_lora")
            }
            (Layout::Old, Method::Lora) => {
                format!("checkpoints/Instruction/Only_Pretrain_1.5/{task}/llava-1.5-7b-lora")
            }
            (Layout::Old, Method::Moe) => {
                format!("checkpoints/Instruction/Only_Pretrain_1.5_MOE_2/{task}/llava-1.5-7b-lora")
            }
        }
    }

    /// A stage output dir as CoIN's trainer leaves it (tiny dims: hidden 64, r 2, 2 experts).
    fn stage(&self, task: &str, method: Method, shift: f32) {
        let dir = self.stage_dir(task, method);
        let m = "base_model.model.model.layers.0.self_attn.q_proj";
        let tensors: Vec<(String, Tensor)> = match method {
            Method::Lora => vec![
                (format!("{m}.lora_A.weight"), tensor((2, 64), shift)),
                (format!("{m}.lora_B.weight"), tensor((64, 2), shift + 0.5)),
            ],
            Method::Moe => vec![
                (format!("{m}.lora_A.loraA.0.weight"), tensor((1, 64), shift)),
                (format!("{m}.lora_A.loraA.1.weight"), tensor((1, 64), shift)),
                (format!("{m}.lora_B.loraB.0.weight"), tensor((64, 1), shift)),
                (format!("{m}.lora_B.loraB.1.weight"), tensor((64, 1), shift)),
                (format!("{m}.lora_router.weight"), tensor((2, 64), shift)),
            ],
        };
        let bytes = coin::ml::train::torch_save::torch_save_bytes(&tensors).unwrap();
        self.write(&format!("{dir}/adapter_model.bin"), bytes);
        let proj = vec![
            (
                "base_model.model.model.mm_projector.0.weight".to_string(),
                tensor((64, 32), shift),
            ),
            (
                "base_model.model.model.mm_projector.2.weight".to_string(),
                tensor((64, 64), shift),
            ),
        ];
        let bytes = coin::ml::train::torch_save::torch_save_bytes(&proj).unwrap();
        self.write(&format!("{dir}/non_lora_trainables.bin"), bytes);
        let (peft, extra) = match method {
            Method::Lora => ("LORA", String::new()),
            Method::Moe => (
                "MOE_LORA_CoIN",
                ",\n  \"expert_num\": 2,\n  \"task_embedding_dim\": 64".to_string(),
            ),
        };
        self.write(
            &format!("{dir}/adapter_config.json"),
            format!(
                "{{\n  \"base_model_name_or_path\": \"./checkpoints/LLaVA/Vicuna/vicuna-7b-v1.5\",\n  \
                 \"lora_alpha\": 4,\n  \"lora_dropout\": 0.05,\n  \"peft_type\": \"{peft}\",\n  \
                 \"r\": 2,\n  \"target_modules\": [\n    \"q_proj\"\n  ]{extra}\n}}"
            ),
        );
        self.write(
            &format!("{dir}/config.json"),
            "{\n  \"model_type\": \"llava\",\n  \"mm_hidden_size\": 32\n}\n",
        );
        self.write(
            &format!("{dir}/trainer_state.json"),
            format!(
                "{{\n  \"global_step\": {},\n  \"log_history\": []\n}}\n",
                shift as i32
            ),
        );
        // DeepSpeed's epoch checkpoint: never imported.
        self.write(
            &format!("{dir}/checkpoint-7/global_step7/zero_pp_rank_0_mp_rank_00_model_states.pt"),
            b"shard",
        );
        self.write(&format!("{dir}/checkpoint-7/adapter_model.bin"), b"old");
    }

    fn results_dir(&self, eval: &str, stage: &str) -> String {
        match self.layout {
            Layout::Current => format!("results/CoIN/LLaVA/{eval}/{stage}"),
            Layout::Old => format!("results/CoIN/{eval}/{stage}"),
        }
    }

    /// A results dir: merge.jsonl with `correct` of the four answers right, and CoIN's
    /// `Result.text` printing `printed` (default: the true score).
    fn result(
        &self,
        eval: &str,
        stage: &str,
        model_id: &str,
        correct: usize,
        printed: Option<f64>,
    ) {
        let dir = self.results_dir(eval, stage);
        let mut lines = String::new();
        for (i, gt) in GT.iter().enumerate() {
            let text = if i < correct { *gt } else { "zzz" };
            lines.push_str(&format!(
                "{{\"question_id\": {}, \"prompt\": \"What is it?\\nAnswer the question using a single word or phrase.\", \"text\": \"{text}\", \"answer_id\": \"aaaaaaaaaaaaaaaaaaaaa{i}\", \"model_id\": \"{model_id}\", \"metadata\": {{}}}}\n",
                i + 1
            ));
        }
        self.write(&format!("{dir}/1_0.jsonl"), &lines);
        self.write(&format!("{dir}/merge.jsonl"), &lines);
        let score = printed.unwrap_or(100.0 * correct as f64 / 4.0);
        self.write(
            &format!("{dir}/Result.text"),
            format!("Samples: 4\nAccuracy: {score:.2}%\n"),
        );
    }

    /// CoIN's judge output beside a results dir (scores 0–10 per reply).
    fn judge(&self, eval: &str, stage: &str, scores: &[u32], printed: u32) {
        let dir = self.results_dir(eval, stage);
        let lines: String = scores
            .iter()
            .enumerate()
            .map(|(i, s)| {
                format!("{{\"question_id\": {i}, \"prompt\": \"p\", \"text\": \"{s}\", \"answer_id\": \"x\"}}\n")
            })
            .collect();
        self.write(&format!("{dir}/prompt_eval_merge.jsonl"), lines);
        self.write(
            &format!("{dir}/Prompt_Result.text"),
            format!("Final score:{printed}"),
        );
    }
}

const ORDER: &str = "ImageNet,VizWiz,VQAv2";

/// The three-stage LoRA run of the current layout, results incl. cross-stage evaluations.
/// Hand-computed matrix (rows = after stage k, columns ImageNet, VizWiz, VQAv2):
///   ImageNet: 100,  -,   25      (VQAv2 evaluated on the ImageNet checkpoint)
///   VizWiz:    50, 75,    -
///   VQAv2:     25, 50,   75
fn lora_run(env: &TestEnvironment, layout: Layout) -> Tree {
    let t = Tree::new(env, "coin", layout);
    let id = |task: &str| match layout {
        Layout::Current => format!("{task}_llava_lora"),
        Layout::Old => "llava-1.5-7b-lora".to_string(),
    };
    for (i, task) in ["ImageNet", "VizWiz", "VQAv2"].iter().enumerate() {
        t.stage(task, Method::Lora, i as f32 + 1.0);
    }
    t.result("ImageNet", "Finetune", &id("ImageNet"), 4, None);
    t.result("VQAv2", "ImageNet", &id("ImageNet"), 1, None);
    t.result("VizWiz", "Finetune", &id("VizWiz"), 3, None);
    t.result("ImageNet", "VizWiz", &id("VizWiz"), 2, None);
    t.result("VQAv2", "Finetune", &id("VQAv2"), 3, None);
    t.result("ImageNet", "VQAv2", &id("VQAv2"), 1, None);
    t.result("VizWiz", "VQAv2", &id("VQAv2"), 2, None);
    t
}

fn init(env: &TestEnvironment) -> PathBuf {
    let repo = env.path("repo");
    std::fs::create_dir_all(&repo).unwrap();
    env.coin_in(&repo, &["init"]).success();
    repo
}

fn import(env: &TestEnvironment, repo: &Path, extra: &[&str]) -> crate::common::Output {
    let root = env.path("coin");
    let mut args = vec![
        "import",
        "coin-run",
        root.to_str().unwrap(),
        "--order",
        ORDER,
    ];
    args.extend_from_slice(extra);
    env.coin_in(repo, &args)
}

fn matrix(env: &TestEnvironment, repo: &Path, branch: &str) -> serde_json::Value {
    env.coin_in(repo, &["matrix", branch, "--json"])
        .success()
        .json()
}

fn rows(m: &serde_json::Value) -> Vec<Vec<Option<f64>>> {
    serde_json::from_value(m["matrix"].clone()).unwrap()
}

#[test]
fn current_layout_lora_run_gives_the_hand_computed_matrix() {
    let env = TestEnvironment::new();
    lora_run(&env, Layout::Current);
    let repo = init(&env);
    let out = import(&env, &repo, &["--json"]).success();
    let v = out.json();
    let stage1 = &v["plan"]["stages"][0];
    let names: Vec<&str> = stage1["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "adapter_model.bin",
            "adapter_config.json",
            "non_lora_trainables.bin",
            "config.json",
            "trainer_state.json"
        ]
    );
    assert_eq!(v["plan"]["layout"], "current");
    assert_eq!(v["plan"]["method"], "lora");
    assert_eq!(v["outcome"]["branch"], "coin-run-lora");
    let m = matrix(&env, &repo, "coin-run-lora");
    assert_eq!(
        m["tasks"],
        serde_json::json!(["ImageNet", "VizWiz", "VQAv2"])
    );
    assert_eq!(
        rows(&m),
        vec![
            vec![Some(100.0), None, Some(25.0)],
            vec![Some(50.0), Some(75.0), None],
            vec![Some(25.0), Some(50.0), Some(75.0)],
        ]
    );
    // Each stage is parented on the previous one; the first has no parent.
    let log = env
        .coin_in(&repo, &["log", "coin-run-lora", "--json"])
        .success()
        .json();
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 3);
    // The paper's table prints.
    let paper = env.coin_in(&repo, &["matrix", "coin-run-lora", "--format", "paper"]);
    assert!(paper.success().stdout.contains("VQAv2"));
}

#[test]
fn a_printed_score_that_differs_is_warned_about_and_recorded() {
    let env = TestEnvironment::new();
    let t = lora_run(&env, Layout::Current);
    t.result("VizWiz", "Finetune", "VizWiz_llava_lora", 3, Some(80.0));
    t.judge("VizWiz", "Finetune", &[10, 5, 0, 9], 60);
    let repo = init(&env);
    let out = import(&env, &repo, &[]).success();
    assert!(
        out.stderr
            .contains("coin scores 75.00, CoIN printed 80.00 (recorded both)"),
        "{}",
        out.stderr
    );
    // 100·24/40 = 60: CoIN's judge score agrees, so no judge warning.
    assert!(
        !out.stderr.contains("Prompt_Result.text says"),
        "{}",
        out.stderr
    );
    let show = env
        .coin_in(&repo, &["show", "coin-run-lora~1", "--json"])
        .success()
        .json();
    let text = show.to_string();
    assert!(text.contains("\"coin_printed\":80.0"), "{text}");
    let gk = env
        .coin_in(
            &repo,
            &["matrix", "coin-run-lora", "--metric", "gk", "--json"],
        )
        .success()
        .json();
    assert_eq!(rows(&gk)[1], vec![None, Some(60.0), None]);
}

#[test]
fn rerunning_an_import_writes_nothing_new() {
    let env = TestEnvironment::new();
    lora_run(&env, Layout::Current);
    let repo = init(&env);
    let first = import(&env, &repo, &["--json"]).success().json();
    let second = import(&env, &repo, &["--json"]).success().json();
    for (a, b) in first["outcome"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .zip(second["outcome"]["stages"].as_array().unwrap())
    {
        assert_eq!(a["id"], b["id"]);
        assert_eq!(b["reused"], true);
        assert_eq!(b["records"], serde_json::json!([]));
    }
    assert_eq!(second["outcome"]["moved"], false);
    // Another answer file for a reused stage adds that one record as a note.
    let t = Tree {
        root: env.path("coin"),
        layout: Layout::Current,
    };
    t.result("VizWiz", "VQAv2", "VQAv2_llava_lora", 4, None);
    let third = import(&env, &repo, &["--json"]).success().json();
    assert_eq!(
        third["outcome"]["stages"][2]["records"],
        serde_json::json!(["VizWiz"])
    );
    assert_eq!(
        rows(&matrix(&env, &repo, "coin-run-lora"))[2][1],
        Some(100.0)
    );
}

#[test]
fn a_dry_run_writes_nothing() {
    let env = TestEnvironment::new();
    lora_run(&env, Layout::Current);
    let repo = init(&env);
    let before = crate::common::tree_files(&repo.join(".coin"));
    let out = import(&env, &repo, &["--dry-run"]).success();
    assert!(out.stdout.contains("stage 2 VizWiz"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("eval ImageNet   VizWiz     50.00 n=4 (CoIN printed 50.00)"),
        "{}",
        out.stdout
    );
    assert!(out.stderr.contains("Dry run: nothing was written."));
    assert_eq!(crate::common::tree_files(&repo.join(".coin")), before);
    env.coin_in(&repo, &["matrix", "coin-run-lora"]).code(1);
    // Outside any repository too.
    import(&env, &env.work(), &["--dry-run"]).success();
}

#[test]
fn a_partial_tree_imports_the_stages_before_the_first_gap_and_can_be_completed() {
    let env = TestEnvironment::new();
    let t = Tree::new(&env, "coin", Layout::Current);
    t.stage("ImageNet", Method::Lora, 1.0);
    t.stage("VQAv2", Method::Lora, 3.0);
    t.result("ImageNet", "Finetune", "ImageNet_llava_lora", 4, None);
    // An eval that stopped before merging its chunks.
    t.write(&(t.results_dir("VizWiz", "ImageNet") + "/1_0.jsonl"), "");
    let repo = init(&env);
    let out = import(&env, &repo, &["--json"]).success();
    let v = out.json();
    assert_eq!(v["outcome"]["stages"].as_array().unwrap().len(), 1);
    let missing = v["plan"]["missing"].to_string();
    assert!(
        missing.contains("stage 2 (VizWiz): no stage dir"),
        "{missing}"
    );
    assert!(
        missing.contains("stage 3 (VQAv2): not imported"),
        "{missing}"
    );
    assert!(out.stderr.contains("no merge.jsonl"), "{}", out.stderr);
    let first_id = v["outcome"]["stages"][0]["id"].clone();
    // The rest of the run arrives: the import extends the branch.
    t.stage("VizWiz", Method::Lora, 2.0);
    let v = import(&env, &repo, &["--json"]).success().json();
    assert_eq!(v["outcome"]["stages"][0]["id"], first_id);
    assert_eq!(v["outcome"]["stages"][0]["reused"], true);
    assert_eq!(v["outcome"]["stages"][2]["reused"], false);
    assert_eq!(v["outcome"]["moved"], true);
    assert_eq!(
        matrix(&env, &repo, "coin-run-lora")["tasks"],
        serde_json::json!(["ImageNet", "VizWiz", "VQAv2"])
    );
    // A changed stage file conflicts with what the branch holds.
    t.stage("VizWiz", Method::Lora, 9.0);
    let out = import(&env, &repo, &[]).code(1);
    assert!(
        out.stderr.contains("is not this run's VizWiz stage"),
        "{}",
        out.stderr
    );
}

#[test]
fn old_layout_imports_with_the_same_matrix() {
    let env = TestEnvironment::new();
    lora_run(&env, Layout::Old);
    let repo = init(&env);
    let v = import(&env, &repo, &["--json"]).success().json();
    assert_eq!(v["plan"]["layout"], "old");
    assert_eq!(
        rows(&matrix(&env, &repo, "coin-run-lora")),
        vec![
            vec![Some(100.0), None, Some(25.0)],
            vec![Some(50.0), Some(75.0), None],
            vec![Some(25.0), Some(50.0), Some(75.0)],
        ]
    );
}

#[test]
fn moelora_runs_are_told_apart_by_dir_and_model_id() {
    let env = TestEnvironment::new();
    let t = lora_run(&env, Layout::Current);
    for (i, task) in ["ImageNet", "VizWiz", "VQAv2"].iter().enumerate() {
        t.stage(task, Method::Moe, i as f32 + 5.0);
    }
    let repo = init(&env);
    let out = import(&env, &repo, &[]).code(1);
    assert!(
        out.stderr.contains("both a LoRA and a MoELoRA run"),
        "{}",
        out.stderr
    );
    // The MoE evaluation of VizWiz overwrote the LoRA one in the shared results dir.
    t.result("VizWiz", "Finetune", "VizWiz_llava_MOE_lora", 2, None);
    let v = import(&env, &repo, &["--method", "moelora", "--json"])
        .success()
        .json();
    assert_eq!(v["outcome"]["branch"], "coin-run-moelora");
    let m = rows(&matrix(&env, &repo, "coin-run-moelora"));
    // Only the results whose model_id is a MoE checkpoint's are this run's.
    assert_eq!(
        m,
        vec![
            vec![None, None, None],
            vec![None, Some(50.0), None],
            vec![None, None, None]
        ]
    );
    let skipped = v["plan"]["warnings"].to_string();
    assert!(
        skipped.contains(
            "its model_id ImageNet_llava_lora is a lora checkpoint, not this moelora run's"
        ),
        "{skipped}"
    );
    let lora = import(&env, &repo, &["--method", "lora"]).success();
    assert!(lora
        .stderr
        .contains("VizWiz_llava_MOE_lora is a moelora checkpoint"));
    assert_eq!(rows(&matrix(&env, &repo, "coin-run-lora"))[1][1], None);
}

#[test]
fn renamed_trees_are_read_with_checkpoints_and_results() {
    let env = TestEnvironment::new();
    let t = lora_run(&env, Layout::Current);
    let ck = t.root.join("checkpoints/LLaVA/CoIN");
    let res = t.root.join("results/CoIN/LLaVA");
    std::fs::rename(&ck, env.path("ck")).unwrap();
    std::fs::rename(&res, env.path("res")).unwrap();
    let repo = init(&env);
    let root = env.path("coin");
    let v = env
        .coin_in(
            &repo,
            &[
                "import",
                "coin-run",
                root.to_str().unwrap(),
                "--order",
                ORDER,
                "--layout",
                "current",
                "--checkpoints",
                "../ck",
                "--results",
                "../res",
                "--branch",
                "run1",
                "--json",
            ],
        )
        .success()
        .json();
    assert_eq!(v["outcome"]["stages"].as_array().unwrap().len(), 3);
    assert_eq!(
        rows(&matrix(&env, &repo, "run1"))[2],
        vec![Some(25.0), Some(50.0), Some(75.0)]
    );
    // Auto-detection sees MoELoRA stage dirs in --checkpoints too.
    std::fs::create_dir_all(env.path("ck/VizWiz_llava_MOE_lora")).unwrap();
    let out = env.coin_in(
        &repo,
        &[
            "import",
            "coin-run",
            root.to_str().unwrap(),
            "--checkpoints",
            "../ck",
            "--results",
            "../res",
            "--dry-run",
        ],
    );
    assert!(
        out.code(1).stderr.contains("both a LoRA and a MoELoRA run"),
        "renamed MoELoRA dirs are detected"
    );
}

/// ScienceQA and TextVQA read their annotation files from `--data`; a stage saved by a newer
/// peft (adapter_model.safetensors) imports too.
#[test]
fn annotation_files_come_from_data_and_safetensors_stages_import() {
    let env = TestEnvironment::new();
    let t = Tree::new(&env, "coin", Layout::Current);
    t.stage("ScienceQA", Method::Lora, 1.0);
    t.stage("TextVQA", Method::Lora, 2.0);
    let tv = "checkpoints/LLaVA/CoIN/TextVQA_llava_lora";
    std::fs::remove_file(t.root.join(tv).join("adapter_model.bin")).unwrap();
    t.write(
        &format!("{tv}/adapter_model.safetensors"),
        crate::common::st::adapter(0.5),
    );
    let q =
        "What is it?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly.";
    t.write(
        "playground/Instructions_Original/ScienceQA/test.json",
        serde_json::to_string(&serde_json::json!([
            {"question_id": "p1", "text": q, "answer": "A"},
            {"question_id": "p2", "text": q, "answer": "B"},
        ]))
        .unwrap(),
    );
    t.write(
        "playground/Instructions_Original/TextVQA/val.json",
        serde_json::to_string(&serde_json::json!([
            {"question_id": 1, "text": "What word?", "answer": "cat"},
            {"question_id": 2, "text": "What word?", "answer": "dog"},
        ]))
        .unwrap(),
    );
    let data = env.path("data");
    std::fs::create_dir_all(data.join("ScienceQA")).unwrap();
    std::fs::create_dir_all(data.join("TextVQA")).unwrap();
    std::fs::write(
        data.join("ScienceQA/problems.json"),
        r#"{"p1": {"choices": ["x", "y"], "answer": 0}, "p2": {"choices": ["x", "y"], "answer": 1}}"#,
    )
    .unwrap();
    std::fs::write(
        data.join("ScienceQA/pid_splits.json"),
        r#"{"test": ["p1", "p2"]}"#,
    )
    .unwrap();
    std::fs::write(
        data.join("TextVQA/TextVQA_0.5.1_val.json"),
        serde_json::to_string(&serde_json::json!({"data": [
            {"question_id": 1, "answers": vec!["cat"; 10]},
            {"question_id": 2, "answers": vec!["dog"; 10]},
        ]}))
        .unwrap(),
    )
    .unwrap();
    let line = |qid: serde_json::Value, text: &str, model: &str| {
        format!(
            "{}\n",
            serde_json::json!({"question_id": qid, "prompt": "p", "text": text,
                "answer_id": "a", "model_id": model, "metadata": {}})
        )
    };
    let sqa = |stage: &str, model: &str, second: &str| {
        let dir = t.results_dir("ScienceQA", stage);
        t.write(
            &format!("{dir}/merge.jsonl"),
            line(serde_json::json!("p1"), "A", model)
                + &line(serde_json::json!("p2"), second, model),
        );
    };
    sqa("Finetune", "ScienceQA_llava_lora", "B");
    t.write(
        &(t.results_dir("ScienceQA", "Finetune") + "/output_result.jsonl"),
        "{\n  \"acc\": 100.0,\n  \"correct\": 2,\n  \"count\": 2\n}",
    );
    sqa("TextVQA", "TextVQA_llava_lora", "A");
    t.write(
        &(t.results_dir("TextVQA", "Finetune") + "/merge.jsonl"),
        line(serde_json::json!(1), "cat", "TextVQA_llava_lora")
            + &line(serde_json::json!(2), "zzz", "TextVQA_llava_lora"),
    );
    let repo = init(&env);
    let root = t.root.to_str().unwrap().to_string();
    let args = ["import", "coin-run", &root, "--order", "ScienceQA,TextVQA"];
    // Without the annotation files the records are left out, and said so.
    let out = env
        .coin_in(&repo, &[&args[..], &["--dry-run"]].concat())
        .success();
    assert!(out.stderr.contains("give --data"), "{}", out.stderr);
    let v = env
        .coin_in(
            &repo,
            &[&args[..], &["--data", "../data", "--json"]].concat(),
        )
        .success()
        .json();
    assert_eq!(
        v["plan"]["stages"][1]["files"][0]["name"],
        "adapter_model.safetensors"
    );
    assert_eq!(
        rows(&matrix(&env, &repo, "coin-run-lora")),
        vec![vec![Some(100.0), None], vec![Some(50.0), Some(50.0)]]
    );
}

/// An import killed between two stages leaves the branch as it was; the next run completes it.
#[test]
fn an_import_killed_half_way_moves_no_branch() {
    let env = TestEnvironment::new();
    lora_run(&env, Layout::Current);
    let repo = init(&env);
    let root = env.path("coin");
    let out = crate::common::run(
        env.coin_cmd(&repo)
            .args([
                "import",
                "coin-run",
                root.to_str().unwrap(),
                "--order",
                ORDER,
            ])
            .env("COIN_FAULT", "commit.after_git_objects:2"),
    );
    assert_ne!(out.code, 0);
    let branches = env.coin_in(&repo, &["branch"]).success();
    assert!(
        !branches.stdout.contains("coin-run-lora"),
        "{}",
        branches.stdout
    );
    let v = import(&env, &repo, &["--json"]).success().json();
    assert_eq!(v["outcome"]["stages"].as_array().unwrap().len(), 3);
    env.coin_in(&repo, &["fsck"]).success();
}

/// Files of the tree that are symbolic links are not imported: a link could pull a file from
/// elsewhere on this machine into a checkpoint that is then shared.
#[test]
#[cfg(unix)]
fn symbolic_links_in_the_tree_are_not_followed() {
    let env = TestEnvironment::new();
    let t = lora_run(&env, Layout::Current);
    let link = |rel: &str| {
        let p = t.root.join(rel);
        let outside = env.path(format!("outside-{}", rel.replace('/', "_")));
        std::fs::rename(&p, &outside).unwrap();
        std::os::unix::fs::symlink(&outside, &p).unwrap();
    };
    link("checkpoints/LLaVA/CoIN/VizWiz_llava_lora/adapter_model.bin");
    link("results/CoIN/LLaVA/ImageNet/Finetune/merge.jsonl");
    let repo = init(&env);
    let out = import(&env, &repo, &[]).success();
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains("merge.jsonl: no accuracy record: a symbolic link")
            && text.contains("adapter_model.bin: a symbolic link, not imported"),
        "{text}"
    );
    let m = matrix(&env, &repo, "coin-run-lora");
    assert_eq!(
        rows(&m),
        vec![vec![None, Some(25.0)]],
        "only the first stage, without its linked answers"
    );
}

/// The paths of a checkpoint's files and their store kinds (`coin show --json`).
fn shown_files(env: &TestEnvironment, repo: &Path, rev: &str) -> Vec<(String, String)> {
    let show = env.coin_in(repo, &["show", rev, "--json"]).success().json();
    show["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A fuller Trainer checkpoint in the first stage's `checkpoint-7/` (beside the two files
/// `Tree::stage` writes): a torch `.bin` coin can read, rng states, `latest`, and a link.
fn trainer_checkpoint(env: &TestEnvironment, t: &Tree) -> String {
    let dir = t.stage_dir("ImageNet", Method::Lora) + "/checkpoint-7";
    let bytes = coin::ml::train::torch_save::torch_save_bytes(&[(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string(),
        tensor((2, 64), 5.0),
    )])
    .unwrap();
    t.write(&format!("{dir}/pytorch_model.bin"), bytes);
    t.write(&format!("{dir}/rng_state_0.pth"), b"not a zip");
    t.write(&format!("{dir}/latest"), "global_step7");
    #[cfg(unix)]
    {
        let outside = env.path("outside-secret");
        std::fs::write(&outside, "secret").unwrap();
        std::os::unix::fs::symlink(&outside, t.root.join(&dir).join("zero_to_fp32.py")).unwrap();
    }
    dir
}

#[test]
fn trainer_checkpoints_are_imported_only_when_asked() {
    let env = TestEnvironment::new();
    let t = lora_run(&env, Layout::Current);
    let dir = trainer_checkpoint(&env, &t);
    // Without the option: the stage dir's own files only.
    let repo = init(&env);
    import(&env, &repo, &[]).success();
    let files = shown_files(&env, &repo, "coin-run-lora~2");
    assert!(
        files.iter().all(|(p, _)| !p.starts_with("checkpoint-")),
        "{files:?}"
    );
    // With it, into another branch: every file of checkpoint-7/ under its relative path.
    let out = import(
        &env,
        &repo,
        &["--with-trainer-checkpoints", "--branch", "full", "--json"],
    )
    .success();
    let v = out.json();
    let names: Vec<&str> = v["plan"]["stages"][0]["trainer_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "checkpoint-7/adapter_model.bin",
            "checkpoint-7/global_step7/zero_pp_rank_0_mp_rank_00_model_states.pt",
            "checkpoint-7/latest",
            "checkpoint-7/pytorch_model.bin",
            "checkpoint-7/rng_state_0.pth",
        ]
    );
    #[cfg(unix)]
    assert!(
        out.stderr
            .contains("zero_to_fp32.py: a symbolic link, not imported"),
        "{}",
        out.stderr
    );
    let files = shown_files(&env, &repo, "full~2");
    let kind = |p: &str| {
        files
            .iter()
            .find(|(f, _)| f == p)
            .map(|(_, k)| k.as_str())
            .unwrap_or_else(|| panic!("{p} not in {files:?}"))
    };
    // A torch zip coin reads is stored per storage; anything else whole.
    assert_eq!(kind("checkpoint-7/pytorch_model.bin"), "torchbin");
    assert_eq!(kind("checkpoint-7/rng_state_0.pth"), "blob");
    assert_eq!(kind("adapter_model.bin"), "torchbin");
    assert!(!files.iter().any(|(p, _)| p.contains("zero_to_fp32")));
    // Checked out byte for byte.
    env.coin_in(&repo, &["checkout", "full~2", "--output", "out"])
        .success();
    for rel in [
        "global_step7/zero_pp_rank_0_mp_rank_00_model_states.pt",
        "pytorch_model.bin",
    ] {
        assert_eq!(
            std::fs::read(repo.join("out/checkpoint-7").join(rel)).unwrap(),
            std::fs::read(t.root.join(&dir).join(rel)).unwrap(),
            "{rel}"
        );
    }
    // Every stage brings its own.
    assert!(shown_files(&env, &repo, "full")
        .iter()
        .any(|(p, _)| p.starts_with("checkpoint-7/")));
}

#[test]
fn a_dry_run_lists_the_trainer_checkpoint_files_and_their_size() {
    let env = TestEnvironment::new();
    let t = lora_run(&env, Layout::Current);
    trainer_checkpoint(&env, &t);
    let repo = init(&env);
    let out = import(&env, &repo, &["--dry-run", "--with-trainer-checkpoints"]).success();
    let pt = t
        .root
        .join(t.stage_dir("ImageNet", Method::Lora))
        .join("checkpoint-7/pytorch_model.bin");
    let pt_size = std::fs::metadata(&pt).unwrap().len();
    // shard (5) + old (3) + latest (12) + rng (9) + the torch file.
    let total = 5 + 3 + 12 + 9 + pt_size;
    assert!(
        out.stdout.contains(&format!(
            "  trainer checkpoints: 5 files, {total} bytes\n    checkpoint-7/adapter_model.bin (3 bytes)\n"
        )),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("    checkpoint-7/latest (12 bytes)"),
        "{}",
        out.stdout
    );
    // The other stages have checkpoint-7/ with two files.
    assert!(
        out.stdout
            .contains("  trainer checkpoints: 2 files, 8 bytes"),
        "{}",
        out.stdout
    );
    // Without the option nothing of checkpoint-7/ is listed.
    let out = import(&env, &repo, &["--dry-run"]).success();
    assert!(!out.stdout.contains("checkpoint-7"), "{}", out.stdout);
}

#[test]
fn rerunning_with_or_without_trainer_checkpoints_never_replaces_a_stage() {
    let env = TestEnvironment::new();
    let t = lora_run(&env, Layout::Current);
    trainer_checkpoint(&env, &t);
    let repo = init(&env);
    let first = import(&env, &repo, &["--with-trainer-checkpoints", "--json"])
        .success()
        .json();
    // Same option: nothing is written.
    let before = crate::common::tree_files(&repo.join(".coin"));
    let head = |env: &TestEnvironment| {
        env.coin_in(&repo, &["show", "coin-run-lora", "--json"])
            .success()
            .json()["id"]
            .clone()
    };
    let head_before = head(&env);
    let again = import(&env, &repo, &["--with-trainer-checkpoints", "--json"])
        .success()
        .json();
    assert_eq!(again["outcome"]["moved"], false);
    for (a, b) in first["outcome"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .zip(again["outcome"]["stages"].as_array().unwrap())
    {
        assert_eq!(
            (&a["id"], &b["reused"]),
            (&b["id"], &serde_json::json!(true))
        );
    }
    assert_eq!(crate::common::tree_files(&repo.join(".coin")), before);
    // Without the option: the stages (which hold more) are reused, not replaced.
    let without = import(&env, &repo, &["--json"]).success().json();
    assert_eq!(without["outcome"]["stages"][0]["reused"], true);
    assert_eq!(without["outcome"]["moved"], false);
    assert_eq!(head(&env), head_before);
    // A changed trainer file with the option conflicts.
    t.write(
        &(t.stage_dir("ImageNet", Method::Lora) + "/checkpoint-7/latest"),
        "global_step8",
    );
    let out = import(&env, &repo, &["--with-trainer-checkpoints"]).code(1);
    assert!(
        out.stderr.contains("its checkpoint-N/ files differ"),
        "{}",
        out.stderr
    );

    // The other way round: imported without the option, asked again with it.
    let out = import(&env, &repo, &["--branch", "plain"]).success();
    drop(out);
    let plain = env
        .coin_in(&repo, &["show", "plain", "--json"])
        .success()
        .json()["id"]
        .clone();
    let out = import(
        &env,
        &repo,
        &["--branch", "plain", "--with-trainer-checkpoints"],
    )
    .code(1);
    assert!(
        out.stderr.contains(
            "is not this run's ImageNet stage (it was imported without \
             --with-trainer-checkpoints, and an import never replaces a stage)"
        ),
        "{}",
        out.stderr
    );
    assert_eq!(
        env.coin_in(&repo, &["show", "plain", "--json"])
            .success()
            .json()["id"],
        plain
    );
    // The dry run says so per stage.
    let out = import(
        &env,
        &repo,
        &[
            "--branch",
            "plain",
            "--with-trainer-checkpoints",
            "--dry-run",
        ],
    )
    .success();
    assert!(
        out.stdout.contains("the import would stop")
            && out
                .stdout
                .contains("not reached (an earlier stage conflicts)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("the import would stop"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_dry_run_says_per_stage_whether_the_branch_holds_it() {
    let env = TestEnvironment::new();
    let t = Tree::new(&env, "coin", Layout::Current);
    t.stage("ImageNet", Method::Lora, 1.0);
    t.result("ImageNet", "Finetune", "ImageNet_llava_lora", 4, None);
    let repo = init(&env);
    import(&env, &repo, &[]).success();
    let id = env
        .coin_in(&repo, &["show", "coin-run-lora", "--json"])
        .success()
        .json()["short_id"]
        .as_str()
        .unwrap()
        .to_string();
    // The run grows: a second stage and a new result for the first.
    t.stage("VizWiz", Method::Lora, 2.0);
    t.result("VizWiz", "ImageNet", "ImageNet_llava_lora", 2, None);
    let out = import(&env, &repo, &["--dry-run"]).success();
    assert!(
        out.stdout
            .contains("stage 1 ImageNet: checkpoints/LLaVA/CoIN/ImageNet_llava_lora (5 files, "),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!(
            "  branch coin-run-lora: already holds it as {id}; would be reused, adding \
             record(s) VizWiz\n"
        )),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("  branch coin-run-lora: not there yet; would be added\n"),
        "{}",
        out.stdout
    );
    let v = import(&env, &repo, &["--dry-run", "--json"])
        .success()
        .json();
    assert_eq!(v["targets"][0]["action"], "reuse");
    assert_eq!(
        v["targets"][0]["new_records"],
        serde_json::json!(["VizWiz"])
    );
    assert_eq!(v["targets"][1]["action"], "add");
    // After the import both are held, with nothing new.
    import(&env, &repo, &[]).success();
    let out = import(&env, &repo, &["--dry-run"]).success();
    assert_eq!(
        out.stdout.matches("; would be reused\n").count(),
        2,
        "{}",
        out.stdout
    );
    // Another branch: every stage would be added; outside a repository too.
    let out = import(&env, &repo, &["--dry-run", "--branch", "other"]).success();
    assert_eq!(
        out.stdout.matches("would be added").count(),
        2,
        "{}",
        out.stdout
    );
    let out = import(&env, &env.work(), &["--dry-run"]).success();
    assert!(
        out.stderr
            .contains("Not in a coin repository: every stage would be added."),
        "{}",
        out.stderr
    );
}

/// `commit_root_files` (what the import writes through) checks the names it is given as
/// `coin commit` checks paths, and refuses links.
#[test]
fn named_files_are_checked_before_anything_is_written() {
    use coin::history::{CoinRepo, CommitRequest, SourceFile};
    let env = TestEnvironment::new();
    let repo_dir = init(&env);
    let repo = CoinRepo::open(&repo_dir).unwrap();
    let file = env.path("f.bin");
    std::fs::write(&file, b"x").unwrap();
    let req = CommitRequest {
        task: "ImageNet".into(),
        detached: true,
        skip_hooks: true,
        ..Default::default()
    };
    let named = |rel: &str, disk: &Path| SourceFile {
        disk: disk.to_path_buf(),
        rel: rel.to_string(),
    };
    let before = crate::common::tree_files(&repo_dir.join(".coin"));
    let err = |files: Vec<SourceFile>| repo.commit_root_files(&req, files).unwrap_err().to_string();
    assert!(err(vec![named("../f.bin", &file)]).contains("cannot commit"));
    assert!(err(vec![named("a/f.bin", &file), named("a/f.bin", &file)])
        .contains("two files would be committed as 'a/f.bin'"));
    assert!(err(vec![]).contains("nothing to commit"));
    #[cfg(unix)]
    {
        let link = env.path("link.bin");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(err(vec![named("a/link.bin", &link)]).contains("is not a regular file"));
    }
    assert_eq!(crate::common::tree_files(&repo_dir.join(".coin")), before);
    let made = repo
        .commit_root_files(&req, vec![named("checkpoint-1/sub/f.bin", &file)])
        .unwrap();
    assert!(made.files == 1);
    assert_ne!(crate::common::tree_files(&repo_dir.join(".coin")), before);
}
