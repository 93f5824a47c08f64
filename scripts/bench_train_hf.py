#!/usr/bin/env python3
"""PyTorch + PEFT reference for bench/train.sh and scripts/gpu-check.sh: LoRA training steps
on a llava-hf model directory with the same shapes as examples/train_bench.rs (synthetic
rows: BOS + prompt tokens, the image's patch tokens, supervised answer tokens; LoRA on
q,k,v,o,gate,up,down of the language model, projector trained in full, AdamW, dropout 0.05),
printed as one JSON line: steps/s, tokens/s (sequence positions), peak memory."""
import argparse
import json
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlavaForConditionalGeneration

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--attn", default=None, choices=["eager", "sdpa"],
                    help="attention implementation (default: transformers' own choice)")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="gradient checkpointing of the language model (non-reentrant)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    extra = {"attn_implementation": args.attn} if args.attn else {}
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype, **extra).to(dev)
    load_s = time.perf_counter() - t0
    cfg = model.config
    # Only the language model's linears, as coin (never the vision tower or projector).
    pattern = r".*language_model.*\.(" + "|".join(TARGETS) + r")$"
    peft_cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.05,
                          target_modules=pattern, bias="none")
    model = get_peft_model(model, peft_cfg)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    for name, p in model.named_parameters():
        if "multi_modal_projector" in name:
            p.requires_grad_(True)
            p.data = p.data.float()
        elif "lora_" in name:
            p.data = p.data.float()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    vision = cfg.vision_config
    n_img = (vision.image_size // vision.patch_size) ** 2
    vocab = cfg.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    half = args.seq_len // 2

    def batch():
        head = torch.randint(4, vocab, (args.batch, half - 1), generator=g)
        tail = torch.randint(4, vocab, (args.batch, args.seq_len - half), generator=g)
        bos = torch.full((args.batch, 1), cfg.text_config.bos_token_id)
        img = torch.full((args.batch, n_img), cfg.image_token_index)
        ids = torch.cat([bos, head, img, tail], 1)
        labels = torch.cat([torch.full((args.batch, half + n_img), -100), tail], 1)
        pix = torch.randn(args.batch, 3, vision.image_size, vision.image_size, generator=g)
        return ids.to(dev), labels.to(dev), pix.to(dev, dtype)

    data = [batch() for _ in range(args.steps + args.warmup)]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times, losses = [], [], []
    for ids, labels, pix in data:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter()
        c = time.process_time()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=(dtype == torch.bfloat16)):
            out = model(input_ids=ids, pixel_values=pix, labels=labels,
                        attention_mask=torch.ones_like(ids))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - s)
        cpu_times.append(time.process_time() - c)
    timed = times[args.warmup:]
    secs = sum(timed)
    positions = ids.shape[1] * args.batch
    print(json.dumps({
        "engine": "pytorch+peft",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": args.device, "dtype": args.dtype, "r": args.r, "batch": args.batch,
        "attn": model.config._attn_implementation if hasattr(model.config, "_attn_implementation") else None,
        "grad_checkpointing": args.grad_checkpointing,
        "positions_per_row": ids.shape[1], "trainable_parameters": n_trainable,
        "load_seconds": load_s, "losses": losses, "step_seconds": times,
        "steps_per_s": len(timed) / secs, "tokens_per_s": len(timed) * positions / secs,
        "cpu_seconds_per_step": sum(cpu_times[args.warmup:]) / len(timed),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
    }))


if __name__ == "__main__":
    main()
