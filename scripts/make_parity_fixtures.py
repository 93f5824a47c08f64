#!/usr/bin/env python3
"""Build the parity fixtures of coin's model engine with Hugging Face transformers (run by hand).

    python3 -m venv venv && venv/bin/pip install torch transformers peft pillow safetensors
    cargo build && venv/bin/python scripts/make_parity_fixtures.py --coin target/debug/coin

Writes tests/fixtures/parity/:
  model/            a tiny random LlavaForConditionalGeneration (save_pretrained, f32) + the
                    tokenizer.json of `coin model init --tiny` + preprocessor_config.json
  adapter/          a PEFT LoRA adapter on the language model's linears with non-zero B
  image_a.png, image_b.png   two non-square test images
  mm_projector.bin  the projector as a torch.save pickle (model.mm_projector.{0,2}.*), for the
                    CoIN split-setup loader test
  goldens.json      versions, prompts, token ids, pixel values (pad and crop), last-position
                    logits and greedy tokens with and without the adapter, batched greedy tokens
The Rust test (tests/test_parity.rs) reads only these files.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import tempfile

import numpy as np
import PIL
import torch
import transformers
import peft
from PIL import Image
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, PreTrainedTokenizerFast)

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def prompt(q):
    return f"{SYSTEM} USER: <image>\n{q} ASSISTANT:"


def expand2square(img, bg):
    w, h = img.size
    if w == h:
        return img
    if w > h:
        r = Image.new(img.mode, (w, w), bg)
        r.paste(img, (0, (w - h) // 2))
        return r
    r = Image.new(img.mode, (h, h), bg)
    r.paste(img, ((h - w) // 2, 0))
    return r


def clip_process(img, size):
    """CLIPImageProcessor's PIL path: shortest side, bicubic, center crop, rescale, normalize."""
    try:
        from transformers import CLIPImageProcessor
        proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                  resample=3, image_mean=MEAN, image_std=STD)
        kind = type(proc).__name__
        out = proc(images=img, return_tensors="np")["pixel_values"][0]
    except Exception as e:  # pragma: no cover - depends on the installed version
        raise SystemExit(f"CLIPImageProcessor failed: {e}")
    # Reference computed by hand with PIL, to be sure no torchvision resize was used.
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    nw, nh = (size, new_long) if w <= h else (new_long, size)
    r = img.convert("RGB").resize((nw, nh), resample=Image.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    r = r.crop((left, top, left + size, top + size))
    a = (np.asarray(r).astype(np.float64) * (1 / 255)).astype(np.float32)
    a = (a - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    manual = a.transpose(2, 0, 1)
    diff = float(np.abs(manual - out).max())
    return torch.from_numpy(manual.copy()), kind, diff


def reinit(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                std = 1.0 if "embed_tokens" in name else 1.0 / math.sqrt(fan_in)
                if "position_embedding" in name:
                    std = 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("weight"):  # norms
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "class_embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--coin", required=True, help="the coin binary (for the tiny tokenizer)")
    ap.add_argument("--out", default="tests/fixtures/parity")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    out = args.out
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([args.coin, "model", "init", "--tiny", os.path.join(tmp, "t"),
                        "--seed", "0"], check=True)
        tok_json = os.path.join(tmp, "t", "tokenizer.json")
        tok = PreTrainedTokenizerFast(tokenizer_file=tok_json, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", pad_token="<unk>")
        vocab = len(tok)
        model_dir = os.path.join(out, "model")
        os.makedirs(model_dir)
        shutil.copy(tok_json, os.path.join(model_dir, "tokenizer.json"))
    image_id = tok.convert_tokens_to_ids("<image>")

    text = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                       max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       rope_theta=10000.0, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, image_size=32, patch_size=8,
                              hidden_act="quick_gelu", projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                      projector_hidden_act="gelu", vision_feature_layer=-2,
                      vision_feature_select_strategy="default", pad_token_id=0,
                      image_seq_length=16, tie_word_embeddings=False)
    model = LlavaForConditionalGeneration(cfg).float().eval()
    reinit(model, args.seed)
    model.save_pretrained(model_dir, safe_serialization=True)
    with open(os.path.join(model_dir, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                   "size": {"shortest_edge": 32}, "resample": 3, "do_center_crop": True,
                   "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
                   "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN,
                   "image_std": STD, "do_convert_rgb": True}, f, indent=2)

    # Projector as a PyTorch zip pickle with LLaVA's stage-1 key names.
    proj = model.model.multi_modal_projector if hasattr(model, "model") and hasattr(model.model, "multi_modal_projector") else model.multi_modal_projector
    torch.save({"model.mm_projector.0.weight": proj.linear_1.weight.detach().clone(),
                "model.mm_projector.0.bias": proj.linear_1.bias.detach().clone(),
                "model.mm_projector.2.weight": proj.linear_2.weight.detach().clone(),
                "model.mm_projector.2.bias": proj.linear_2.bias.detach().clone()},
               os.path.join(out, "mm_projector.bin"))

    rng = np.random.default_rng(args.seed)
    imgs = {}
    for name, (w, h) in [("image_a.png", (45, 29)), ("image_b.png", (23, 40))]:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
        a = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(a, "RGB").save(os.path.join(out, name))
        imgs[name] = Image.open(os.path.join(out, name)).convert("RGB")

    bg = tuple(int(x * 255) for x in MEAN)
    n_img = 16
    cases = []
    questions = {"image_a.png": "What is in the image?", "image_b.png": "Describe the colors."}

    def run(m, ids, pix):
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            logits = m(input_ids=input_ids, pixel_values=pix[None], attention_mask=torch.ones_like(input_ids)).logits[0, -1]
            gen = m.generate(input_ids=input_ids, pixel_values=pix[None], attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0)
        return logits.tolist(), gen[0, len(ids):].tolist()

    peft_cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                               target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    pm = peft.get_peft_model(LlavaForConditionalGeneration.from_pretrained(model_dir).float().eval(), peft_cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape) * 0.2)
    pm.eval()
    pm.save_pretrained(os.path.join(out, "adapter"))
    readme = os.path.join(out, "adapter", "README.md")
    if os.path.exists(readme):
        os.remove(readme)

    pixel_dump = {}
    for img_name, q in questions.items():
        for mode in ["pad", "crop"]:
            src = expand2square(imgs[img_name], bg) if mode == "pad" else imgs[img_name]
            pix, kind, diff = clip_process(src, 32)
            p = prompt(q)
            ids = tok(p).input_ids
            expanded = []
            for t in ids:
                expanded.extend([image_id] * n_img if t == image_id else [t])
            base_logits, base_tokens = run(model, expanded, pix)
            lora_logits, lora_tokens = run(pm, expanded, pix)
            pixel_dump[f"{img_name}:{mode}"] = [round(x, 7) for x in pix.flatten().tolist()]
            cases.append({"image": img_name, "mode": mode, "question": q, "prompt": p,
                          "input_ids": ids, "logits": [round(x, 6) for x in base_logits], "tokens": base_tokens,
                          "lora_logits": [round(x, 6) for x in lora_logits], "lora_tokens": lora_tokens,
                          "processor": kind, "processor_vs_pil_max_diff": diff})

    # Batched greedy generation with left padding (two prompts of different lengths).
    tok.padding_side = "left"
    batch_prompts = [prompt(questions["image_a.png"]), prompt("Is it big?")]
    enc = [tok(p).input_ids for p in batch_prompts]
    exp = [[x for t in ids for x in ([image_id] * n_img if t == image_id else [t])] for ids in enc]
    L = max(map(len, exp))
    ids = torch.tensor([[0] * (L - len(e)) + e for e in exp])
    mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in exp])
    pix = torch.stack([clip_process(expand2square(imgs["image_a.png"], bg), 32)[0],
                       clip_process(expand2square(imgs["image_b.png"], bg), 32)[0]])
    with torch.no_grad():
        gen = model.generate(input_ids=ids, pixel_values=pix, attention_mask=mask,
                             max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0)
    batch = {"prompts": batch_prompts, "images": ["image_a.png", "image_b.png"], "mode": "pad",
             "tokens": [g[L:].tolist() for g in gen]}

    goldens = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "pillow": PIL.__version__},
        "max_new_tokens": args.max_new_tokens,
        "image_token_id": image_id,
        "cases": cases,
        "pixel_values": pixel_dump,
        "batch": batch,
        "weight_keys": sorted(k for k in model.state_dict().keys())[:5],
    }
    with open(os.path.join(out, "goldens.json"), "w") as f:
        json.dump(goldens, f)
    print(json.dumps(goldens["versions"]), [c["tokens"] for c in cases], [c["lora_tokens"] for c in cases])


if __name__ == "__main__":
    main()
