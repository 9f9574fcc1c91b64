"""Peak memory of streamed encoder training at 96x96 against the pool's size.

    nice -n 10 .venv/bin/python benchmarks/bench_stream_memory.py --sizes 2000 20000 100000 --max-steps 20

Reuses (or makes) the small JPEGs of benchmarks/bench_index_scale.py (48x48, ~1-2 KB, under
runs/bench_index/jpegs/), lists the first N in a CSV manifest, and runs for each N, in a fresh
process, the real command

    ecos-cloud train-encoder pool-N.csv --input-size 96 --stream on --epochs 1 --max-steps S ...

measuring its peak resident set (``ru_maxrss`` of that child from ``os.wait4``) and wall time.
The steps are bounded so every size does the same training work; what differs is the pool
(path list, per-epoch permutation, channel statistics from 2,000 random files, the held-out check
on at most 2,000 + 2,000 images, the pixel branch from at most 5,000).

Each size also runs, in another fresh process, ``--list-bytes MANIFEST``: what the training holds
per file before decoding anything (the scanned manifest, the PoolSet, the batch source, the
train/held-out split and one epoch's order with its first batch decoded), as resident-set growth.

Writes benchmarks/results/stream_memory.json and docs/results/stream_memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_index_scale import WORK, generate, manifest  # noqa: E402


def run(cmd) -> dict:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": time.monotonic() - t0, "log_tail": out.splitlines()[-3:]}


def list_bytes(manifest_path: str) -> dict:
    """Resident-set growth (MB) of the streamed training's file list for ``manifest_path`` (see the docstring)."""
    import gc

    import torch

    from cloud.pool.dataset import default_preprocess, pool_set
    from cloud.pool.manifest import scan_pool
    from cloud.training.data import batch_source
    from cloud.training.encoder import split_indices

    def rss() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    gc.collect()
    start = rss()
    items = scan_pool(manifest_path, compact=True)  # as `ecos-cloud train-encoder` (cloud/cli/common.py)
    scanned = rss()
    data = pool_set(items, default_preprocess((96, 96)))
    del items
    source = batch_source(data, (0.5,) * 3, (0.25,) * 3, 2)
    train_idx, _ = split_indices(len(data), 0.1, 0)
    order = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(0))]
    batches = source.batches([order[s : s + 64] for s in range(0, len(order), 64)])
    next(batches)  # the epoch's order is in place and its first batch decoded
    held = rss()
    return {"files": len(data), "scan_mb": scanned - start, "list_mb": held - start}


def main() -> None:
    if sys.argv[1:2] == ["--list-bytes"]:
        print(json.dumps(list_bytes(sys.argv[2])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    folder = generate(max(args.sizes), os.cpu_count() or 1)
    cli = os.path.join(os.path.dirname(sys.executable), "ecos-cloud")
    rows = []
    for n in args.sizes:
        m = manifest(folder, n)
        cmd = [cli, "train-encoder", m, "--input-size", "96", "--stream", "on", "--epochs", "1"]
        cmd += ["--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size)]
        cmd += ["--threads", str(args.threads), "--workers", str(args.workers), "--no-tflite"]
        cmd += ["--out", os.path.join(WORK, f"stream-enc-{n}.onnx")]
        row = {"images": n, **run(cmd)}
        listed = subprocess.run(
            [sys.executable, __file__, "--list-bytes", m], capture_output=True, text=True, check=True
        )
        row.update({k: v for k, v in json.loads(listed.stdout.splitlines()[-1]).items() if k != "files"})
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_average_at_end": os.getloadavg(),
        "args": vars(args),
        "rows": rows,
        "command": "nice -n 10 .venv/bin/python benchmarks/bench_stream_memory.py " + " ".join(sys.argv[1:]),
    }
    with open(os.path.join(ROOT, "benchmarks", "results", "stream_memory.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    base = rows[0]["peak_rss_mb"]
    lines = [
        "# Streamed encoder training: peak memory against pool size (benchmarks/bench_stream_memory.py)",
        "",
        f"`{result['command']}`; {os.cpu_count()} CPUs shared with other work (load average at the end "
        f"{result['load_average_at_end'][0]:.1f}). Each row is one fresh process running",
        "",
        "```",
        f"ecos-cloud train-encoder pool-N.csv --input-size 96 --stream on --epochs 1 --max-steps {args.max_steps} "
        f"--batch-size {args.batch_size} --threads {args.threads} --workers {args.workers} --no-tflite --out enc.onnx",
        "```",
        "",
        "on the first N of the 48x48 JPEGs of bench_index_scale.py listed in a CSV manifest; peak RSS is the "
        "child's `ru_maxrss` (os.wait4).",
        "",
        "| pool files | peak RSS (MB) | vs smallest (MB) | wall (s) | file list held (MB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['images']:,} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - base:+.0f} | {r['wall_s']:.0f} "
            f"| {r['list_mb']:.0f} |"
        )
    small, large = rows[0], rows[-1]
    per_file = (large["list_mb"] - small["list_mb"]) * 2**20 / max(large["images"] - small["images"], 1)
    lines += [
        "",
        "Every row does the same training work (the same number of batches of 64 images, two 96x96 views each); "
        "what grows with the pool is the list of files and the per-epoch order. The last column is that list "
        "alone, measured in another fresh process (`--list-bytes`: resident-set growth after scanning the "
        "manifest, making the PoolSet and its batch source, the train/held-out split and one epoch's order "
        f"with its first batch decoded): {per_file:.0f} bytes a file between {small['images']:,} and "
        f"{large['images']:,} files (the rest of that column, some 20 MB, is the decoding threads and torch's "
        "first use, the same at every size). The file list is an ItemList (cloud/pool/items.py): each path's "
        "folder as an int32 code, its file name as UTF-8 bytes in one buffer with int64 offsets, label and "
        "domain as int32 codes; the manifest is scanned straight into it, so no Python object per file is "
        "made or kept. The peak is set by the 96x96 activations, the decoded batches and the held-out check "
        "(at most 2,000 + 2,000 images when streaming). The wall time varies with the load of the shared "
        "machine, not with the pool. A file's cost is about 85 bytes plus its file name's length (8 bytes "
        "here: `0000.jpg`); the folder part is stored once per folder.",
        "",
        "Before the ItemList (commit 7808a26: a list of ImageItem objects, a list of their paths, and the "
        "epoch's paths listed in full), on the same machine in the same hour (load average about 3), the same "
        "command peaked at 1879, 1792 and 2280 MB for 10,000, 100,000 and 1,000,000 files, and the same "
        "file-list measurement held 21 and 377 MB at 10,000 and 1,000,000 files: 377 bytes a file. Both "
        "versions train the same encoder: the ONNX files of each size have the same sha256 "
        "(b9d454e6..., 30675391..., 5a6f0e08...).",
    ]
    with open(os.path.join(ROOT, "docs", "results", "stream_memory.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
