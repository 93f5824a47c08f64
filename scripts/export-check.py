#!/usr/bin/env python3
"""Check `coin checkout --format coin|peft` with torch and PEFT themselves (not run by CI).

1. Build a tiny random llava-hf model (LlavaForConditionalGeneration), wrap it in a PEFT LoRA on
   the language model's seven linears, give A and B random values, train-free, and save it with
   PEFT's own `save_pretrained` plus the projector as non_lora_trainables.safetensors.
2. `coin init`, `coin commit` that directory, then `coin checkout --format peft` and
   `--format coin` into a scratch folder.
3. peft export: `PeftModel.from_pretrained` on a fresh copy of the same base, the projector via
   `load_state_dict(strict=False)`; every LoRA weight and the logits must equal the original's.
4. coin export: `torch.load(..., weights_only=True)` of adapter_model.bin and
   non_lora_trainables.bin; keys as CoIN's peft 0.4.0 saves them, values equal; then the adapter
   is loaded with `PeftModel.from_pretrained` into a LLaMA language model (the module names of
   CoIN's LlavaLlamaForCausalLM: model.layers.N...), and the projector keys, stripped as CoIN's
   builder does (base_model. and one model.), are model.mm_projector.{0,2}.{weight,bias}.

Usage: python scripts/export-check.py [--coin target/debug/coin]
       python scripts/export-check.py --coin-dir DIR   (step 4 only, e.g. under peft 0.4.0 +
                                                        transformers 4.31, CoIN's versions)
       PYTHONPATH=COIN_REPO python scripts/export-check.py --moe   (a MoELoRA export loaded by
                                                        CoIN's own PEFT fork, CoIN/peft)
Needs torch, transformers (with Llava, >= 4.36) and peft; docs/export.md lists the versions it
was run with.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_text_config():
    return LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )


def tiny_config():
    from transformers import CLIPVisionConfig, LlavaConfig

    text = tiny_text_config()
    vision = CLIPVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        image_size=28, patch_size=14, projection_dim=8,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=63,
                       projector_hidden_act="gelu")


def base_model(seed):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(tiny_config()).eval()


def lora_weights(model):
    """LoRA tensors by their module path inside the language model (layers.N.…)."""
    out = {}
    for k, v in model.state_dict().items():
        if "lora_" in k:
            i = k.index("layers.")
            out[k[i:].replace(".default", "")] = v.detach().clone()
    return out


def check_coin_export(d, want=None, projector=None):
    """The coin export in `d` with torch.load and PEFT on a LLaMA (CoIN's language-model names).
    Without `want` (--coin-dir), the PEFT-loaded weights are compared with torch.load's."""
    sd = torch.load(os.path.join(d, "adapter_model.bin"), weights_only=True)
    assert all(k.startswith("base_model.model.model.layers.") for k in sd), list(sd)[:3]
    if want is None:
        want = {k[len("base_model.model.model."):]: v for k, v in sd.items()}
    for k in want:
        key = "base_model.model.model." + k
        assert torch.equal(sd[key], want[k]), key
    nl = torch.load(os.path.join(d, "non_lora_trainables.bin"), weights_only=True)
    stripped = {k.split("base_model.", 1)[1].split("model.", 1)[1]: v for k, v in nl.items()}
    assert sorted(stripped) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                                "model.mm_projector.2.bias", "model.mm_projector.2.weight"], \
        sorted(stripped)
    if projector is not None:
        assert torch.equal(stripped["model.mm_projector.0.weight"],
                           projector["multi_modal_projector.linear_1.weight"])
    cfg = json.load(open(os.path.join(d, "adapter_config.json")))
    peft040 = {"auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out",
               "inference_mode", "init_lora_weights", "layers_pattern", "layers_to_transform",
               "lora_alpha", "lora_dropout", "modules_to_save", "peft_type", "r", "revision",
               "target_modules", "task_type"}
    assert set(cfg) == peft040, set(cfg) ^ peft040
    import peft
    llama = LlamaForCausalLM(tiny_text_config()).eval()
    coin_loaded = PeftModel.from_pretrained(llama, d)
    got = lora_weights(coin_loaded)
    assert got.keys() == want.keys(), (sorted(got)[:3], sorted(want)[:3])
    for k in want:
        assert torch.equal(got[k], want[k]), k
    print(f"coin export: torch.load reads {len(sd)} adapter + {len(nl)} projector tensors "
          f"with CoIN's names; PEFT {peft.__version__} loads the adapter into a LLaMA "
          f"({len(got)} tensors equal)")


