use std::path::PathBuf;

use crate::cli::{CommandError, CommandHelper, Ui};

use super::workflow_util::standalone_config;
use crate::ml::generate::{generate, GenerateRequest, GenerateSettings};
use crate::ml::image::{AspectMode, Rgb8};
use crate::ml::llava::{load_model, ModelSource};
use crate::ml::peft::PeftAdapter;
use crate::ml::runtime::Runtime;
use crate::ml::template::image_question_prompt;

/// Answer a question about an image with a model (greedy decoding)
///
/// --prompt is the user's question; it is wrapped in the vicuna_v1 template after `<image>\n`.
/// With --raw the prompt is used verbatim and must contain `<image>`. A directory whose
/// config.json has no vision_config is taken as the CoIN setup (LLaMA/Vicuna weights) and needs
/// --vision-tower (and --projector unless the weights hold the projector).
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Model directory (llava-hf, or a LLaMA/Vicuna dir for the CoIN setup)
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// CLIP directory of the CoIN setup
    #[arg(long, value_name = "DIR")]
    pub vision_tower: Option<PathBuf>,
    /// Projector file of the CoIN setup (mm_projector.bin or .safetensors)
    #[arg(long, value_name = "FILE")]
    pub projector: Option<PathBuf>,
    /// Adapter directory: PEFT LoRA or CoIN MoELoRA (adapter_config.json +
    /// adapter_model.safetensors or .bin); a non_lora_trainables.{safetensors,bin} beside it
    /// replaces the model's projector
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Image file (PNG or JPEG)
    #[arg(long, value_name = "IMG")]
    pub image: PathBuf,
    /// The question (or, with --raw, the whole prompt)
    #[arg(long)]
    pub prompt: String,
    /// Use --prompt verbatim (it must contain <image>)
    #[arg(long)]
    pub raw: bool,
    /// How the image is made square
    #[arg(long, value_enum, default_value_t = AspectMode::Pad)]
    pub image_aspect: AspectMode,
    /// Stop after this many new tokens
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Include the first step's logits in the JSON output
    #[arg(long)]
    pub logits: bool,
    /// Print JSON: {"token_ids", "text", "first_step_logits"}
    #[arg(long)]
    pub json: bool,
    /// Benchmark: run the prompt as a batch of N copies (after one warm-up), ignoring EOS, and
    /// print {"batch", "new_tokens", "seconds", "tokens_per_s"} as JSON
    #[arg(long, value_name = "N", hide = true)]
    pub bench_batch: Option<usize>,
}

pub fn cmd_generate(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &GenerateArgs,
) -> Result<(), CommandError> {
    if args.logits && !args.json {
        return Err(CommandError::usage("--logits needs --json"));
    }
    // The runtime (device, dtype, kernels): the presets' defaults and the environment.
    let rt = standalone_config(&[])?.resolved_runtime()?;
    crate::ml::fused::with_kernels(Some(rt.kernels), || generate_with(ui, helper, args, &rt))
}

fn generate_with(
    ui: &mut Ui,
    helper: &CommandHelper,
    args: &GenerateArgs,
    rt: &Runtime,
) -> Result<(), CommandError> {
    let cwd = &helper.cwd;
    let source = ModelSource::resolve(
        &cwd.join(&args.model),
        args.vision_tower.as_ref().map(|p| cwd.join(p)).as_deref(),
        args.projector.as_ref().map(|p| cwd.join(p)).as_deref(),
    )?;
    let device = rt.device()?;
    let dtype = rt.dtype();
    let mut loaded = load_model(&source, &device, dtype)?;
    let adapter = match &args.adapter {
        Some(a) => Some(PeftAdapter::load(&cwd.join(a), &device, dtype)?),
        None => None,
    };
    let image = Rgb8::open(&cwd.join(&args.image))?;
    let prompt = if args.raw {
        if !args.prompt.contains("<image>") {
            return Err(CommandError::usage(
                "with --raw the prompt must contain <image>",
            ));
        }
        args.prompt.clone()
    } else {
        image_question_prompt(&args.prompt)
    };
    let settings = GenerateSettings {
        max_new_tokens: args.max_new_tokens,
        aspect: args.image_aspect,
        return_logits: args.logits,
        ignore_eos: args.bench_batch.is_some(),
    };
    if let Some(n) = args.bench_batch {
        let req = GenerateRequest {
            prompt,
            image: Some(image),
        };
        let batch = vec![req; n.max(1)];
        generate(&mut loaded, adapter.as_ref(), &batch, &settings)?;
        let start = std::time::Instant::now();
        let out = generate(&mut loaded, adapter.as_ref(), &batch, &settings)?;
        let secs = start.elapsed().as_secs_f64();
        let tokens: usize = out.iter().map(|o| o.token_ids.len()).sum();
        ui.json(&serde_json::json!({
            "batch": batch.len(),
            "new_tokens": tokens,
            "seconds": secs,
            "tokens_per_s": tokens as f64 / secs,
        }))?;
        return Ok(());
    }
    let mut out = generate(
        &mut loaded,
        adapter.as_ref(),
        &[GenerateRequest {
            prompt,
            image: Some(image),
        }],
        &settings,
    )?;
    let o = out
        .pop()
        .ok_or_else(|| CommandError::internal("generation returned no output"))?;
    if args.json {
        ui.json(&o)?;
    } else {
        use std::io::Write;
        writeln!(ui.out(), "{}", o.text)?;
    }
    Ok(())
}
