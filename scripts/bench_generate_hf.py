#!/usr/bin/env python3
"""HF transformers reference for bench/generate.sh: greedy generation tokens/s of a llava-hf
model directory (batch 1 and 8 by default, EOS ignored, one warm-up run; CPU f32 by default,
--device cuda --dtype bf16 for scripts/gpu-check.sh), printed as JSON lines."""
import argparse
import json
import time

import torch
from PIL import Image
from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, PreTrainedTokenizerFast

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
MEAN = [0.48145466, 0.4578275, 0.40821073]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", default="What is in the image?")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    args = ap.parse_args()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    dev = torch.device(args.device)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(dev).eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{args.model}/tokenizer.json")
    image_id = model.config.image_token_index
    n_img = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    ids = tok(f"{SYSTEM} USER: <image>\n{args.prompt} ASSISTANT:").input_ids
    ids = [x for t in ids for x in ([image_id] * n_img if t == image_id else [t])]
    img = Image.open(args.image).convert("RGB")
    w, h = img.size
    s = max(w, h)
    sq = Image.new("RGB", (s, s), tuple(int(x * 255) for x in MEAN))
    sq.paste(img, ((s - w) // 2, (s - h) // 2))
    size = model.config.vision_config.image_size
    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pix = proc(images=sq, return_tensors="pt")["pixel_values"]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for b in args.batch:
        input_ids = torch.tensor([ids] * b, device=dev)
        kw = dict(input_ids=input_ids, pixel_values=pix.repeat(b, 1, 1, 1).to(dev, dtype),
                  attention_mask=torch.ones_like(input_ids), max_new_tokens=args.max_new_tokens,
                  min_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model.generate(**kw)
            sync()
            t0 = time.perf_counter()
            out = model.generate(**kw)
            sync()
            secs = time.perf_counter() - t0
        n = (out.shape[1] - input_ids.shape[1]) * b
        print(json.dumps({"batch": b, "new_tokens": n, "seconds": secs, "tokens_per_s": n / secs,
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "device": args.device, "dtype": args.dtype,
                          "peak_gpu_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None}))


if __name__ == "__main__":
    main()
