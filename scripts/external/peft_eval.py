#!/usr/bin/env python3
"""Greedy answers of a llava-hf base model + a PEFT adapter for a CoIN question file, written as
CoIN's merge.jsonl: an external evaluator for coin (`[evaluator] command`, docs/external.md).

    python scripts/external/peft_eval.py --base MODEL_DIR --adapter CHECKPOINT_DIR \
        --questions TEST.json --images IMAGE_ROOT --out RESULTS/merge.jsonl \
        [--max-new-tokens 16] [--model-id NAME] [--image-aspect pad|crop]

The adapter directory is a PEFT one (adapter_config.json + adapter_model.safetensors, plus
non_lora_trainables.safetensors when the projector was trained), e.g. coin's {checkpoint_dir}
with checkpoint_format = "peft". Each question ({question_id, image, text, answer}) is asked in
coin's generation prompt (vicuna_v1: "<system> USER: <image>\\n<text> ASSISTANT:"), the image
padded to square as the trainer does; greedy decoding, the reply stripped; one line per
question: {"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {}}.
Exit status 1 with a message on bad input.
"""
import argparse
import json
import logging
import os
import sys

# The prompt, the image padding and the projector loading are the trainer's.
from peft_trainer import SYSTEM, fail, load_projector, square


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--questions", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--model-id", default="peft-eval")
    ap.add_argument("--image-aspect", choices=["pad", "crop"], default="pad",
                    help="pad to square with the mean colour (coin's default) or centre-crop")
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        fail(f"'{args.adapter}' is not a PEFT adapter directory (no adapter_config.json)")
    try:
        with open(args.questions, encoding="utf-8") as f:
            questions = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"cannot read the question file '{args.questions}' ({e})")
    if not isinstance(questions, list) or not all(
            isinstance(q, dict) and "question_id" in q and isinstance(q.get("text"), str)
            for q in questions):
        fail(f"'{args.questions}' must be a JSON list of {{question_id, image, text}} records")

    import torch
    from peft import PeftModel
    from PIL import Image
    from transformers import (CLIPImageProcessor, LlavaForConditionalGeneration,
                              PreTrainedTokenizerFast)

    # transformers 4.46 warns on every generate that <image> should be expanded by a processor;
    # it is expanded here, as coin's engine does.
    logging.getLogger("transformers.models.llava.modeling_llava").setLevel(logging.ERROR)
    torch.manual_seed(0)
    base = LlavaForConditionalGeneration.from_pretrained(args.base, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    load_projector(model, args.adapter)
    cfg = base.config
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.base, "tokenizer.json"),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>")
    processor = CLIPImageProcessor.from_pretrained(args.base)
    n_img = getattr(cfg, "image_seq_length", None) or (
        cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    eos = cfg.text_config.eos_token_id if cfg.text_config.eos_token_id is not None else 2

    lines = []
    for q in questions:
        prompt = f"{SYSTEM} USER: <image>\n{q['text']} ASSISTANT:"
        ids = []
        for t in tok(prompt).input_ids:
            ids += [t] * (n_img if t == cfg.image_token_index else 1)
        path = os.path.join(args.images, q.get("image", ""))
        try:
            with Image.open(path) as im:
                im = square(im.convert("RGB"), args.image_aspect, processor.image_mean)
                pix = processor(im, return_tensors="pt").pixel_values
        except (OSError, ValueError) as e:
            fail(f"cannot read the image '{path}' of question '{q['question_id']}' ({e})")
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, pixel_values=pix,
                                 attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=args.max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=cfg.pad_token_id or 0)
        text = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
        lines.append(json.dumps({"question_id": q["question_id"], "prompt": q["text"],
                                 "text": text, "answer_id": q["question_id"],
                                 "model_id": args.model_id, "metadata": {}}))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, args.out)
    print(f"wrote {len(lines)} answers to {args.out}")


if __name__ == "__main__":
    main()
