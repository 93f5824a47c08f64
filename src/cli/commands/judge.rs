use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::history::records::{gk_task, GK_METRIC};
use crate::history::{CheckpointId, CoinRepo, EvalRecord};
use crate::store::fsutil::write_atomic;
use crate::tasks::formats::{read_answer_file, read_test_file};
use crate::tasks::judge::{
    self, JudgeClient, JudgeMeta, JudgeRule, JudgeScore, JudgeSource, Sampling,
};
use crate::tasks::ScorerKind;

use super::history_util::open_repo;

/// Write CoIN's general-knowledge judge prompts for an answer file, and optionally run them
///
/// Always writes OUT/prompt_to_eval.json, byte for byte as CoIN's create_prompt.py does, so
/// CoIN's judge script can read it. With --endpoint (an OpenAI-compatible `http://…/v1` server)
/// it asks the judge for each answer, saves progress in OUT/judge_progress.jsonl (a rerun
/// resumes), writes the replies to OUT/prompt_eval_merge.jsonl (CoIN's judge output layout)
/// and reports 100·Σs/(10·N). With --replies it only scores a judge output file CoIN's scripts
/// made (prompt_eval_merge.jsonl).
///
/// Sampling defaults to CoIN's judge settings (temperature 0.7, top_p 0.8, repetition penalty
/// 1.05, 20 tokens), so scores vary from run to run as CoIN's do; `--temperature 0` decodes
/// greedily for repeatable scores.
///
/// --record REV stores the score as an eval record `GK:<task>` of checkpoint REV (metric
/// general_knowledge, the replies file as a store object, the judge model, prompt version,
/// sampling settings and endpoint host), shown by `coin log`, `coin diff` and
/// `coin matrix --metric gk`.
#[derive(clap::Args, Debug)]
pub struct JudgeArgs {
    /// The task (Grounding uses the box rule); with --replies, the task the replies judge
    #[arg(long, required_unless_present = "replies")]
    pub task: Option<String>,
    /// The task's test/val JSON (CoIN format)
    #[arg(long, required_unless_present = "replies")]
    pub questions: Option<PathBuf>,
    /// The answer file (JSONL)
    #[arg(long, required_unless_present = "replies")]
    pub answers: Option<PathBuf>,
    /// Where to write the prompts, progress and replies
    #[arg(long, required_unless_present = "replies")]
    pub out: Option<PathBuf>,
    /// Only score an existing judge output file (JSONL with the reply in "text")
    #[arg(long, conflicts_with_all = ["questions", "answers", "out", "endpoint"])]
    pub replies: Option<PathBuf>,
    /// Record the score on checkpoint REV as the eval record GK:<task> (needs --task, and
    /// --endpoint or --replies)
    #[arg(long, value_name = "REV", requires = "task")]
    pub record: Option<String>,
    /// An OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 or https://api.example.com/v1
    #[arg(long, requires = "judge_model")]
    pub endpoint: Option<String>,
    /// The environment variable holding the endpoint's API key, sent as a bearer token if set
    #[arg(long, default_value = "OPENAI_API_KEY", value_name = "VAR")]
    pub api_key_env: String,
    /// The judge model name sent to the endpoint, and recorded (CoIN: Qwen1.5-32B-Chat)
    #[arg(long)]
    pub judge_model: Option<String>,
    /// Sampling temperature (CoIN: 0.7; 0 decodes greedily, so the score is repeatable)
    #[arg(long, default_value_t = Sampling::COIN.temperature)]
    pub temperature: f64,
    /// Nucleus sampling mass (CoIN: 0.8)
    #[arg(long, default_value_t = Sampling::COIN.top_p)]
    pub top_p: f64,
    /// vLLM's repetition penalty, sent as an extra field (CoIN: 1.05; 1 leaves the field out,
    /// for servers that refuse it)
    #[arg(long, default_value_t = Sampling::COIN.repetition_penalty)]
    pub repetition_penalty: f64,
    /// Maximum reply tokens (CoIN: 20)
    #[arg(long, default_value_t = Sampling::COIN.max_tokens)]
    pub max_tokens: u32,
    /// Seconds to wait for each reply
    #[arg(long, default_value_t = 120.0)]
    pub timeout_s: f64,
    /// Extra attempts per request after a failure
    #[arg(long, default_value_t = 2)]
    pub retries: u32,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

impl JudgeArgs {
    fn sampling(&self) -> Result<Sampling, CommandError> {
        let s = Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            max_tokens: self.max_tokens,
        };
        s.check().map_err(CommandError::usage)?;
        Ok(s)
    }
}

