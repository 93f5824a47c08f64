#!/usr/bin/env python3
"""Load two PEFT adapter directories onto a llava-hf base with PeftModel.from_pretrained (plus
non_lora_trainables.safetensors, the projector, when present) and check that every LoRA tensor,
the projector and the logits of one image prompt are equal. Used by check.sh to compare what
peft_trainer.py saved with coin's `checkout --format peft` of the same checkpoint.

    python scripts/external/compare_adapters.py BASE_DIR SAVED_DIR EXPORTED_DIR
"""
import os
import sys
import warnings

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration


def load(base, adapter):
    model = LlavaForConditionalGeneration.from_pretrained(base, torch_dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(model, adapter).eval()
    missing = [str(w.message) for w in caught if "missing" in str(w.message).lower()]
    if missing:
        sys.exit(f"{adapter}: PEFT reports missing adapter keys: {missing[0][:300]}")
    proj = os.path.join(adapter, "non_lora_trainables.safetensors")
    if os.path.isfile(proj):
        state = {k.removeprefix("base_model.model."): v for k, v in load_file(proj).items()}
        _, unexpected = model.base_model.model.load_state_dict(state, strict=False)
        if unexpected:
            sys.exit(f"{proj}: not projector tensors: {unexpected[:3]}")
    return model


def tensors(model):
    return {k: v for k, v in model.state_dict().items()
            if "lora_" in k or "multi_modal_projector" in k}


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    base, saved, exported = sys.argv[1:]
    a, b = load(base, saved), load(base, exported)
    ta, tb = tensors(a), tensors(b)
    if ta.keys() != tb.keys():
        sys.exit(f"different tensors: {sorted(set(ta) ^ set(tb))[:4]}")
    n_lora = sum("lora_" in k for k in ta)
    if n_lora == 0:
        sys.exit("no LoRA tensors were loaded")
    for k in ta:
        if not torch.equal(ta[k], tb[k]):
            sys.exit(f"{k} differs: max |diff| {(ta[k] - tb[k]).abs().max().item()}")
    cfg = a.base_model.model.config
    n_img = cfg.image_seq_length
    ids = torch.tensor([[1, 5, 6] + [cfg.image_token_index] * n_img + [7, 8, 9]])
    torch.manual_seed(0)
    size = cfg.vision_config.image_size
    pixels = torch.randn(1, 3, size, size)
    with torch.no_grad():
        la = a(input_ids=ids, pixel_values=pixels).logits
        lb = b(input_ids=ids, pixel_values=pixels).logits
    diff = (la - lb).abs().max().item()
    if diff != 0.0:
        sys.exit(f"logits differ: max |diff| {diff}")
    projector = "with the projector" if any("multi_modal_projector" in k for k in ta) and \
        os.path.isfile(os.path.join(exported, "non_lora_trainables.safetensors")) else \
        "no projector"
    print(f"ok: {exported}: PeftModel.from_pretrained loads {n_lora} LoRA tensors equal to "
          f"{saved}'s ({projector}), logits max |diff| {diff}")


if __name__ == "__main__":
    main()
