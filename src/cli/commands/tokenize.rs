use std::io::Write;
use std::path::PathBuf;

use crate::cli::{CommandError, CommandHelper, Ui};
use crate::ml::llava::Segment;
use crate::ml::template::{image_question_prompt, vicuna_v1, PromptTokenizer};

/// The id LLaVA's `tokenizer_image_token` puts at an image place.
const IMAGE_TOKEN_INDEX: i64 = -200;

/// Show the token ids a model's tokenizer gives a text or a prompt
///
/// The tokenizer is the one LLaVA uses for the CoIN setup: `tokenizer.model` read as
/// transformers 4.31's slow LlamaTokenizer (with tokenizer_config.json and
/// special_tokens_map.json) when the folder has it, else `tokenizer.json`. --text encodes the text
/// as `tokenizer(text).input_ids` does. --prompt builds the vicuna_v1 generation prompt (with
/// `<image>\n` before the question when --image is given; verbatim with --raw) and encodes it as
/// LLaVA's tokenizer_image_token does, with -200 at each image place. Each line of output is an
/// id and its piece.
#[derive(clap::Args, Debug)]
pub struct TokenizeArgs {
    /// Model or tokenizer directory (tokenizer.model or tokenizer.json)
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The text to encode
    #[arg(long, conflicts_with = "prompt", required_unless_present = "prompt")]
    pub text: Option<String>,
    /// The user's question, wrapped in the vicuna_v1 template
    #[arg(long)]
    pub prompt: Option<String>,
    /// Put `<image>\n` before the question (as for an image question)
    #[arg(long, requires = "prompt", conflicts_with = "raw")]
    pub image: bool,
    /// Use --prompt verbatim (split at each `<image>`)
    #[arg(long, requires = "prompt")]
    pub raw: bool,
    /// Print JSON: {"input", "ids", "pieces", "decoded"}
    #[arg(long)]
    pub json: bool,
}

pub fn cmd_tokenize(
    ui: &mut Ui,
    _helper: &CommandHelper,
    args: &TokenizeArgs,
) -> Result<(), CommandError> {
    let tok = PromptTokenizer::from_tokenizer_dir(&args.model)?;
    let (input, ids): (String, Vec<i64>) = match (&args.text, &args.prompt) {
        (Some(text), _) => {
            let ids = tok.encode(text, true)?;
            (text.clone(), ids.into_iter().map(i64::from).collect())
        }
        (None, Some(q)) => {
            let prompt = if args.raw {
                q.clone()
            } else if args.image {
                image_question_prompt(q)
            } else {
                vicuna_v1(&[(q, None)])
            };
            let mut ids = Vec::new();
            for seg in tok.encode_prompt(&prompt)? {
                match seg {
                    Segment::Text(t) => ids.extend(t.into_iter().map(i64::from)),
                    Segment::Image => ids.push(IMAGE_TOKEN_INDEX),
                }
            }
            (prompt, ids)
        }
        (None, None) => return Err(CommandError::usage("give --text or --prompt")),
    };
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| match u32::try_from(id) {
            Ok(id) => tok.id_to_piece(id).unwrap_or_default(),
            Err(_) => "<image>".to_string(),
        })
        .collect();
    let text_ids: Vec<u32> = ids
        .iter()
        .filter_map(|&id| u32::try_from(id).ok())
        .collect();
    let decoded = tok.decode(&text_ids)?;
    if args.json {
        return ui.json(&serde_json::json!({
            "input": input,
            "ids": ids,
            "pieces": pieces,
            "decoded": decoded,
        }));
    }
    let out = ui.out();
    for (id, piece) in ids.iter().zip(&pieces) {
        writeln!(out, "{id}\t{}", piece.escape_debug())?;
    }
    Ok(())
}
