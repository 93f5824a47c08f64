#!/usr/bin/env python3
"""The JSON checks of check.sh, run in a repository after `coin run`; exit status 1 with the
reason on a failed check.

    check_records.py matrix MATRIX.json               two rows, diagonal present; prints the ids
    check_records.py train STEP SHOW.json LOG.txt     train.external of step STEP (1 or 2)
    check_records.py evaluator SHOW.json TASK...      eval records made by peft_eval.py
    check_records.py answers REPO_A REPO_B SHOW.json  how many answers of coin's engine (repo A)
                                                      equal peft_eval.py's (repo B), per task
"""
import json
import os
import struct
import sys


def fail(message):
    sys.exit(f"check_records: {message}")


def matrix(path):
    m = json.load(open(path))
    rows, ids = m["matrix"], [c["id"] for c in m["checkpoints"]]
    if len(rows) != 2 or len(ids) != 2:
        fail(f"{path}: want 2 rows, got {len(rows)}")
    for k in range(2):
        if rows[k][k] is None:
            fail(f"{path}: no score for {m['tasks'][k]} after step {k + 1}")
    print(" ".join(ids))


def train(step, show_path, log_path):
    step = int(step)
    record = json.load(open(show_path)).get("train") or {}
    ext = record.get("external") or {}
    if ext.get("kind") != "trainer" or "peft_trainer.py" not in ext.get("command", ""):
        fail(f"step {step}: train.external does not name the trainer: {json.dumps(ext)[:300]}")
    if ext.get("exit") != {"code": 0}:
        fail(f"step {step}: train.external.exit is {ext.get('exit')!r}, not code 0")
    if not record.get("training_key"):
        fail(f"step {step}: no training_key in the train record")
    log = open(log_path).read()
    parent = [line.split(": ", 1)[1] for line in log.splitlines()
              if line.startswith("parent adapter: ")]
    if len(parent) != 1:
        fail(f"step {step}: the log (coin show --log) has no 'parent adapter:' line")
    if step == 1 and parent[0] != "none (a new LoRA)":
        fail(f"step 1: the trainer got a parent: {parent[0]}")
    if step == 2 and not parent[0].endswith("_llava_lora"):
        fail(f"step 2: the trainer did not get coin's parent dir (<Task>_llava_lora): {parent[0]}")
    if "step 4/4 loss" not in log:
        fail(f"step {step}: the log lacks the trainer's last step line")


def evaluator(show_path, *tasks):
    show = json.load(open(show_path))
    evals = show.get("eval") or show.get("evals") or {}
    text = json.dumps(evals)
    for task in tasks:
        if task not in text:
            fail(f"{show_path}: no eval record for {task}")
    if "peft_eval.py" not in text:
        fail(f"{show_path}: no eval record names peft_eval.py: {text[:300]}")


def predictions(repo, object_id):
    """The answer texts of a stored predictions blob (docs/on-disk-format.md: the payload
    follows a header whose length is the u32 at offset 12)."""
    path = os.path.join(repo, ".coin", "objects", object_id[:2], object_id[2:])
    data = open(path, "rb").read()
    if data[:8] != b"COINOBJ\0":
        fail(f"{path} is not a coin object")
    (header_len,) = struct.unpack_from("<I", data, 12)
    lines = data[header_len:].decode("utf-8").splitlines()
    return {a["question_id"]: a["text"] for a in map(json.loads, filter(None, lines))}


def answers(repo_a, repo_b, show_name):
    """Not a pass condition (greedy decoding of two engines may part at a near tie): prints
    how many answers are equal."""
    ea = json.load(open(os.path.join(repo_a, show_name)))["eval"]
    eb = json.load(open(os.path.join(repo_b, show_name)))["eval"]
    for task in sorted(ea):
        pa = predictions(repo_a, ea[task]["predictions"])
        pb = predictions(repo_b, eb[task]["predictions"])
        exact = sum(pa[q] == pb.get(q) for q in pa)
        # Python's str.strip (peft_eval.py's, as CoIN's eval scripts) also strips \x1c-\x1f,
        # which coin's engine keeps: the random tiny model does emit them.
        stripped = sum(pa[q].strip() == (pb.get(q) or "").strip() for q in pa)
        print(f"{task}: {stripped}/{len(pa)} answers of coin's engine (A) equal peft_eval.py's "
              f"(B) ({exact} byte for byte); scores {ea[task]['score']} and {eb[task]['score']}")


if __name__ == "__main__":
    commands = {"matrix": matrix, "train": train, "evaluator": evaluator, "answers": answers}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        fail(__doc__.strip())
    commands[sys.argv[1]](*sys.argv[2:])
