//! All end-to-end tests, one binary (faster to link than one per file).

mod common;

mod test_bench_data_command;
mod test_bisect;
mod test_cli_output;
mod test_compat_fixtures;
mod test_compress;
mod test_demo;
mod test_export;
mod test_external;
mod test_gk_command;
mod test_history;
mod test_hostile_models;
mod test_hostile_remotes;
mod test_import;
mod test_judge_command;
mod test_layering;
mod test_merge;
mod test_metrics_command;
mod test_model_command;
mod test_parity;
mod test_s3;
mod test_score_command;
mod test_score_limits;
mod test_sharing;
mod test_split_setup;
mod test_store_crash;
mod test_task_command;
mod test_tokenize;
mod test_torchbin;
mod test_train_parity;
mod test_workflow_eval;
mod test_workflow_train;

#[test]
fn every_test_file_is_listed() {
    // A test_*.rs file that is not a `mod` above would silently never run.
    let listed = include_str!("runner.rs");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    for entry in std::fs::read_dir(dir).expect("tests dir") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if let Some(stem) = name
            .strip_prefix("test_")
            .and_then(|n| n.strip_suffix(".rs"))
        {
            assert!(
                listed.contains(&format!("mod test_{stem};")),
                "tests/{name} is not listed in runner.rs"
            );
        }
    }
}
