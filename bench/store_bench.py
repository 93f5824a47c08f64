"""Driver of bench/store.sh: generates the checkpoint sequences and times coin, git-lfs and
DVC on them. Prints a markdown table with ratios. Usage: store_bench.py WORKDIR (env COIN: the
coin binary; BLAKE3_BENCH: the blake3_bench example binary, which measures the floor).

The durable floor, measured in the same run beside every coin commit: a commit must hash every
byte of the file (blake3 from a memory map, all threads) and write + fsync the changed tensor;
a checkout must write + fsync the whole file. Ratios are coin's wall time (the whole process)
over the floor (the operations alone)."""
import hashlib
import json
import os
import statistics
import shutil
import struct
import subprocess
import sys
import time

COIN = os.environ["COIN"]
BLAKE3_BENCH = os.environ["BLAKE3_BENCH"]
WORK = sys.argv[1]
MiB = 1 << 20
STEPS = 5


def make_safetensors(path, n_tensors, tensor_bytes, dtype, elem):
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for i in range(n_tensors):
        n = tensor_bytes // elem
        header[f"model.layers.{i}.weight"] = {
            "dtype": dtype, "shape": [n // 1024, 1024], "data_offsets": [off, off + tensor_bytes]}
        off += tensor_bytes
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    offsets = []
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(js)) + js)
        start = 8 + len(js)
        for i in range(n_tensors):
            offsets.append(start + i * tensor_bytes)
            f.write(os.urandom(tensor_bytes))
    return offsets


def rewrite_tensor(path, offset, tensor_bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(tensor_bytes))


