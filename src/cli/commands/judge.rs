use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::store::fsutil::write_atomic;
use crate::tasks::formats::{read_answer_file, read_test_file};
use crate::tasks::judge::{self, JudgeClient, JudgeRule};
use crate::tasks::ScorerKind;

/// Write CoIN's general-knowledge judge prompts for an answer file, and optionally run them
///
/// Always writes OUT/prompt_to_eval.json (CoIN's layout). With --endpoint (an
/// OpenAI-compatible `http://…/v1` server) it asks the judge for each answer, saves progress
/// in OUT/judge_progress.jsonl (a rerun resumes), and reports 100·Σs/(10·N). With --replies
/// it only scores a judge output file CoIN's scripts made (prompt_eval_merge.jsonl).
#[derive(clap::Args, Debug)]
pub struct JudgeArgs {
    /// The task (Grounding uses the box rule)
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
    #[arg(long, conflicts_with_all = ["task", "questions", "answers", "out", "endpoint"])]
    pub replies: Option<PathBuf>,
    /// An OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 or https://api.example.com/v1
    #[arg(long, requires = "judge_model")]
    pub endpoint: Option<String>,
    /// The environment variable holding the endpoint's API key, sent as a bearer token if set
    #[arg(long, default_value = "OPENAI_API_KEY", value_name = "VAR")]
    pub api_key_env: String,
    /// The judge model name sent to the endpoint (CoIN: Qwen1.5-32B-Chat)
    #[arg(long)]
    pub judge_model: Option<String>,
    /// Sampling temperature (CoIN used 0.7; 0 makes the score repeatable)
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Maximum reply tokens (CoIN: 20)
    #[arg(long, default_value_t = 20)]
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

pub fn cmd_judge(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &JudgeArgs,
) -> Result<(), CommandError> {
    if let Some(replies) = &args.replies {
        let summary = judge::summarise(&judge::read_reply_scores(&helper.cwd.join(replies))?);
        if args.json {
            return ui.json(&serde_json::json!({
                "metric": "general_knowledge", "score": summary.score, "rounded": summary.rounded, "n": summary.n,
            }));
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
    let (Some(task), Some(questions), Some(answers), Some(out_arg)) =
        (&args.task, &args.questions, &args.answers, &args.out)
    else {
        return Err(CommandError::usage(
            "--task, --questions, --answers and --out are required without --replies",
        ));
    };
    let (name, kind, _) = super::score::resolve_scorer(helper, task)?;
    let rule = if kind == ScorerKind::Grounding {
        JudgeRule::CoINGrounding
    } else {
        JudgeRule::CoIN
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
        temperature: args.temperature,
        max_tokens: args.max_tokens,
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
    let scores: Vec<f64> = done.iter().map(|j| j.score).collect();
    let summary = judge::summarise(&scores);
    if args.json {
        return ui.json(&serde_json::json!({
            "task": name, "metric": "general_knowledge", "judge_model": model,
            "temperature": args.temperature, "score": summary.score, "rounded": summary.rounded,
            "n": summary.n,
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