def check_moe_with_coin_fork(coin_bin):
    """MoELoRA: a CoIN-named MoELoRA adapter committed to coin and exported with --format coin
    loads with CoIN's own PEFT fork (CoIN/peft from zackschen/CoIN on PYTHONPATH) into a LLaMA,
    every expert and router weight equal."""
    from safetensors.torch import save_file
    from CoIN.peft import PeftModel as CoinPeftModel

    work = tempfile.mkdtemp(prefix="coin-export-moe-")
    experts, r = 2, 4
    llama = LlamaForCausalLM(tiny_text_config()).eval()
    torch.manual_seed(3)
    tensors = {}
    for name, mod in llama.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short not in TARGETS:
            continue
        k = f"base_model.model.{name}"
        for e in range(experts):
            tensors[f"{k}.lora_A.loraA.{e}.weight"] = torch.randn(r // experts, mod.in_features)
            tensors[f"{k}.lora_B.loraB.{e}.weight"] = torch.randn(mod.out_features, r // experts)
        tensors[f"{k}.lora_router.weight"] = torch.randn(experts, mod.in_features)
    stage = os.path.join(work, "stage")
    os.makedirs(stage)
    save_file(tensors, os.path.join(stage, "adapter_model.safetensors"))
    h = tiny_text_config().hidden_size
    save_file({"base_model.model.model.mm_projector.0.weight": torch.randn(h, 8),
               "base_model.model.model.mm_projector.0.bias": torch.randn(h),
               "base_model.model.model.mm_projector.2.weight": torch.randn(h, h),
               "base_model.model.model.mm_projector.2.bias": torch.randn(h)},
              os.path.join(stage, "non_lora_trainables.safetensors"))
    with open(os.path.join(stage, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "MOE_LORA_CoIN", "task_type": "CAUSAL_LM_CoIN", "r": r,
                   "lora_alpha": 8, "lora_dropout": 0.05, "expert_num": experts,
                   "target_modules": TARGETS}, f)
    run([coin_bin, "init"], work)
    run([coin_bin, "commit", "stage", "--task", "ScienceQA"], work)
    run([coin_bin, "checkout", "HEAD", "--output", "moe_llava_MOE_lora", "--format", "coin"],
        work)
    loaded = CoinPeftModel.from_pretrained(llama, os.path.join(work, "moe_llava_MOE_lora"))
    got = {}
    for k, v in loaded.state_dict().items():
        if "lora_" in k and ".mlp.weight" not in k.split("lora_", 1)[1]:
            got["base_model.model." + k.split("base_model.model.", 1)[1].replace(".default", "")] = v
    assert got.keys() == tensors.keys(), sorted(set(got) ^ set(tensors))[:4]
    for k, v in tensors.items():
        assert torch.equal(got[k], v), k
    print(f"MoELoRA coin export: CoIN's PEFT fork loads it into a LLaMA ({len(got)} tensors "
          f"equal: {experts} experts + router per module)")


def run(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--coin", default=os.path.abspath("target/debug/coin"))
    ap.add_argument("--coin-dir", help="only check this coin export (e.g. with peft 0.4.0)")
    ap.add_argument("--moe", action="store_true",
                    help="only the MoELoRA check with CoIN's PEFT fork (CoIN/ on PYTHONPATH)")
    args = ap.parse_args()
    if args.moe:
        check_moe_with_coin_fork(args.coin)
        print("OK")
        return
    if args.coin_dir:
        check_coin_export(args.coin_dir)
        print("OK")
        return
    work = tempfile.mkdtemp(prefix="coin-export-check-")
    env_cwd = work

    # 1. An adapter trained "by PEFT": random A and B, saved by PEFT.
    model = base_model(0)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                     target_modules=r".*language_model.*\.(" + "|".join(TARGETS) + ")")
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
        proj = peft_model.base_model.model.multi_modal_projector
        for p in proj.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    from safetensors.torch import load_file, save_file

    stage = os.path.join(work, "stage")
    peft_model.save_pretrained(stage)
    projector = {f"multi_modal_projector.{k}": v.contiguous()
                 for k, v in proj.state_dict().items()}
    save_file(projector, os.path.join(stage, "non_lora_trainables.safetensors"))
    want = lora_weights(peft_model)
    # One image token (63) and an image, so that the projector is on the path too.
    ids = torch.tensor([[1, 63, 5, 9, 12, 3, 7]])
    torch.manual_seed(2)
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        want_logits = peft_model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits

    # 2. Through coin.
    run([args.coin, "init"], env_cwd)
    run([args.coin, "commit", "stage", "--task", "ScienceQA", "-m", "peft stage"], env_cwd)
    run([args.coin, "checkout", "HEAD", "--output", "hf", "--format", "peft"], env_cwd)
    run([args.coin, "checkout", "HEAD", "--output", "stage_llava_lora", "--format", "coin"],
        env_cwd)

    # 3. The peft export on a fresh base.
    fresh = base_model(0)
    loaded = PeftModel.from_pretrained(fresh, os.path.join(work, "hf")).eval()
    missing, unexpected = loaded.base_model.model.load_state_dict(
        load_file(os.path.join(work, "hf", "non_lora_trainables.safetensors")), strict=False)
    assert not unexpected, unexpected
    got = lora_weights(loaded)
    assert got.keys() == want.keys(), (sorted(got)[:3], sorted(want)[:3])
    for k in want:
        assert torch.equal(got[k], want[k]), k
    with torch.no_grad():
        logits = loaded(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
    diff = (logits - want_logits).abs().max().item()
    assert diff == 0.0, diff
    print(f"peft export: {len(got)} LoRA tensors equal, projector loaded, logits max |diff| {diff}")

    check_coin_export(os.path.join(work, "stage_llava_lora"), want, projector)
    print(f"OK ({work})")


if __name__ == "__main__":
    main()
