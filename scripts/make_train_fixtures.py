#!/usr/bin/env python3
"""Build the loss/gradient parity fixtures of coin's training core with PyTorch (run by hand).

    venv/bin/python scripts/make_train_fixtures.py      # after scripts/make_parity_fixtures.py

Reads the tiny llava-hf model, its tokenizer and the PEFT LoRA adapter of tests/fixtures/parity/
(made by make_parity_fixtures.py; nothing there is changed) and writes tests/fixtures/train/:

  moelora/          a CoIN MoELoRA adapter directory exactly as CoIN's trainer writes one:
                    adapter_config.json (peft_type MOE_LORA_CoIN, expert_num 4, r 8, alpha 16),
                    adapter_model.bin (torch.save; keys base_model.model.model.layers.N.<module>.
                    lora_A.loraA.<e>.weight AND .lora_A.loraA.<e>.mlp.weight, the same tensor, as
                    CoIN's expert modules register it twice; lora_B.loraB.<e>...; lora_router.weight)
                    and non_lora_trainables.bin (torch.save; base_model.model.model.mm_projector.
                    {0,2}.{weight,bias}: a perturbed projector that replaces the model's)
  goldens.json      the batch (HF input_ids with the image token expanded, labels, attention
                    mask, which parity pixel values each row uses), and for "lora" (the parity PEFT
                    adapter) and "moelora" (this script's PyTorch reimplementation of CoIN's
                    CoINMOELoraLinear): HF's loss, the full gradients of a few adapter and projector
                    tensors under coin's var names, and for moelora the last-position logits and
                    8 greedy tokens of parity case 0 (for `coin generate --adapter`);
                    "hf_peft_reads": which adapter key spellings HF PEFT loads onto the llava-hf
                    model (evidence for the key layout coin writes); "hf_reads_coin_lora": HF PEFT
                    loading coin_lora/ (below) onto the llava-hf model, compared with the parity
                    adapter it was made from.
  coin_lora/        NOT written here: the parity LoRA as coin writes it (attach_from + save_adapter),
                    written by `COIN_UPDATE_FIXTURES=1 cargo test --test runner
                    the_lora_dir_coin_writes_is_the_one_hf_peft_read`; run that first, then this
                    script (the test then checks coin still writes those bytes).

Supervised positions (labels): every prompt token is -100 (BOS, system text, "USER:", the 16
image positions, the question, " ASSISTANT:"); the answer tokens and the closing </s> (id 2) carry
their own ids; right padding is -100. HF shifts internally: position t's logits predict label t+1,
and the loss is the mean over all supervised tokens of the batch (model(..., labels=...).loss).
Gradients are of that loss, with dropout 0, the adapter tensors and the projector trainable.
"""
import argparse
import json
import os
import shutil
import warnings

import numpy as np
import peft
import PIL
import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_IMG = 16


def prompt(q):
    return f"{SYSTEM} USER: <image>\n{q} ASSISTANT:"


class Expert(nn.Module):
    """CoIN's expert block: a bias-free linear whose weight is registered twice."""

    def __init__(self, i, o):
        super().__init__()
        self.mlp = nn.Linear(i, o, bias=False)
        self.weight = self.mlp.weight

    def forward(self, x):
        return self.mlp(x)


class MoELoraLinear(nn.Module):
    """CoIN's CoINMOELoraLinear forward, dropout 0:
    y = W x + b + sum_e softmax(R x)_e * B_e A_e x * (alpha / r)   (token-wise dense softmax)."""

    def __init__(self, base, r, experts, alpha):
        super().__init__()
        self.base = base
        self.experts = experts
        re = r // experts
        self.lora_A = nn.ModuleList([Expert(base.in_features, re) for _ in range(experts)])
        self.lora_B = nn.ModuleList([Expert(re, base.out_features) for _ in range(experts)])
        self.lora_router = nn.Linear(base.in_features, experts, bias=False)
        self.scaling = alpha / r

    def forward(self, x):
        result = self.base(x)
        router = torch.softmax(self.lora_router(x), dim=-1)
        for i in range(self.experts):
            result = result + self.lora_B[i](self.lora_A[i](x)) * self.scaling * router[..., i].unsqueeze(-1)
        return result


def language_layers(model):
    return model.model.language_model.layers


def projector(model):
    return model.model.multi_modal_projector


