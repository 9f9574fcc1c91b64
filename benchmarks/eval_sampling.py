"""The paper's question on our data: does ECOS pick pool images from the device's domain,
and does a model trained on its pick do better on the device's data?

Each domain takes its turn as the device: the device holds ``devices/<domain>/local`` (scored,
never uploaded) and is evaluated on ``devices/<domain>/test``; the pool holds the rest of that
domain plus every other domain. For ecos (at several epsilons, through the real device code:
encoder runtime, coverage counts, calibrated noise, privacy ledger), random, kcenter and an
oracle (random draws from the device's own domain in the pool), at each budget we report the
share of the selection from the device's domain and the accuracy, on the device's test images,
of a small CNN trained from scratch on the selection.

    python benchmarks/eval_sampling.py --workdir runs/eval            # full (about 15-25 min)
    python benchmarks/eval_sampling.py --workdir runs/eval-q --quick  # smoke run

Writes ``--out`` JSON (default benchmarks/results/eval_sampling.json), a markdown table and a
plot under docs/results/, and the selection CSVs under ``<workdir>/selections``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.classifier import train_and_eval  # noqa: E402
from cloud.log import LOG, setup_logging  # noqa: E402
from cloud.pool.index import PoolIndex  # noqa: E402
from cloud.sampling import ScoreSet  # noqa: E402
from cloud.sampling.selection import combine_scores, select, write_selection_csv  # noqa: E402
from cloud.tools.pipeline import PipelineConfig, ensure_dataset, ensure_encoder, ensure_index  # noqa: E402
from device_sdk.device import answer_probe  # noqa: E402
from device_sdk.imagefolder import load_images, scan_image_folder  # noqa: E402
from device_sdk.privacy.ledger import PrivacyLedger  # noqa: E402
from device_sdk.runtime import load_model  # noqa: E402
from device_sdk.scoring import coverage_counts, encode_items  # noqa: E402

NO_NOISE = math.inf


def eps_tag(eps: float) -> str:
    return "inf" if eps == NO_NOISE else f"{eps:g}"


def device_scores(index: PoolIndex, model, features: np.ndarray, eps: float, seed: int) -> ScoreSet:
    """Scores as a device would send them (noise + ledger), or exact counts for the no-noise row."""
    probe = index.probe()
    if eps == NO_NOISE:
        return ScoreSet(scores=coverage_counts(features, probe.centroids).astype(np.float64), sigma=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        ledger = PrivacyLedger.open(
            os.path.join(tmp, "ledger.json"), device_id="bench", budget_epsilon=max(eps, 1.0) * 2
        )
        scores, _ = answer_probe(probe, model, features, ledger, epsilon=eps, rng=np.random.default_rng(seed))
    return combine_scores(index, [scores])


def selections_for(
    index: PoolIndex, domain: str, scoresets: Dict[float, ScoreSet], budget: int, seed: int
) -> Dict[str, np.ndarray]:
    out = {f"ecos@{eps_tag(e)}": select(index, "ecos", budget, s, seed=seed) for e, s in scoresets.items()}
    out["random"] = select(index, "random", budget, None, seed=seed)
    out["kcenter"] = select(index, "kcenter", budget, None, seed=seed)
    own = np.flatnonzero(index.domains == domain)
    out["oracle"] = np.random.default_rng(seed).choice(own, size=min(budget, len(own)), replace=False)
    return out


def csv_name(method: str, budget: int) -> str:
    if method.startswith("ecos@"):
        return f"ecos-b{budget}-eps{method.split('@')[1]}.csv"
    if method == "oracle":
        return f"oracle-b{budget}.csv"
    return f"{method}-b{budget}-eps0.csv"


def run(args: argparse.Namespace) -> Dict:
    cfg = PipelineConfig(
        per_domain=args.per_domain,
        device_local=args.device_local,
        device_test=args.device_test,
        k=args.k,
        epochs=args.encoder_epochs,
        width=args.encoder_width,
        seed=args.seed,
    )
    os.makedirs(args.workdir, exist_ok=True)
    data_root = ensure_dataset(args.workdir, cfg)
    pool_root = os.path.join(data_root, "pool")
    encoder_path = ensure_encoder(args.workdir, pool_root, cfg)
    index = ensure_index(args.workdir, pool_root, encoder_path, cfg)
    model = load_model(encoder_path, threads=1)
    pool_images = load_images(list(index.paths), (32, 32))
    labels = sorted(set(index.labels.tolist()))
    domains = sorted(set(index.domains.tolist()))
    rows: List[Dict] = []
    for d_i, domain in enumerate(domains):
        local = scan_image_folder(os.path.join(data_root, "devices", domain, "local"))
        test = scan_image_folder(os.path.join(data_root, "devices", domain, "test"))
        features = encode_items(model, local)
        test_images = load_images([t.path for t in test], (32, 32))
        test_labels = np.array([labels.index(t.label) for t in test])
        scoresets = {e: device_scores(index, model, features, e, args.seed + d_i) for e in args.epsilons}
        for budget in args.budgets:
            for method, picks in selections_for(index, domain, scoresets, budget, args.seed).items():
                write_selection_csv(
                    index, picks, os.path.join(args.workdir, "selections", domain, csv_name(method, budget))
                )
                share = float(np.mean(index.domains[picks] == domain))
                y = np.array([labels.index(v) for v in index.labels[picks]])
                acc = train_and_eval(
                    pool_images[picks], y, test_images, test_labels, len(labels), epochs=args.epochs, seed=args.seed
                )
                rows.append({"domain": domain, "budget": budget, "method": method, "share": share, "accuracy": acc})
                LOG.info("%-11s B=%-5d %-10s share %.3f  acc %.3f", domain, budget, method, share, acc)
    return {"rows": rows, "domains": domains, "config": {**vars(args), "epsilons": [eps_tag(e) for e in args.epsilons]}}


def summarise(rows: List[Dict]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Mean share and accuracy over domains, per budget and method."""
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for r in rows:
        cell = out.setdefault(str(r["budget"]), {}).setdefault(r["method"], {"share": [], "accuracy": []})
        cell["share"].append(r["share"])
        cell["accuracy"].append(r["accuracy"])
    return {b: {m: {k: float(np.mean(v)) for k, v in c.items()} for m, c in ms.items()} for b, ms in out.items()}


