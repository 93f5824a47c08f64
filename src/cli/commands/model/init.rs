use std::path::PathBuf;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::ml::tiny::{write_tiny, TinyLayout, TinyOptions, TinySize};

/// Write a tiny random LLaVA-1.5 model (for tests and the demo)
///
/// The model is in llava-hf format (config.json, model.safetensors, tokenizer.json with an
/// `<image>` token, preprocessor_config.json) and loads like any other model. The tokenizer is a
/// byte-level BPE, so any text encodes; its merges are learnt from the vicuna_v1 template text
/// plus the optional --corpus. Same seed and corpus, same files.
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// Write the tiny random model (the only kind `model init` makes)
    #[arg(long, value_name = "DIR")]
    pub tiny: PathBuf,
    /// Seed of the random weights
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Extra text to learn tokenizer merges from (e.g. the task vocabulary)
    #[arg(long, value_name = "FILE")]
    pub corpus: Option<PathBuf>,
    /// On-disk layout: llava-hf (hf), llava-hf with transformers ≥ 4.52 names (hf-new), or the
    /// CoIN split setup (split: llm/, clip/, mm_projector.safetensors)
    #[arg(long, value_enum, default_value_t = TinyLayout::Hf)]
    pub layout: TinyLayout,
    /// Model size: tiny (tests, demo), small (~13 M, CPU benchmarks), 1b (TinyLlama-1.1B-shaped
    /// decoder, GPU benchmarks) with a tiny vision tower, or 7b (LLaVA-1.5-7B's shapes
    /// throughout, CLIP ViT-L/14-336 included; ~14 GB in bf16, for measurements)
    #[arg(long, value_enum, default_value_t = TinySize::Tiny)]
    pub size: TinySize,
    /// Write into DIR even if it holds files (files of the same name are replaced)
    #[arg(long)]
    pub force: bool,
    /// Print what was written as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn cmd_init(ui: &mut Ui, helper: &CommandHelper, args: &InitArgs) -> Result<(), CommandError> {
    let dir = helper.cwd.join(&args.tiny);
    if !args.force && dir.is_dir() {
        let mut entries =
            std::fs::read_dir(&dir).map_err(|e| CommandError::io("read", &args.tiny, e))?;
        if entries.next().is_some() {
            return Err(CommandError::user(format!(
                "'{}' exists and is not empty",
                args.tiny.display()
            ))
            .hint("Pick a new folder, or pass --force to write the model over its files."));
        }
    }
    let corpus = match &args.corpus {
        Some(p) => std::fs::read_to_string(helper.cwd.join(p))
            .map_err(|e| CommandError::io("read the corpus", p, e))?,
        None => String::new(),
    };
    let opts = TinyOptions {
        seed: args.seed,
        corpus,
        layout: args.layout,
        size: args.size,
        ..TinyOptions::default()
    };
    if args.size == TinySize::Llava7b {
        let gb = TinySize::Llava7b.weight_bytes(opts.vocab_size) as f64 / 1e9;
        ui.warn(&format!(
            "The 7b model takes {gb:.1} GB on disk (bf16) and about as much memory to load in \
             bf16 (twice that in f32); writing it takes minutes."
        ));
    }
    let model_dir = write_tiny(&dir, &opts)?;
    if args.json {
        ui.json(&serde_json::json!({
            "model": model_dir,
            "seed": args.seed,
            "layout": format!("{:?}", args.layout).to_lowercase(),
        }))?;
    } else {
        ui.status(&format!(
            "Wrote a tiny random LLaVA-1.5 to {}.",
            model_dir.display()
        ));
    }
    Ok(())
}
