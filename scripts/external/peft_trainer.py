#!/usr/bin/env python3
"""A PyTorch + PEFT trainer for coin's external-trainer interface (`[trainer] command` of
`coin run` / `coin train`, docs/external.md), for llava-hf models such as `coin model init --tiny`.

    python scripts/external/peft_trainer.py --base MODEL_DIR --data TRAIN.json --images IMAGE_ROOT \
        --parent PARENT_ADAPTER_DIR_OR_EMPTY --output OUT_DIR [--seed 0] [--steps 4] \
        [--lr 1e-3] [--batch 4] [--r 8] [--alpha 16] [--train-projector] [--image-aspect pad]

Loads the base model; continues the parent PEFT adapter (`PeftModel.from_pretrained(...,
is_trainable=True)`, plus its non_lora_trainables.safetensors projector when present) or, with
an empty --parent, starts a LoRA on the language model's seven linears (q, k, v, o, gate, up,
down; never the vision tower). Trains --steps AdamW steps on batches drawn (seeded) from the
CoIN train file ({id, image, conversations}), each conversation in the vicuna_v1 text coin's
own trainer uses ("<system> USER: <image>\n<question> ASSISTANT: <answer></s>USER: ..."), the
<image> token expanded to the model's image_seq_length, loss on the answer tokens only (coin's
span labels: the tokens overlapping " <answer></s>"); images padded to square with the mean
colour (LLaVA-1.5's training, coin's default) or centre-cropped (`--image-aspect crop`).
Prints `parent adapter: ...` and `step k/N loss X` per step, and writes OUT_DIR with PEFT's
save_pretrained (adapter_config.json + adapter_model.safetensors), plus
non_lora_trainables.safetensors when --train-projector is given or the parent has one. Same
seed and inputs, same bytes. Exit status 1 with a message on bad input.
"""
import argparse
import json
import os
import random
import sys

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROJECTOR_FILE = "non_lora_trainables.safetensors"


def fail(message):
    name = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    print(f"{name}: error: {message}", file=sys.stderr)
    sys.exit(1)


def load_json_list(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        fail(f"cannot read the {what} '{path}' ({e.strerror})")
    except json.JSONDecodeError as e:
        fail(f"the {what} '{path}' is not JSON ({e})")
    if not isinstance(data, list) or not data:
        fail(f"the {what} '{path}' must be a non-empty JSON list")
    return data


def turns(record, path):
    """(human, gpt) pairs of one CoIN train record, checked."""
    conv = record.get("conversations") if isinstance(record, dict) else None
    rid = record.get("id", "?") if isinstance(record, dict) else "?"
    if not isinstance(conv, list) or len(conv) < 2 or len(conv) % 2:
        fail(f"record '{rid}' of '{path}' needs an even, non-empty 'conversations' list")
    pairs = []
    for h, g in zip(conv[0::2], conv[1::2]):
        if not (isinstance(h, dict) and isinstance(g, dict) and h.get("from") == "human"
                and g.get("from") == "gpt" and isinstance(h.get("value"), str)
                and isinstance(g.get("value"), str)):
            fail(f"record '{rid}' of '{path}': turns must alternate "
                 "{\"from\": \"human\"} and {\"from\": \"gpt\"} with string values")
        pairs.append((h["value"], g["value"]))
    return pairs


def square(image, aspect, mean):
    """LLaVA's expand2square (pad with the mean colour, centred) for `pad`; as is for `crop`
    (the CLIP processor then resizes the shortest side and centre-crops)."""
    from PIL import Image

    w, h = image.size
    if aspect != "pad" or w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), tuple(int(x * 255) for x in mean))
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def load_projector(model, adapter_dir):
    """Put the adapter dir's non_lora_trainables.safetensors (if any) into the model's projector;
    True when there was one. Keys: `[base_model.model.][model.]multi_modal_projector.<linear>.*`
    (coin's peft export, this trainer, either transformers layout); every projector tensor must
    be there, and nothing else."""
    from safetensors.torch import load_file

    path = os.path.join(adapter_dir, PROJECTOR_FILE)
    if not os.path.isfile(path):
        return False
    marker = "multi_modal_projector."
    tensors = load_file(path)
    others = [k for k in tensors if marker not in k]
    if others:
        fail(f"'{path}' must hold the projector's tensors ({marker}*) only; it has {others[:3]}")
    state = {k.split(marker, 1)[1]: v for k, v in tensors.items()}
    try:
        model.base_model.model.multi_modal_projector.load_state_dict(state, strict=True)
    except RuntimeError as e:
        fail(f"'{path}' does not fit the model's projector ({e})")
    return True


def conversation(pairs):
    """The vicuna_v1 text of a conversation and the character ranges of its replies, as coin's
    trainer builds them (src/ml/train/data.rs): `<image>` moved to the front of the first
    question, each reply from the space after `ASSISTANT:` to its `</s>`."""
    text, replies = f"{SYSTEM} ", []
    for i, (human, answer) in enumerate(pairs):
        if i == 0:
            human = "<image>\n" + human.replace("<image>", "").strip()
        text += f"USER: {human} ASSISTANT:"
        start = len(text)
        text += f" {answer}</s>"
        replies.append((start, len(text)))
    return text, replies