def markdown(result: Dict) -> str:
    summary, rows = result["summary"], result["rows"]
    lines = [
        "# ECOS sampling on the generated digits benchmark",
        "",
        f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs. "
        f"Command: `python benchmarks/eval_sampling.py {result['command']}`. Wall time {result['seconds']:.0f} s.",
        "",
        "Mean over the device domains (share = fraction of the selection from the device's domain; "
        "accuracy = small CNN trained on the selection, tested on the device's held-out images).",
        "",
        "| budget | method | share from device domain | accuracy |",
        "|---|---|---|---|",
    ]
    for b, methods in summary.items():
        for m, v in methods.items():
            lines.append(f"| {b} | {m} | {v['share']:.3f} | {v['accuracy']:.3f} |")
    lines += ["", "Per domain:", "", "| domain | budget | method | share | accuracy |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['domain']} | {r['budget']} | {r['method']} | {r['share']:.3f} | {r['accuracy']:.3f} |" for r in rows
    ]
    return "\n".join(lines) + "\n"


def plot(result: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("share", "accuracy")):
        budgets = list(summary)
        methods = list(summary[budgets[0]])
        width = 0.8 / len(budgets)
        for j, b in enumerate(budgets):
            ax.bar(np.arange(len(methods)) + j * width, [summary[b][m][key] for m in methods], width, label=f"B={b}")
        ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods, rotation=30, ha="right")
        ax.set_title(
            {
                "share": "share of selection from the device's domain",
                "accuracy": "accuracy on the device's test images",
            }[key]
        )
        ax.set_ylim(0, 1)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--workdir", required=True, help="work folder (data, encoder, index, selections; reused between runs)"
    )
    p.add_argument("--per-domain", type=int, default=2000)
    p.add_argument("--device-local", type=int, default=300)
    p.add_argument("--device-test", type=int, default=300)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--budgets", type=int, nargs="+", default=[500, 1000])
    p.add_argument("--epsilons", type=float, nargs="+", default=[0.1, 0.58, 2.0, NO_NOISE], help="'inf' = no noise")
    p.add_argument("--epochs", type=int, default=15, help="epochs of the evaluation classifier")
    p.add_argument("--encoder-epochs", type=int, default=5)
    p.add_argument("--encoder-width", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--out", default="benchmarks/results/eval_sampling.json")
    p.add_argument("--docs", default="docs/results", help="where the markdown table and plot go")
    args = p.parse_args(argv)
    if args.quick:
        args.per_domain, args.device_local, args.device_test, args.budgets, args.epochs = 300, 80, 80, [100], 5
        args.encoder_epochs, args.k = 2, 32
    setup_logging()
    t0 = time.time()
    result = run(args)
    result.update(
        summary=summarise(result["rows"]),
        seconds=time.time() - t0,
        command=" ".join(sys.argv[1:]),
        machine={"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    os.makedirs(args.docs, exist_ok=True)
    stem = "eval_sampling_quick" if args.quick else "eval_sampling"
    with open(os.path.join(args.docs, f"{stem}.md"), "w") as fh:
        fh.write(markdown(result))
    plot(result, os.path.join(args.docs, f"{stem}.png"))
    print(markdown(result).split("Per domain:")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