/// The task's canonical name and its judge rule (Grounding: the box rule).
fn task_rule(helper: &CommandHelper, task: &str) -> Result<(String, JudgeRule), CommandError> {
    let (name, kind, _) = super::score::resolve_scorer(helper, task)?;
    let rule = if kind == ScorerKind::Grounding {
        JudgeRule::CoINGrounding
    } else {
        JudgeRule::CoIN
    };
    Ok((name, rule))
}

/// Where a score is to be recorded: the repository and the checkpoint, resolved before any
/// judging so a wrong revision fails first.
struct RecordTarget {
    repo: CoinRepo,
    id: CheckpointId,
}

fn record_target(
    helper: &CommandHelper,
    args: &JudgeArgs,
) -> Result<Option<RecordTarget>, CommandError> {
    let Some(rev) = &args.record else {
        return Ok(None);
    };
    if args.replies.is_none() && args.endpoint.is_none() {
        return Err(CommandError::usage(
            "--record needs a score: give --endpoint (and --judge-model) to ask a judge, or \
             --replies with a judge output file",
        ));
    }
    let repo = open_repo(helper)?;
    let id = repo.resolve(rev)?;
    Ok(Some(RecordTarget { repo, id }))
}

/// Store the replies as a blob and attach the `GK:<task>` record; the record's task name.
fn record_score(
    ui: &mut Ui,
    target: &RecordTarget,
    task: &str,
    summary: &JudgeScore,
    replies: &[u8],
    meta: &JudgeMeta,
) -> Result<String, CommandError> {
    let blob = target.repo.store().put_blob_bytes(replies)?;
    let mut extra = BTreeMap::new();
    extra.insert("judge".to_string(), serde_json::to_value(meta)?);
    extra.insert("replies".to_string(), serde_json::json!(blob.to_string()));
    extra.insert("rounded".to_string(), serde_json::json!(summary.rounded));
    let record = EvalRecord {
        metric: GK_METRIC.to_string(),
        score: summary.score,
        n: summary.n as u64,
        extra,
    };
    let name = gk_task(task);
    let mut one = BTreeMap::new();
    one.insert(name.clone(), record);
    target.repo.add_eval_records(target.id, &one)?;
    ui.status(&format!(
        "Recorded {name} {:.2} on {}.",
        summary.score,
        target.id.short()
    ));
    super::eval::post_eval(ui, &target.repo, target.id, vec![name.clone()])?;
    Ok(name)
}