def timed(cmd, cwd=None, env=None):
    """Run cmd under /usr/bin/time; returns (seconds, peak RSS bytes, stdout)."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, cwd=cwd, env=env,
                       capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{p.stdout}\n{p.stderr}")
    rss = int(p.stderr.strip().splitlines()[-1]) * 1024
    return dt, rss, p.stdout


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


def floor(path, writes):
    """Run blake3_bench on path with --write (bytes, dir) pairs; returns its JSON."""
    args = [BLAKE3_BENCH, path]
    for n, d in writes:
        args += ["--write", str(n), d]
    p = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def sh(cmd, cwd):
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, shell=True)


def run_sequence(name, n_tensors, tensor_bytes, dtype, elem):
    d = os.path.join(WORK, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    src = os.path.join(d, "model.safetensors")
    offsets = make_safetensors(src, n_tensors, tensor_bytes, dtype, elem)
    size = os.path.getsize(src)
    step0_sha = sha256(src)
    res = {"name": name, "size": size, "tensor": tensor_bytes, "n": n_tensors}

    # blake3 reference: the same bytes read and hashed with rayon (all threads), file in page
    # cache; the time of the operation alone, without process start.
    floor(src, [])
    res["blake3_s"] = min(floor(src, [])["hash_read_s"] for _ in range(3))

    tools = {"coin": None}
    if shutil.which("git-lfs"):
        tools["git-lfs"] = None
    if shutil.which("dvc"):
        tools["dvc"] = None
    for tool in list(tools):
        repo = os.path.join(d, tool)
        os.makedirs(repo)
        f = os.path.join(repo, "model.safetensors")
        shutil.copyfile(src, f)
        if tool == "coin":
            sh(f"'{COIN}' -q init .", repo)
        if tool == "git-lfs":
            sh("git init -q && git lfs install --local >/dev/null && git lfs track '*.safetensors' >/dev/null"
               " && git add .gitattributes && git -c user.name=b -c user.email=b@b commit -qm init", repo)
        if tool == "dvc":
            sh("git init -q && dvc init -q && dvc config core.autostage true"
               " && git -c user.name=b -c user.email=b@b commit -qm init", repo)
        commit_s, rss, stored, entries, floors = [], [], [], [], []
        for step in range(STEPS + 1):
            if step > 0:
                k = (step - 1) % n_tensors
                rewrite_tensor(f, offsets[k], tensor_bytes)
                if tool == "coin":
                    fl = floor(f, [(tensor_bytes, repo)])
                    floors.append({"hash": fl["hash_mmap_s"], "write": fl["writes"][0]["seconds"]})
            # the file was just written: it is in the page cache for every tool alike
            if tool == "coin":
                dt, r, out = timed([COIN, "-q", "commit", "model.safetensors", "--task", "bench", "-m", f"s{step}"], cwd=repo)
                stored.append(du(os.path.join(repo, ".coin", "objects")))
            elif tool == "git-lfs":
                dt, r, _ = timed(["sh", "-c", f"git add model.safetensors && git -c user.name=b -c user.email=b@b commit -qm s{step}"], cwd=repo)
                stored.append(du(os.path.join(repo, ".git", "lfs", "objects")))
            else:
                dt, r, _ = timed(["sh", "-c", f"dvc add -q model.safetensors && git -c user.name=b -c user.email=b@b commit -qm s{step}"], cwd=repo)
                stored.append(du(os.path.join(repo, ".dvc", "cache")))
            commit_s.append(dt)
            rss.append(r)
        # checkout: rebuild step 0's file from the store into the working location
        if tool == "coin":
            fl = [floor(f, [(size, repo)]) for _ in range(3)]
            res["checkout_floor_s"] = statistics.median(x["writes"][0]["seconds"] for x in fl)
            res["commit_floor"] = floors
            out = os.path.join(repo, "out")
            co, co_rss, _ = timed([COIN, "-q", "checkout", f"HEAD~{STEPS}", "--output", out], cwd=repo)
            restored = os.path.join(out, "model.safetensors")
        elif tool == "git-lfs":
            os.remove(f)
            co, co_rss, _ = timed(["sh", "-c", f"git checkout -q HEAD~{STEPS} -- model.safetensors"], cwd=repo)
            restored = f
        else:
            os.remove(f)
            co, co_rss, _ = timed(["sh", "-c", f"git checkout -q HEAD~{STEPS} -- model.safetensors.dvc && dvc checkout -q model.safetensors"], cwd=repo)
            restored = f
        if sha256(restored) != step0_sha:
            raise SystemExit(f"{tool}: checkout did not restore step 0 byte for byte")
        tools[tool] = {"commit_s": commit_s, "rss": rss, "stored": stored, "checkout_s": co,
                       "checkout_rss": co_rss, "restored_bytes": os.path.getsize(restored)}
    res["tools"] = tools
    return res


def fmt_s(x):
    return f"{x:.3f}"


def report(res):
    size, tb = res["size"], res["tensor"]
    c = res["tools"]["coin"]
    lines = [f"#### {res['name']}: {size / MiB:.1f} MiB file, {res['n']} tensors of {tb / MiB:.1f} MiB, "
             f"one tensor rewritten per step, {STEPS} steps", ""]
    fl = res["commit_floor"]
    fl_hash = sum(x["hash"] for x in fl) / len(fl)
    fl_write = sum(x["write"] for x in fl) / len(fl)
    commit_floor = fl_hash + fl_write
    co_floor = res["checkout_floor_s"]
    lines.append(f"Durable floor (same run): commit {fmt_s(commit_floor)} s = blake3 of the file from a memory map, "
                 f"all threads, {fmt_s(fl_hash)} s + write and fsync of one tensor {fmt_s(fl_write)} s (means over steps 1-5); "
                 f"checkout {fmt_s(co_floor)} s = write and fsync of the whole file (median of 3).")
    lines.append("")
    lines.append("| tool | first commit s | mean commit s (steps 1-5) | commit / floor | checkout s | checkout / floor | store after | growth / changed bytes | peak RSS commit |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for tool, t in res["tools"].items():
        steps = t["commit_s"][1:]
        mean = sum(steps) / len(steps)
        growth = (t["stored"][-1] - t["stored"][0]) / (STEPS * tb)
        lines.append(f"| {tool} | {fmt_s(t['commit_s'][0])} | {fmt_s(mean)} | {mean / commit_floor:.2f}x | {fmt_s(t['checkout_s'])} | "
                     f"{t['checkout_s'] / co_floor:.2f}x | {t['stored'][-1] / MiB:.1f} MiB | {growth:.4f}x | {max(t['rss']) / MiB:.0f} MiB |")
    lines.append("")
    mean_c = sum(c["commit_s"][1:]) / STEPS
    lines.append(f"- coin commit / durable floor: **{mean_c / commit_floor:.2f}x** (target <= 1.3x); "
                 f"checkout / floor: **{c['checkout_s'] / co_floor:.2f}x** (target <= 1.3x)")
    for tool in ("git-lfs", "dvc"):
        if tool in res["tools"]:
            t = res["tools"][tool]
            m = sum(t["commit_s"][1:]) / STEPS
            lines.append(f"- commit speed-up vs {tool}: **{m / mean_c:.1f}x** (target >= 10x); "
                         f"checkout speed-up: {t['checkout_s'] / c['checkout_s']:.1f}x")
        else:
            lines.append(f"- {tool}: not installed, not measured")
    ingest_rate = size / mean_c
    b3_rate = size / res["blake3_s"]
    lines.append(f"- coin ingest {ingest_rate / MiB:.0f} MiB/s vs blake3 read + hash, all threads {b3_rate / MiB:.0f} MiB/s "
                 f"(same file, read + hash only): **{ingest_rate / b3_rate:.2f}** (target >= 0.80)")
    lines.append(f"- coin store growth per step / changed tensor bytes: **{(c['stored'][-1] - c['stored'][0]) / (STEPS * tb):.4f}x** (target <= 1.01x)")
    lines.append(f"- coin peak RSS {max(c['rss']) / MiB:.0f} MiB vs largest tensor + 64 MiB = {(tb + 64 * MiB) / MiB:.0f} MiB; "
                 f"checkout peak RSS {c['checkout_rss'] / MiB:.0f} MiB")
    lines.append(f"- coin per-step commit seconds: {', '.join(fmt_s(x) for x in c['commit_s'])}")
    return "\n".join(lines)


def main():
    os.makedirs(WORK, exist_ok=True)
    out = []
    for args in (("checkpoint-256MiB", 8, 32 * MiB, "F32", 4), ("adapter-40MiB", 16, 40 * MiB // 16, "BF16", 2)):
        r = run_sequence(*args)
        out.append(report(r))
        print(out[-1] + "\n", flush=True)
    with open(os.path.join(WORK, "results.md"), "w") as fh:
        fh.write("\n\n".join(out) + "\n")


main()
