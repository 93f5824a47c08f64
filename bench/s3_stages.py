import json, os, struct, sys, random
out, stages, layers, hidden, rank = sys.argv[1], *map(int, sys.argv[2:])
def tensor(seed, n):
    r = random.Random(seed)
    return struct.pack("<%df" % n, *(r.uniform(-1, 1) * 0.02 for _ in range(n)))
for k in range(stages):
    header, blobs, off = {}, [], 0
    for j in range(layers):
        # Layer j was last trained at stage j (or not yet): stage k changes layer k only.
        trained = j if j <= k else -1
        for proj in ("q_proj", "v_proj"):
            for ab, shape in (("lora_A", [rank, hidden]), ("lora_B", [hidden, rank])):
                name = f"base_model.model.layers.{j}.self_attn.{proj}.{ab}.weight"
                b = tensor(f"{name}/{trained}", rank * hidden)
                header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(b)]}
                blobs.append(b)
                off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    d = os.path.join(out, f"stage{k}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        f.write(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}))