pub fn cmd_judge(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &JudgeArgs,
) -> Result<(), CommandError> {
    let sampling = args.sampling()?;
    let task = args
        .task
        .as_deref()
        .map(|t| task_rule(helper, t))
        .transpose()?;
    let target = record_target(helper, args)?;
    if let Some(replies) = &args.replies {
        let path = helper.cwd.join(replies);
        // The bounded reader refuses a broken or empty file before the whole file is read to
        // be stored.
        let summary = judge::summarise(&judge::read_reply_scores(&path)?);
        let mut recorded = None;
        if let (Some(target), Some((name, rule))) = (&target, &task) {
            let bytes = std::fs::read(&path).map_err(|e| CommandError::io("read", &path, e))?;
            let meta = JudgeMeta {
                model: args.judge_model.clone(),
                rule: rule.name().to_string(),
                prompt_version: rule.prompt_version(),
                sampling,
                endpoint_host: None,
                source: JudgeSource::RepliesFile,
            };
            recorded = Some(record_score(ui, target, name, &summary, &bytes, &meta)?);
        }
        if args.json {
            let mut v = serde_json::json!({
                "metric": GK_METRIC, "score": summary.score, "rounded": summary.rounded, "n": summary.n,
            });
            if let Some((name, _)) = &task {
                v["task"] = serde_json::json!(name);
            }
            if let Some(r) = recorded {
                v["recorded"] = serde_json::json!(r);
            }
            return ui.json(&v);
        }
        writeln!(
            ui.out(),
            "general knowledge: {:.2} (CoIN prints {}) over {} replies",
            summary.score,
            summary.rounded,
            summary.n
        )?;
        return Ok(());
    }
    let (Some((name, rule)), Some(questions), Some(answers), Some(out_arg)) =
        (task, &args.questions, &args.answers, &args.out)
    else {
        return Err(CommandError::usage(
            "--task, --questions, --answers and --out are required without --replies",
        ));
    };
    let questions = read_test_file(&helper.cwd.join(questions))?;
    let answers = read_answer_file(&helper.cwd.join(answers))?;
    let items = judge::judge_items(&questions, &answers, rule)?;
    let out = helper.cwd.join(out_arg);
    std::fs::create_dir_all(&out).map_err(|e| CommandError::io("create", out_arg, e))?;
    let prompts = out.join("prompt_to_eval.json");
    write_atomic(&prompts, judge::prompt_file(&items, rule))
        .map_err(|e| CommandError::io("write", &prompts, e))?;
    ui.status(&format!(
        "Wrote {} judge prompts to {}.",
        items.len(),
        prompts.display()
    ));
    let (Some(endpoint), Some(model)) = (&args.endpoint, &args.judge_model) else {
        if args.json {
            return ui
                .json(&serde_json::json!({"task": name, "prompts": prompts, "n": items.len()}));
        }
        return Ok(());
    };
    if !(args.timeout_s > 0.0 && args.timeout_s.is_finite()) {
        return Err(CommandError::usage(
            "--timeout-s must be a positive number of seconds",
        ));
    }
    let api_key = std::env::var(&args.api_key_env)
        .ok()
        .filter(|k| !k.is_empty());
    let client = JudgeClient {
        endpoint: endpoint.clone(),
        api_key,
        model: model.clone(),
        sampling,
        timeout: Duration::from_secs_f64(args.timeout_s),
        retries: args.retries,
        backoff: Duration::from_millis(500),
    };
    let progress = out.join("judge_progress.jsonl");
    let done = judge::run_judge(&client, &items, rule, &progress, |i, n| {
        if i % 50 == 0 || i == n {
            ui.status(&format!("Judged {i} of {n}."));
        }
    })
    .map_err(|e| {
        CommandError::from(e).hint(format!(
            "Progress is saved in {}; run the same command again to resume.",
            progress.display()
        ))
    })?;
    let replies_path = out.join("prompt_eval_merge.jsonl");
    let replies = judge::replies_file(&done);
    write_atomic(&replies_path, &replies)
        .map_err(|e| CommandError::io("write", &replies_path, e))?;
    let scores: Vec<f64> = done.iter().map(|j| j.score).collect();
    let summary = judge::summarise(&scores);
    let recorded = match &target {
        Some(target) => {
            let meta = JudgeMeta {
                model: Some(model.clone()),
                rule: rule.name().to_string(),
                prompt_version: rule.prompt_version(),
                sampling,
                endpoint_host: Some(judge::endpoint_host(endpoint)),
                source: JudgeSource::Endpoint,
            };
            Some(record_score(
                ui,
                target,
                &name,
                &summary,
                replies.as_bytes(),
                &meta,
            )?)
        }
        None => None,
    };
    if args.json {
        return ui.json(&serde_json::json!({
            "task": name, "metric": GK_METRIC, "judge_model": model,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
            "repetition_penalty": sampling.repetition_penalty, "max_tokens": sampling.max_tokens,
            "prompt_version": rule.prompt_version(), "score": summary.score,
            "rounded": summary.rounded, "n": summary.n, "recorded": recorded,
        }));
    }
    writeln!(
        ui.out(),
        "{name} general knowledge (judge {model}): {:.2} over {} answers",
        summary.score,
        summary.n
    )?;
    Ok(())
}