def encode(tok, pairs, image_id, n_img, bos_id):
    """input_ids and labels of one conversation, the text tokenized once: a token is supervised
    iff its characters overlap a reply (coin's span labels); <image> expanded to n_img places."""
    text, replies = conversation(pairs)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = [bos_id], [-100]
    for t, (s, e) in zip(enc.input_ids, enc.offset_mapping):
        if t == image_id:
            ids += [t] * n_img
            labels += [-100] * n_img
            continue
        supervised = e > s and any(s < re and e > rs for rs, re in replies)
        ids.append(t)
        labels.append(t if supervised else -100)
    return ids, labels


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="llava-hf base model directory")
    ap.add_argument("--data", required=True, help="CoIN train file (JSON list)")
    ap.add_argument("--images", required=True, help="root the records' image paths are under")
    ap.add_argument("--parent", default="", help="parent PEFT adapter directory; empty: a new LoRA")
    ap.add_argument("--output", required=True, help="where to save the new adapter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--train-projector", action="store_true",
                    help="train the projector in full and save it as " + PROJECTOR_FILE)
    ap.add_argument("--image-aspect", choices=["pad", "crop"], default="pad",
                    help="pad to square with the mean colour (LLaVA-1.5, coin) or centre-crop")
    args = ap.parse_args()
    if args.steps < 1 or args.batch < 1 or args.r < 1 or not args.lr > 0:
        fail("--steps, --batch and --r must be at least 1 and --lr positive")
    if not os.path.isfile(os.path.join(args.base, "config.json")):
        fail(f"'{args.base}' is not a model directory (no config.json)")
    if args.parent and not os.path.isfile(os.path.join(args.parent, "adapter_config.json")):
        fail(f"the parent '{args.parent}' is not a PEFT adapter directory (no adapter_config.json)")
    records = load_json_list(args.data, "train file")
    conversations = [turns(r, args.data) for r in records]
    for r in records:
        image = r.get("image")
        if not isinstance(image, str) or not os.path.isfile(os.path.join(args.images, image)):
            fail(f"record '{r.get('id', '?')}' of '{args.data}' has no image under "
                 f"'{args.images}' (\"image\": {json.dumps(image)}; this trainer needs one per record)")

    # Imported after the argument checks, so that bad input fails fast.
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import (CLIPImageProcessor, LlavaForConditionalGeneration,
                              PreTrainedTokenizerFast)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    model = LlavaForConditionalGeneration.from_pretrained(args.base, torch_dtype=torch.float32)
    cfg = model.config
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.base, "tokenizer.json"),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>")
    processor = CLIPImageProcessor.from_pretrained(args.base)
    image_id = cfg.image_token_index
    n_img = getattr(cfg, "image_seq_length", None) or (
        cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    bos_id = cfg.text_config.bos_token_id if cfg.text_config.bos_token_id is not None else 1

    if args.parent:
        print(f"parent adapter: {os.path.abspath(args.parent)}", flush=True)
        model = PeftModel.from_pretrained(model, args.parent, is_trainable=True)
        parent_projector = load_projector(model, args.parent)
    else:
        print("parent adapter: none (a new LoRA)", flush=True)
        parent_projector = False
        # Only the language model's linears (saved keys: base_model.model.language_model.
        # model.layers.N.… or model.language_model.layers.N.…, both read by coin).
        pattern = r".*language_model.*\.(" + "|".join(TARGETS) + r")$"
        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha,
                                                 lora_dropout=0.0, target_modules=pattern,
                                                 bias="none"))
    # A parent with a trained projector keeps it trained (and saved): coin would otherwise
    # evaluate the child with the base model's projector.
    train_projector = args.train_projector or parent_projector
    projector = model.base_model.model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(train_projector)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)

    def pixels(record):
        path = os.path.join(args.images, record.get("image", ""))
        try:
            with Image.open(path) as im:
                im = square(im.convert("RGB"), args.image_aspect, processor.image_mean)
                return processor(im, return_tensors="pt").pixel_values[0]
        except (OSError, ValueError) as e:
            fail(f"cannot read the image '{path}' of record '{record.get('id', '?')}' ({e})")

    order = list(range(len(records)))
    rng = random.Random(args.seed)
    rng.shuffle(order)
    cursor = 0
    for step in range(1, args.steps + 1):
        rows = []
        for _ in range(args.batch):
            if cursor == len(order):
                rng.shuffle(order)
                cursor = 0
            rows.append(order[cursor])
            cursor += 1
        enc = [encode(tok, conversations[i], image_id, n_img, bos_id) for i in rows]
        for i, (ids, _) in zip(rows, enc):
            if ids.count(image_id) != n_img:
                fail(f"record '{records[i].get('id', '?')}' of '{args.data}' must have exactly "
                     "one <image> in its conversation")
        width = max(len(ids) for ids, _ in enc)
        input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in enc])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in enc])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in enc])
        pix = torch.stack([pixels(records[i]) for i in rows])
        loss = model(input_ids=input_ids, pixel_values=pix, attention_mask=mask,
                     labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {step}/{args.steps} loss {loss.item():.6f}", flush=True)

    os.makedirs(args.output, exist_ok=True)
    model.save_pretrained(args.output)
    if train_projector:
        save_file({f"multi_modal_projector.{k}": v.detach().contiguous()
                   for k, v in projector.state_dict().items()},
                  os.path.join(args.output, PROJECTOR_FILE))
    print(f"saved adapter: {os.path.abspath(args.output)}", flush=True)


if __name__ == "__main__":
    main()