def rounded(t):
    return [float(f"{x:.8g}") for x in t.detach().flatten().tolist()]


def build_batch(tok, image_id, rows):
    """HF input_ids / labels / attention_mask, right padded, image token expanded."""
    ids_rows, label_rows = [], []
    for q, answer in rows:
        p = tok(prompt(q)).input_ids
        a = tok(" " + answer, add_special_tokens=False).input_ids + [2]
        ids, labels = [], []
        for t in p:
            n = N_IMG if t == image_id else 1
            ids += [t] * n
            labels += [-100] * n
        ids += a
        labels += a
        ids_rows.append(ids)
        label_rows.append(labels)
    L = max(map(len, ids_rows))
    mask = [[1] * len(r) + [0] * (L - len(r)) for r in ids_rows]
    ids_rows = [r + [0] * (L - len(r)) for r in ids_rows]
    label_rows = [r + [-100] * (L - len(r)) for r in label_rows]
    return ids_rows, label_rows, mask


def loss_and_grads(model, batch, pixels, named):
    """HF loss and gradients; `named` maps coin var name -> function(model) -> tensor grad."""
    model.zero_grad(set_to_none=True)
    ids, labels, mask = batch
    out = model(input_ids=torch.tensor(ids), pixel_values=pixels,
                attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out.loss.backward()
    grads = {name: rounded(fn(model)) for name, fn in named.items()}
    return float(out.loss.item()), grads


def projector_grads(get_proj):
    return {
        "multi_modal_projector.linear_1.weight": lambda m: get_proj(m).linear_1.weight.grad,
        "multi_modal_projector.linear_1.bias": lambda m: get_proj(m).linear_1.bias.grad,
        "multi_modal_projector.linear_2.weight": lambda m: get_proj(m).linear_2.weight.grad,
        "multi_modal_projector.linear_2.bias": lambda m: get_proj(m).linear_2.bias.grad,
    }


def hf_peft_reads(parity, ids):
    """Which key spellings of the parity LoRA HF PEFT loads onto the llava-hf model."""
    src = os.path.join(parity, "adapter")
    sd = load_file(os.path.join(src, "adapter_model.safetensors"))
    base = LlavaForConditionalGeneration.from_pretrained(os.path.join(parity, "model")).eval()
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(base, src).eval()(input_ids=ids).logits
    result = {}
    import tempfile
    for label, prefix in [("model.language_model.layers (transformers >= 4.52)", "base_model.model.model.language_model.layers."),
                          ("language_model.model.layers (older llava-hf)", "base_model.model.language_model.model.layers."),
                          ("model.layers (CoIN/LLaVA)", "base_model.model.model.layers.")]:
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(os.path.join(src, "adapter_config.json"), d)
            save_file({k.replace("base_model.model.model.language_model.layers.", prefix): v for k, v in sd.items()},
                      os.path.join(d, "adapter_model.safetensors"))
            m = LlavaForConditionalGeneration.from_pretrained(os.path.join(parity, "model")).eval()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pm = peft.PeftModel.from_pretrained(m, d).eval()
            with torch.no_grad():
                got = pm(input_ids=ids).logits
            result[label] = bool((got - want).abs().max().item() == 0.0)
    return result


def hf_reads_coin_lora(parity, coin_dir, ids):
    """Load coin's LoRA dir with HF PEFT; compare with PEFT's own adapter and the base model."""
    if not os.path.isdir(coin_dir):
        return None
    m = lambda: LlavaForConditionalGeneration.from_pretrained(os.path.join(parity, "model")).eval()
    with torch.no_grad():
        base = m()(input_ids=ids).logits
        want = peft.PeftModel.from_pretrained(m(), os.path.join(parity, "adapter")).eval()(input_ids=ids).logits
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(m(), coin_dir).eval()
    key_warnings = [str(x.message) for x in w if "keys" in str(x.message).lower()]
    with torch.no_grad():
        got = pm(input_ids=ids).logits
    return {"max_logit_diff_vs_peft_adapter": (got - want).abs().max().item(),
            "max_logit_diff_vs_base": (got - base).abs().max().item(), "key_warnings": key_warnings}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parity", default="tests/fixtures/parity")
    ap.add_argument("--out", default="tests/fixtures/train")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    shutil.rmtree(os.path.join(args.out, "moelora"), ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    parity_goldens = json.load(open(os.path.join(args.parity, "goldens.json")))
    model_dir = os.path.join(args.parity, "model")
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"), bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    image_id = parity_goldens["image_token_id"]

    rows = [("What is in the image?", "A red cube on a table."), ("Is it big?", "No.")]
    pixel_keys = ["image_a.png:pad", "image_b.png:pad"]
    pixels = torch.tensor([parity_goldens["pixel_values"][k] for k in pixel_keys]).reshape(2, 3, 32, 32)
    batch = build_batch(tok, image_id, rows)

    # LoRA: the parity PEFT adapter (r 4, alpha 8, non-zero B), projector trainable.
    base = LlavaForConditionalGeneration.from_pretrained(model_dir).float().eval()
    pm = peft.PeftModel.from_pretrained(base, os.path.join(args.parity, "adapter"), is_trainable=True).eval()
    for p in projector(pm.base_model.model).parameters():
        p.requires_grad_(True)
    lyr = lambda m: language_layers(m.base_model.model)
    lora_named = {
        "language_model.layers.0.self_attn.q_proj.lora_A.weight": lambda m: lyr(m)[0].self_attn.q_proj.lora_A["default"].weight.grad,
        "language_model.layers.0.self_attn.q_proj.lora_B.weight": lambda m: lyr(m)[0].self_attn.q_proj.lora_B["default"].weight.grad,
        "language_model.layers.1.mlp.down_proj.lora_A.weight": lambda m: lyr(m)[1].mlp.down_proj.lora_A["default"].weight.grad,
        "language_model.layers.1.mlp.down_proj.lora_B.weight": lambda m: lyr(m)[1].mlp.down_proj.lora_B["default"].weight.grad,
        "language_model.layers.1.self_attn.v_proj.lora_A.weight": lambda m: lyr(m)[1].self_attn.v_proj.lora_A["default"].weight.grad,
    }
    lora_named.update(projector_grads(lambda m: projector(m.base_model.model)))
    lora_loss, lora_grads = loss_and_grads(pm, batch, pixels, lora_named)

    # MoELoRA: CoIN's layer reimplemented on the same model, 4 experts of rank 2.
    r, experts, alpha = 8, 4, 16.0
    mm = LlavaForConditionalGeneration.from_pretrained(model_dir).float().eval()
    for p in mm.parameters():
        p.requires_grad_(False)
    for layer in language_layers(mm):
        for parent, names in [(layer.self_attn, ["q_proj", "k_proj", "v_proj", "o_proj"]),
                              (layer.mlp, ["gate_proj", "up_proj", "down_proj"])]:
            for n in names:
                w = MoELoraLinear(getattr(parent, n), r, experts, alpha)
                with torch.no_grad():
                    fan_in = w.base.in_features
                    for e in range(experts):
                        w.lora_A[e].mlp.weight.copy_(torch.randn(w.lora_A[e].mlp.weight.shape, generator=g) / fan_in ** 0.5)
                        w.lora_B[e].mlp.weight.copy_(torch.randn(w.lora_B[e].mlp.weight.shape, generator=g) * 0.2)
                    w.lora_router.weight.copy_(torch.randn(w.lora_router.weight.shape, generator=g) * 2 / fan_in ** 0.5)
                setattr(parent, n, w)
    proj = projector(mm)
    with torch.no_grad():
        for p in proj.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    for p in proj.parameters():
        p.requires_grad_(True)
    for n, p in mm.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)

    def stacked(m, i, path, part):
        mod = language_layers(m)[i]
        for attr in path.split("."):
            mod = getattr(mod, attr)
        if part == "A":
            return torch.cat([x.mlp.weight.grad for x in mod.lora_A], 0)
        if part == "B":
            return torch.cat([x.mlp.weight.grad for x in mod.lora_B], 1)
        return mod.lora_router.weight.grad

    moe_named = {}
    for i, path in [(0, "self_attn.q_proj"), (1, "mlp.down_proj")]:
        base_name = f"language_model.layers.{i}.{path}"
        moe_named[f"{base_name}.lora_A.experts"] = lambda m, i=i, p=path: stacked(m, i, p, "A")
        moe_named[f"{base_name}.lora_B.experts"] = lambda m, i=i, p=path: stacked(m, i, p, "B")
        moe_named[f"{base_name}.lora_router.weight"] = lambda m, i=i, p=path: stacked(m, i, p, "R")
    moe_named.update(projector_grads(projector))
    moe_loss, moe_grads = loss_and_grads(mm, batch, pixels, moe_named)

    # Save it as CoIN does (torch.save pickles, CoIN module names, both expert spellings).
    moe_dir = os.path.join(args.out, "moelora")
    os.makedirs(moe_dir)
    sd = {}
    for i, layer in enumerate(language_layers(mm)):
        for sub, parent in [("self_attn", layer.self_attn), ("mlp", layer.mlp)]:
            for n, mod in parent.named_children():
                if not isinstance(mod, MoELoraLinear):
                    continue
                key = f"base_model.model.model.layers.{i}.{sub}.{n}"
                for e in range(experts):
                    a = mod.lora_A[e].mlp.weight.detach().clone()
                    b = mod.lora_B[e].mlp.weight.detach().clone()
                    sd[f"{key}.lora_A.loraA.{e}.weight"] = a
                    sd[f"{key}.lora_A.loraA.{e}.mlp.weight"] = a
                    sd[f"{key}.lora_B.loraB.{e}.weight"] = b
                    sd[f"{key}.lora_B.loraB.{e}.mlp.weight"] = b
                sd[f"{key}.lora_router.weight"] = mod.lora_router.weight.detach().clone()
    torch.save(sd, os.path.join(moe_dir, "adapter_model.bin"))
    torch.save({f"base_model.model.model.mm_projector.{i}.{w}": getattr(getattr(proj, lin), w).detach().clone()
                for i, lin in [(0, "linear_1"), (2, "linear_2")] for w in ["weight", "bias"]},
               os.path.join(moe_dir, "non_lora_trainables.bin"))
    with open(os.path.join(moe_dir, "adapter_config.json"), "w") as f:
        json.dump({"base_model_name_or_path": "tests/fixtures/parity/model", "bias": "none",
                   "expert_num": experts, "fan_in_fan_out": False, "inference_mode": True,
                   "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None,
                   "lora_alpha": alpha, "lora_dropout": 0.0, "modules_to_save": None,
                   "peft_type": "MOE_LORA_CoIN", "r": r, "revision": None, "target_modules": TARGETS,
                   "task_embedding_dim": 64, "task_type": "CAUSAL_LM_CoIN"}, f, indent=2)

    # Greedy decoding of parity case 0 with the MoELoRA model (for coin generate --adapter).
    case = parity_goldens["cases"][0]
    assert case["mode"] == "pad" and case["image"] == "image_a.png"
    ids = [x for t in case["input_ids"] for x in ([image_id] * N_IMG if t == image_id else [t])]
    input_ids = torch.tensor([ids])
    mm.eval()
    with torch.no_grad():
        kw = dict(input_ids=input_ids, pixel_values=pixels[:1], attention_mask=torch.ones_like(input_ids))
        last = mm(**kw).logits[0, -1]
        gen = mm.generate(**kw, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)

    goldens = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "pillow": PIL.__version__},
        "image_token_id": image_id,
        "image_seq_len": N_IMG,
        "batch": {"rows": [{"question": q, "answer": a} for q, a in rows], "pixel_keys": pixel_keys,
                  "input_ids": batch[0], "labels": batch[1], "attention_mask": batch[2]},
        "lora": {"adapter": "parity/adapter", "r": 4, "alpha": 8.0, "loss": lora_loss, "grads": lora_grads},
        "moelora": {"adapter": "train/moelora", "r": r, "experts": experts, "alpha": alpha,
                    "loss": moe_loss, "grads": moe_grads,
                    "case0_logits": [float(f"{x:.8g}") for x in last.tolist()],
                    "case0_tokens": gen[0, len(ids):].tolist()},
        "hf_peft_reads": hf_peft_reads(args.parity, torch.tensor([[1, 5, 6, 7, 8]])),
        "hf_reads_coin_lora": hf_reads_coin_lora(args.parity, os.path.join(args.out, "coin_lora"),
                                                 torch.tensor([[1, 5, 6, 7, 8, 9, 10]])),
    }
    with open(os.path.join(args.out, "goldens.json"), "w") as f:
        json.dump(goldens, f)
    print(json.dumps(goldens["versions"]), "lora loss", lora_loss, "moelora loss", moe_loss,
          "tokens", goldens["moelora"]["case0_tokens"], goldens["hf_peft_reads"],
          goldens["hf_reads_coin_lora"])


if __name__ == "__main__":
    main()
