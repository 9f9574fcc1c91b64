"""Peak memory of streamed encoder training at 96x96 against the pool's size.

    nice -n 10 .venv/bin/python benchmarks/bench_stream_memory.py --sizes 2000 20000 100000 --max-steps 20

Reuses (or makes) the small JPEGs of benchmarks/bench_index_scale.py (48x48, ~1-2 KB, under
runs/bench_index/jpegs/), lists the first N in a CSV manifest, and runs for each N, in a fresh
process, the real command

    ecos-cloud train-encoder pool-N.csv --input-size 96 --stream on --epochs 1 --max-steps S ...

measuring its peak resident set (``ru_maxrss`` of that child from ``os.wait4``), the peaks of its
anonymous and file-backed parts (``RssAnon`` / ``RssFile`` of /proc/PID/status, read every 50 ms by
a thread of this process) and wall time.
The steps are bounded so every size does the same training work; what differs is the pool
(path list, per-epoch permutation, channel statistics from 2,000 random files, the held-out check
on at most 2,000 + 2,000 images, the pixel branch from at most 5,000).

Each size also runs, in another fresh process, ``--list-bytes MANIFEST``: what the training holds
per file before decoding anything (the scanned manifest, the PoolSet, the batch source, the
train/held-out split and one epoch's order with its first batch decoded), as growth of the
anonymous and of the file-backed resident set.

``--before-code DIR`` (a ``git worktree`` of an earlier commit) runs both measurements for each size
with that code too (``PYTHONPATH=DIR``), interleaved with this code's, so the two see the same load;
the ONNX files of the two are compared by sha256.

Writes benchmarks/results/stream_memory.json and docs/results/stream_memory.md (``--report-only``
rewrites the latter from the former).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# after PYTHONPATH (--before-code runs the list measurement with the earlier code found there first)
_PYTHONPATH = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
sys.path.insert(max((i + 1 for i, p in enumerate(sys.path) if p in _PYTHONPATH), default=0), ROOT)

from benchmarks.bench_index_scale import WORK, generate, manifest  # noqa: E402


def status_mb(pid="self") -> dict:
    """VmRSS, RssAnon, RssFile, RssShmem and VmHWM of /proc/PID/status, in MB."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def run(cmd, env=None) -> dict:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peaks = {"RssAnon": 0.0, "RssFile": 0.0}
    done = threading.Event()

    def sample() -> None:  # the child's own peak of each part is not kept by the kernel: sample it
        while not done.is_set():
            try:
                now = status_mb(proc.pid)
            except (OSError, ValueError):
                return
            for key in peaks:
                peaks[key] = max(peaks[key], now.get(key, 0.0))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    done.set()
    sampler.join()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return {
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "peak_anon_mb": peaks["RssAnon"],
        "peak_file_mb": peaks["RssFile"],
        "wall_s": time.monotonic() - t0,
        "log_tail": out.splitlines()[-3:],
    }


def list_bytes(manifest_path: str) -> dict:
    """Growth (MB) of the streamed training's file list for ``manifest_path`` (see the docstring).

    Runs what ``ecos-cloud train-encoder --stream on`` runs (cloud/cli/common.py ``_pool_data``, the
    batch source, the split, one epoch's order) with the code found first on ``sys.path``."""
    import gc

    import torch

    from cloud.cli.common import _pool_data
    from cloud.training.data import batch_source
    from cloud.training.encoder import split_indices

    out = os.path.join(WORK, "list-bytes", "enc.onnx")
    args = argparse.Namespace(
        pool=manifest_path, input_size=96, channels=3, resize="center-crop", stream="on", workers=2, out=out
    )
    gc.collect()
    start = status_mb()
    data = _pool_data(args)
    scanned = status_mb()
    source = batch_source(data, (0.5,) * 3, (0.25,) * 3, 2)
    train_idx, _ = split_indices(len(data), 0.1, 0)
    gen = torch.Generator().manual_seed(0)
    try:  # as the training does (cloud/training/encoder.py)
        from cloud.training.data import Batches, epoch_order
    except ImportError:  # the code before: an int64 order, a list of its batches
        order = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=gen)]
        chunks = [order[s : s + 64] for s in range(0, len(order), 64)]
    else:
        chunks = Batches(epoch_order(train_idx, gen), 64)
    batches = source.batches(chunks)
    next(batches)  # the epoch's order is in place and its first batch decoded
    held = status_mb()
    mapped_rss = 0.0  # resident pages of the list's own mapped files (unlinked: "(deleted)" in smaps)
    with open("/proc/self/smaps") as fh:
        inside = False
        for line in fh:
            if line[:1] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                inside = ".ecos-items-" in line
            elif inside and line.startswith("Rss:"):
                mapped_rss += int(line.split()[1]) / 1024
    items = data.items
    mapped = bool(getattr(items, "mapped", False))
    size = items.nbytes() + data.labels.nbytes + data.domains.nbytes
    return {
        "files": len(data),
        "scan_mb": scanned["VmRSS"] - start["VmRSS"],
        "list_mb": held["VmRSS"] - start["VmRSS"],
        "list_anon_mb": held["RssAnon"] - start["RssAnon"],
        "list_file_mb": held["RssFile"] - start["RssFile"],
        "mapped": mapped,
        "list_mapped_rss_mb": mapped_rss,
        "list_arrays_mb": size / 2**20,
        "leftover_files": len(os.listdir(os.path.dirname(out))) if os.path.isdir(os.path.dirname(out)) else 0,
    }


def sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def measure(n: int, m: str, args, code=None) -> dict:
    """Both measurements for ``n`` files (``m``, the manifest), with this code or that of ``code``."""
    env = dict(os.environ, PYTHONPATH=code) if code else None
    tag = "-before" if code else ""
    cli = os.path.join(os.path.dirname(sys.executable), "ecos-cloud")
    out = os.path.join(WORK, f"stream-enc-{n}{tag}.onnx")
    cmd = [cli, "train-encoder", m, "--input-size", "96", "--stream", "on", "--epochs", "1"]
    cmd += ["--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size)]
    cmd += ["--threads", str(args.threads), "--workers", str(args.workers), "--no-tflite", "--out", out]
    row = {"images": n, **run(cmd, env), "onnx_sha256": sha256(out)}
    listed = subprocess.run(
        [sys.executable, __file__, "--list-bytes", m], capture_output=True, text=True, check=True, env=env
    )
    row.update({k: v for k, v in json.loads(listed.stdout.splitlines()[-1]).items() if k != "files"})
    return row


def main() -> None:
    if sys.argv[1:2] == ["--list-bytes"]:
        print(json.dumps(list_bytes(sys.argv[2])))
        return
    if sys.argv[1:2] == ["--report-only"]:  # rewrite the markdown from the JSON of the last run
        with open(os.path.join(ROOT, "benchmarks", "results", "stream_memory.json")) as fh:
            result = json.load(fh)
        write_report(result, argparse.Namespace(**result["args"]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--before-code", help="a checkout of earlier code to measure the same way, interleaved")
    ap.add_argument("--before-label", default="earlier code", help="how the docs name --before-code's version")
    ap.add_argument(
        "--add-pass",
        action="store_true",
        help="keep the peaks of the earlier passes in the JSON (same sizes and settings) and report them all",
    )
    args = ap.parse_args()
    path = os.path.join(ROOT, "benchmarks", "results", "stream_memory.json")
    passes = []
    if args.add_pass and os.path.exists(path):
        with open(path) as fh:
            passes = json.load(fh).get("passes", [])
    os.makedirs(WORK, exist_ok=True)
    folder = generate(max(args.sizes), os.cpu_count() or 1)
    rows, before = [], []
    for n in args.sizes:
        m = manifest(folder, n)
        if args.before_code:
            before.append(measure(n, m, args, os.path.abspath(args.before_code)))
            print("before", json.dumps(before[-1]), flush=True)
        rows.append(measure(n, m, args))
        print(json.dumps(rows[-1]), flush=True)
    peaks = ("images", "peak_rss_mb", "peak_anon_mb", "peak_file_mb", "wall_s", "onnx_sha256")
    passes.append(
        {
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_at_end": os.getloadavg(),
            "rows": [{k: r[k] for k in peaks} for r in rows],
            "before_rows": [{k: r[k] for k in peaks} for r in before],
        }
    )
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_average_at_end": os.getloadavg(),
        "args": vars(args),
        "rows": rows,
        "before_rows": before,
        "passes": passes,
        "command": "nice -n 10 .venv/bin/python benchmarks/bench_stream_memory.py " + " ".join(sys.argv[1:]),
    }
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    write_report(result, args)


def write_report(result: dict, args) -> None:
    lines = report(result, args)
    with open(os.path.join(ROOT, "docs", "results", "stream_memory.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _table(rows) -> list:
    base, anon = rows[0]["peak_rss_mb"], rows[0]["peak_anon_mb"]
    lines = [
        "| pool files | peak RSS (MB) | vs smallest | peak anonymous (MB) | vs smallest | peak file-backed (MB) "
        "| wall (s) | list: anonymous (MB) | list: file-backed (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['images']:,} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - base:+.0f} | {r['peak_anon_mb']:.0f} "
            f"| {r['peak_anon_mb'] - anon:+.0f} | {r['peak_file_mb']:.0f} | {r['wall_s']:.0f} "
            f"| {r['list_anon_mb']:.1f} | {r['list_file_mb']:.1f} |"
        )
    return lines


def _per_file(rows, key: str) -> float:
    small, large = rows[0], rows[-1]
    return (large[key] - small[key]) * 2**20 / max(large["images"] - small["images"], 1)


def report(result: dict, args) -> list:
    rows, before = result["rows"], result["before_rows"]
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
        "on the first N of the 48x48 JPEGs of bench_index_scale.py listed in a CSV manifest. Peak RSS is the "
        "child's `ru_maxrss` (os.wait4): anonymous and file-backed pages together. The peaks of each part are "
        "`RssAnon` and `RssFile` of /proc/PID/status, read every 50 ms while it runs. The two `list` columns "
        "come from another fresh process (`--list-bytes`): growth of each part after scanning the manifest, "
        "making the PoolSet and its batch source, the train/held-out split and one epoch's order with its "
        "first batch decoded.",
        "",
    ]
    if before:
        lines += [f"This code ({len(rows)} sizes):", ""]
    lines += _table(rows)
    if before:
        lines += ["", f"The same, with {args.before_label} (`--before-code`, run interleaved with the rows above):", ""]
        lines += _table(before)
        same = all(a["onnx_sha256"] == b["onnx_sha256"] for a, b in zip(rows, before))
        lines += [
            "",
            "The ONNX files of the two versions are "
            + ("byte-identical at every size" if same else "**not** byte-identical")
            + ": sha256 "
            + ", ".join(f"{r['images']:,}: {r['onnx_sha256'][:8]}..." for r in rows)
            + ("" if same else "; before: " + ", ".join(f"{r['onnx_sha256'][:8]}..." for r in before))
            + ".",
        ]
    lines += [
        "",
        f"Per file, between {rows[0]['images']:,} and {rows[-1]['images']:,} files, the file list measurement "
        f"holds {_per_file(rows, 'list_anon_mb'):.1f} bytes of anonymous memory"
        + (f" (before: {_per_file(before, 'list_anon_mb'):.1f})" if before else "")
        + f" and {_per_file(rows, 'list_file_mb'):.1f} bytes file-backed. The peaks of the whole training run "
        "vary from run to run by more than the list's share (the passes below): they are set by the 96x96 "
        "activations, the decoded batches, the held-out check (at most 2,000 + 2,000 images when streaming) "
        "and how the allocator's arenas happen to fill, not by the pool. The smallest pool also does less: "
        "10% of 10,000 files is 1,000 held-out images where the larger pools check the 2,000 of the cap, part "
        "of every version's step up from 10,000 files.",
    ]
    if len(result.get("passes", [])) > 1:
        lines += [
            "",
            f"Peak RSS / peak anonymous (MB) of each of the {len(result['passes'])} passes (the tables above are "
            "the last one); the spread between runs of one size is what the peaks can and cannot resolve:",
            "",
            "| pool files | "
            + " | ".join(f"pass {i + 1} ({p['finished'][11:]})" for i, p in enumerate(result["passes"]))
            + " | mean |",
            "|---:|" + "---:|" * (len(result["passes"]) + 1),
        ]
        for version, key in (("", "rows"), (" before", "before_rows")):
            for k, r in enumerate(result["passes"][-1][key]):
                cells = [
                    f"{p[key][k]['peak_rss_mb']:.0f} / {p[key][k]['peak_anon_mb']:.0f}" if k < len(p[key]) else ""
                    for p in result["passes"]
                ]
                both = [
                    (p[key][k]["peak_rss_mb"], p[key][k]["peak_anon_mb"]) for p in result["passes"] if k < len(p[key])
                ]
                mean = [sum(v[j] for v in both) / len(both) for j in (0, 1)]
                lines.append(
                    f"| {r['images']:,}{version} | " + " | ".join(cells) + f" | {mean[0]:.0f} / {mean[1]:.0f} |"
                )
    lines += [
        "",
        "What stays in the process's own (anonymous) memory per file is the train/held-out split and one "
        "epoch's order, both int32 (4 + 4 bytes a file, 8 MB at 1,000,000 files; drawn as before, the same "
        "rows); the list "
        "measurement's own baseline varies by several MB between runs (thread start-up and the allocator), "
        "hence the per-file figure above. The file list itself "
        "(each file name's UTF-8 bytes, int64 offsets, int32 folder, label and domain codes) and the PoolSet's "
        "int64 label and domain codes are written to files beside `--out` as the manifest is scanned (64K items "
        "at a time) and mapped read-only (copy-on-write for the codes torch reads); each file is unlinked as "
        "soon as it is mapped, so nothing is left behind once the scan is done, even if the process is killed "
        "later (only a scan killed midway leaves its `.ecos-items-*` folder; left in the work "
        f"folder after these runs: {rows[-1]['leftover_files']} files). Those pages are file-backed page cache: "
        "they count in RSS once touched (the file-backed peak column, which is mostly torch's and the other "
        "libraries' code), but the kernel can drop them under memory pressure and read them again from disk, "
        "unlike anonymous memory. The mapped arrays of the largest pool take "
        f"{rows[-1]['list_arrays_mb']:.0f} MB ({rows[-1]['list_arrays_mb'] * 2**20 / rows[-1]['images']:.0f} bytes "
        "a file: 36 plus the file name's length, 8 bytes here); a full epoch touches all of them, the "
        f"`--list-bytes` run (one batch) had {rows[-1].get('list_mapped_rss_mb', 0):.0f} MB of them resident. "
        "The work folder must be on a disk: on a tmpfs those pages would be shared memory, swap-backed, not "
        "reclaimable.",
    ]
    return lines


if __name__ == "__main__":
    main()
