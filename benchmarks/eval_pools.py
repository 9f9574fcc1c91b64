"""ECOS on pools shaped like real ones: no domain folders, no labels, the device's domain absent.

The paper's splits on a six-domain digits benchmark (the generated one, or the real-data one of
``ecos-make-digits --source real``), each domain taking its turn as the device:

- ``domains``: the pool has domain folders and labels (``pool/<domain>/<label>/``): the default
  encoder then adds a domain head to its contrastive loss;
- ``flat``: the same images without domain folders (``pool/<label>/``): the encoder sees labels only;
- ``unlabelled``: neither labels nor domains: the encoder sees pixels only (share is reported;
  accuracy needs labels, see the labelling tasks);
- ``lodo``: leave one domain out (the paper's Digits split): the device's domain is absent from
  the pool, which holds the other domains without domain folders; one encoder per held-out domain;
- ``lodo_domains``: the same, the pool keeping its domain folders (the encoder's domain head and
  ECOS's domain rule both see them).

The encoder and the k-means clustering use seed 0 in every run: the spread over seeds covers the
device's noise, the samplers and the evaluation classifier, not the encoder's own variance.
Every encoder is trained on its pool with the project's default objective, exported to ONNX and
run through the real device code (encoder runtime, coverage counts with the far bin, calibrated
Gaussian noise, privacy ledger) at epsilon 0.58. Methods: ecos (coverage-aware, the default),
ecos-nocov (the same scores without the far bin: ablation), ecos-nodom (where the pool has
domain folders: the same scores, the pool's domains not used by the sampler: ablation), random,
kcenter, oracle (random draws from the device's own domain in the pool, where it is there) and
local-only (the device's own 300 labelled images). Reported per device domain, budget and seed:
the share of the selection from the device's domain and the accuracy on the device's test images
of a small CNN trained from scratch on the selection (benchmarks/classifier.py). Out-of-class pool images (label
``other``, the real benchmark's junk) count against the share and are dropped before training.

    python benchmarks/eval_pools.py --source generated --workdir runs/pools-gen
    python benchmarks/eval_pools.py --source real --workdir runs/pools-real
    python benchmarks/eval_pools.py --source generated --workdir runs/pools-q --quick   # smoke run

Writes benchmarks/results/eval_pools_<source>.json, docs/results/eval_pools_<source>.md and .png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.classifier import train_and_eval  # noqa: E402
from cloud.log import LOG, setup_logging  # noqa: E402
from cloud.pool.dataset import ImageSet, load_image_set  # noqa: E402
from cloud.pool.index import PoolIndex, build_index_from_items  # noqa: E402
from cloud.sampling import PoolView, get_sampler  # noqa: E402
from cloud.sampling.selection import combine_scores  # noqa: E402
from cloud.training.encoder_config import EncoderConfig  # noqa: E402
from device_sdk.device import answer_probe  # noqa: E402
from device_sdk.imagefolder import load_images, scan_image_folder  # noqa: E402
from device_sdk.privacy.ledger import PrivacyLedger  # noqa: E402
from device_sdk.runtime import load_model  # noqa: E402
from device_sdk.scoring import encode_items  # noqa: E402

REGIMES = ("flat", "lodo", "unlabelled", "domains", "lodo_domains")
DOMAIN_REGIMES = ("domains", "lodo_domains")  # the pool has domain folders: the encoder and ECOS see them
RADIUS_QUANTILE = 0.95


def ensure_data(workdir: str, source: str, quick: bool) -> str:
    root = os.path.join(workdir, "data")
    if os.path.exists(os.path.join(root, "dataset.json")):
        return root
    if source == "real":
        from cloud.tools.datagen.realdigits import generate_real

        kwargs = dict(per_domain=120, device_local=80, device_test=80, junk=120) if quick else {}
        generate_real(root, seed=0, **(kwargs or {"per_domain": 1000}))
    else:
        from cloud.tools.datagen.digits import DOMAINS, generate

        n, local, test = (300, 80, 80) if quick else (2000, 300, 300)
        generate(
            root,
            per_domain=n,
            domains=DOMAINS,
            seed=0,
            layout="benchmark",
            device_local=local,
            device_test=test,
            workers=os.cpu_count() or 1,
        )
    return root


def regime_view(data: ImageSet, regime: str) -> ImageSet:
    """What the encoder may learn from: drop domain folders (flat, lodo) and labels (unlabelled)."""
    if regime in ("flat", "lodo", "unlabelled"):
        data = dataclasses.replace(data, domains=np.full(len(data.items), -1), domain_names=[])
    if regime == "unlabelled":
        data = dataclasses.replace(data, labels=np.full(len(data.items), -1), label_names=[])
    return data


def subset(data: ImageSet, keep: np.ndarray) -> ImageSet:
    return dataclasses.replace(
        data,
        items=[data.items[i] for i in keep],
        images=data.images[keep],
        labels=data.labels[keep],
        domains=data.domains[keep],
    )


def encoder_and_index(folder: str, data: ImageSet, cfg: EncoderConfig, k: int, threads: int):
    """Train (unless present), export and index; returns (index, device-side model, train seconds)."""
    from cloud.export.formats import export_onnx
    from cloud.tools.pipeline import encoder_meta
    from cloud.training.encoder import train_encoder

    os.makedirs(folder, exist_ok=True)
    path, index_path = os.path.join(folder, "encoder.onnx"), os.path.join(folder, "pool.index.npz")
    stats_path = os.path.join(folder, "train.json")
    settings = {"encoder": dataclasses.asdict(cfg), "k": k, "pool_images": len(data.items)}
    if os.path.exists(stats_path):  # a work folder is reused only for the same settings
        with open(stats_path) as fh:
            used = json.load(fh)
        if "settings" in used and used["settings"] != json.loads(json.dumps(settings)):
            raise SystemExit(
                f"{folder} holds an encoder/index made with other settings; use another --workdir "
                f"or delete it\n  then: {used.get('settings')}\n  now:  {settings}"
            )
    if not os.path.exists(path):
        t0 = time.time()
        encoder, report = train_encoder(data, cfg)
        seconds = time.time() - t0
        export_onnx(encoder, encoder_meta(cfg, data, report), path, output_name="features")
        with open(stats_path, "w") as fh:
            json.dump({"train_seconds": seconds, "settings": settings}, fh)
    if os.path.exists(index_path):
        index = PoolIndex.load(index_path)
    else:
        index = build_index_from_items(data.items, path, k=k, seed=0, threads=threads, where=folder)
        index.save(index_path)
    with open(stats_path) as fh:
        seconds = json.load(fh)["train_seconds"]
    return index, load_model(path, threads=threads), seconds


def pool_view(index: PoolIndex, regime: str) -> PoolView:
    """What the samplers see: the pool's domains only in the regime whose pool has domain folders
    (the index keeps every image's true domain for the evaluation's shares)."""
    groups = PoolView.group_ids(index.domains) if regime in DOMAIN_REGIMES else None
    return PoolView(index.features, index.assign, index.centroids, groups=groups)


def device_scores(index: PoolIndex, model, features: np.ndarray, eps: float, seed: int, coverage: bool):
    probe = index.probe(radius_quantile=RADIUS_QUANTILE if coverage else None)
    with tempfile.TemporaryDirectory() as tmp:
        ledger = PrivacyLedger.open(os.path.join(tmp, "ledger.json"), device_id="bench", budget_epsilon=2 * max(eps, 1))
        scores, _ = answer_probe(probe, model, features, ledger, epsilon=eps, rng=np.random.default_rng(seed))
    return combine_scores(index, [scores], RADIUS_QUANTILE)


def run_domain(
    index,
    model,
    regime: str,
    domain: str,
    d_i: int,
    data_root: str,
    pool_images: np.ndarray,
    args,
    labels: List[str],
    cache: Dict,
) -> List[Dict]:
    """All methods, budgets and seeds for one device domain against one index."""
    local = scan_image_folder(os.path.join(data_root, "devices", domain, "local"))
    test = scan_image_folder(os.path.join(data_root, "devices", domain, "test"))
    features = encode_items(model, local)
    test_x = load_images([t.path for t in test], (32, 32))
    test_y = np.array([labels.index(t.label) for t in test])
    local_x = load_images([t.path for t in local], (32, 32))
    local_y = np.array([labels.index(t.label) for t in local])
    with_accuracy = regime in args.accuracy_regimes and regime != "unlabelled"
    own = np.flatnonzero(index.domains == domain)
    rows = []
    for seed in args.seeds:
        noise_seed = 1000 * seed + d_i
        scoresets = {
            "ecos": device_scores(index, model, features, args.epsilon, noise_seed, True),
            "ecos-nocov": device_scores(index, model, features, args.epsilon, noise_seed, False),
        }
        if with_accuracy and "local-only" in args.methods:
            key = ("local", domain, seed)
            if key not in cache:
                cache[key] = train_and_eval(
                    local_x, local_y, test_x, test_y, len(labels), epochs=args.epochs, seed=seed
                )
            rows.append(
                dict(
                    regime=regime,
                    domain=domain,
                    budget=0,
                    method="local-only",
                    seed=seed,
                    share=1.0,
                    accuracy=cache[key],
                    uncovered=None,
                )
            )
        for budget in args.budgets:
            view = pool_view(index, regime)
            picks = {
                m: get_sampler("ecos", **args.ecos_config).select(view, budget, s, np.random.default_rng(seed))
                for m, s in scoresets.items()
            }
            if regime in DOMAIN_REGIMES and "ecos-nodom" in args.methods:  # ablation: the pool's domains unused
                nodom = get_sampler("ecos", **{**args.ecos_config, "domain_floor": 0.0})
                picks["ecos-nodom"] = nodom.select(view, budget, scoresets["ecos"], np.random.default_rng(seed))
            for baseline in ("random", "kcenter"):  # the same view: nothing of the true domains
                picks[baseline] = get_sampler(baseline).select(view, budget, None, np.random.default_rng(seed))
            if len(own) >= budget:
                picks["oracle"] = np.random.default_rng(seed).choice(own, size=budget, replace=False)
            plan = get_sampler("ecos", **args.ecos_config).plan(view, budget, scoresets["ecos"])
            for method, p in picks.items():
                if method not in args.methods:
                    continue
                share = float(np.mean(index.domains[p] == domain))
                acc = None
                train_only = method in ("ecos-nocov",) and not args.ablation_accuracy
                if with_accuracy and not train_only:
                    usable = p[np.isin(index.labels[p], labels)]
                    y = np.array([labels.index(v) for v in index.labels[usable]])
                    acc = train_and_eval(
                        pool_images[usable], y, test_x, test_y, len(labels), epochs=args.epochs, seed=seed
                    )
                rows.append(
                    dict(
                        regime=regime,
                        domain=domain,
                        budget=budget,
                        method=method,
                        seed=seed,
                        share=share,
                        accuracy=acc,
                        uncovered=plan.uncovered if method == "ecos" else None,
                    )
                )
                LOG.info(
                    "%-10s %-12s B=%-4d seed %d %-10s share %.3f acc %s",
                    regime,
                    domain,
                    budget,
                    seed,
                    method,
                    share,
                    "-" if acc is None else f"{acc:.3f}",
                )
    return rows


def run(args) -> Dict:
    data_root = ensure_data(args.workdir, args.source, args.quick)
    pool_items = scan_image_folder(os.path.join(data_root, "pool"))
    pool = load_image_set(pool_items)
    device_domains = sorted(os.listdir(os.path.join(data_root, "devices")))
    labels = sorted({it.label for it in scan_image_folder(os.path.join(data_root, "devices", device_domains[0]))})
    cfg = EncoderConfig(**{"epochs": args.encoder_epochs, "seed": 0, **args.encoder_config})
    rows: List[Dict] = []
    cache: Dict = {}
    train_seconds: Dict[str, float] = {}
    for regime in args.regimes:
        if regime in ("lodo", "lodo_domains"):
            for d_i, domain in enumerate(device_domains):
                keep = np.flatnonzero(np.array([it.domain for it in pool_items]) != domain)
                sub = subset(pool, keep)
                index, model, secs = encoder_and_index(
                    os.path.join(args.workdir, regime, domain), regime_view(sub, regime), cfg, args.k, args.threads
                )
                train_seconds[f"{regime}/{domain}"] = secs
                rows += run_domain(index, model, regime, domain, d_i, data_root, pool.images[keep], args, labels, cache)
            continue
        index, model, secs = encoder_and_index(
            os.path.join(args.workdir, regime), regime_view(pool, regime), cfg, args.k, args.threads
        )
        train_seconds[regime] = secs
        for d_i, domain in enumerate(device_domains):
            rows += run_domain(index, model, regime, domain, d_i, data_root, pool.images, args, labels, cache)
    return {
        "rows": rows,
        "domains": device_domains,
        "encoder_train_seconds": train_seconds,
        "config": {**vars(args), "radius_quantile": RADIUS_QUANTILE, "encoder": dataclasses.asdict(cfg)},
    }


def summarise(rows: List[Dict]) -> Dict:
    """Mean over device domains per seed, then mean and spread (std over seeds) of that mean."""
    cells: Dict = {}
    for r in rows:
        cell = cells.setdefault((r["regime"], r["budget"], r["method"]), {})
        cell.setdefault(r["seed"], []).append(r)
    out = {}
    for (regime, budget, method), by_seed in cells.items():
        entry = {}
        for key in ("share", "accuracy"):
            per_seed = [np.mean([r[key] for r in rs]) for rs in by_seed.values() if all(r[key] is not None for r in rs)]
            if per_seed:
                entry[key] = float(np.mean(per_seed))
                entry[key + "_std"] = float(np.std(per_seed))
        out.setdefault(regime, {}).setdefault(str(budget), {})[method] = entry
    return out


def per_domain(rows: List[Dict]) -> Dict:
    cells: Dict = {}
    for r in rows:
        cells.setdefault((r["regime"], r["domain"], r["budget"], r["method"]), []).append(r)
    out = []
    for (regime, domain, budget, method), rs in cells.items():
        accs = [r["accuracy"] for r in rs if r["accuracy"] is not None]
        unc = [r["uncovered"] for r in rs if r["uncovered"] is not None]
        out.append(
            dict(
                regime=regime,
                domain=domain,
                budget=budget,
                method=method,
                share=float(np.mean([r["share"] for r in rs])),
                accuracy=float(np.mean(accs)) if accs else None,
                accuracy_std=float(np.std(accs)) if accs else None,
                uncovered=float(np.mean(unc)) if unc else None,
            )
        )
    return out


def _fmt(entry: Dict, key: str) -> str:
    if key not in entry:
        return "–"
    return f"{entry[key]:.3f} ± {entry[key + '_std']:.3f}"


def markdown(result: Dict) -> str:
    s, cfg = result["summary"], result["config"]
    lines = [
        f"# ECOS on real-shaped pools: {cfg['source']} benchmark",
        "",
        f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs. Command: "
        f"`python benchmarks/eval_pools.py {result['command']}`. Wall time {result['seconds'] / 60:.0f} min. "
        f"epsilon {cfg['epsilon']} per device (delta 1e-5), K={cfg['k']}, seeds {cfg['seeds']}, "
        f"radius quantile {cfg['radius_quantile']}.",
        "",
        "Mean over the device domains; ± is the standard deviation over seeds of that mean. share = fraction "
        "of the selection from the device's domain; accuracy = small CNN trained on the selection, tested on "
        "the device's held-out images. local-only trains on the device's own labelled images. The oracle "
        "exists only where the pool holds at least B images of the device's domain, so its mean can cover "
        "fewer domains (see the per-domain table). Encoder and k-means use seed 0 throughout.",
        "",
        "| pool | budget | method | share | accuracy |",
        "|---|---|---|---|---|",
    ]
    for regime, budgets in s.items():
        for b, methods in sorted(budgets.items(), key=lambda kv: int(kv[0])):
            for m, e in methods.items():
                lines.append(
                    f"| {regime} | {b if b != '0' else '–'} | {m} | {_fmt(e, 'share')} | {_fmt(e, 'accuracy')} |"
                )
    lines += [
        "",
        "Encoder training seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["encoder_train_seconds"].items()),
        "",
        "Per device domain (mean over seeds; `uncovered` = the share of the device's data ECOS judged "
        "outside the pool's coverage, which went to the diversity term):",
        "",
        "| pool | domain | budget | method | share | accuracy | uncovered |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["per_domain"]:
        acc = "–" if r["accuracy"] is None else f"{r['accuracy']:.3f} ± {r['accuracy_std']:.3f}"
        unc = "" if r["uncovered"] is None else f"{r['uncovered']:.2f}"
        lines.append(
            f"| {r['regime']} | {r['domain']} | {r['budget'] or '–'} | {r['method']} | {r['share']:.3f} | "
            f"{acc} | {unc} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    regimes = list(s)
    fig, axes = plt.subplots(2, len(regimes), figsize=(4.2 * len(regimes), 7), squeeze=False)
    for col, regime in enumerate(regimes):
        budgets = sorted((b for b in s[regime] if b != "0"), key=int)
        known = ("ecos", "ecos-nocov", "ecos-nodom", "random", "kcenter", "oracle")
        methods = [m for m in known if m in s[regime][budgets[0]]]
        for row, key in enumerate(("share", "accuracy")):
            ax = axes[row][col]
            width = 0.8 / len(budgets)
            for j, b in enumerate(budgets):
                vals = [s[regime][b][m].get(key, np.nan) for m in methods]
                errs = [s[regime][b][m].get(key + "_std", 0) for m in methods]
                ax.bar(np.arange(len(methods)) + j * width, vals, width, yerr=errs, label=f"B={b}", capsize=2)
            if key == "accuracy" and "0" in s[regime]:
                ax.axhline(s[regime]["0"]["local-only"]["accuracy"], color="k", ls="--", lw=1, label="local-only")
            ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods, rotation=30, ha="right")
            ax.set_ylim(0, 1)
            ax.set_title(f"{regime}: {key}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_report(result: Dict, out: str, docs: str, stem: str, text: str) -> None:
    """The JSON result at ``out`` and its markdown report ``<docs>/<stem>.md`` (folders made as needed)."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    os.makedirs(docs, exist_ok=True)
    with open(os.path.join(docs, stem + ".md"), "w") as fh:
        fh.write(text)


def merge(args) -> int:
    """One report from several runs' JSON files (e.g. the regimes run in parallel processes)."""
    parts = []
    for path in args.merge:
        with open(path) as fh:
            parts.append(json.load(fh))
    result = dict(parts[0])
    rows: Dict = {}  # a later file's row replaces an earlier one for the same cell (a re-run of some methods)
    for part in parts:
        for r in part["rows"]:
            rows[(r["regime"], r["domain"], r["budget"], r["method"], r["seed"])] = r
    result["rows"] = list(rows.values())
    result["encoder_train_seconds"] = {k: v for part in parts for k, v in part["encoder_train_seconds"].items()}
    result["seconds"] = max(part["seconds"] for part in parts)
    result["command"] = " + ".join(part["command"] for part in parts)
    result["config"] = dict(result["config"], regimes=[r for part in parts for r in part["config"]["regimes"]], tag="")
    result["summary"], result["per_domain"] = summarise(result["rows"]), per_domain(result["rows"])
    stem = f"eval_pools_{result['config']['source']}"
    write_report(
        result, args.out or os.path.join("benchmarks", "results", stem + ".json"), args.docs, stem, markdown(result)
    )
    plot(result, os.path.join(args.docs, stem + ".png"))
    print(markdown(result).split("Per device domain")[0])
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=("generated", "real"), default="generated")
    p.add_argument("--workdir", required=True, help="work folder (data, encoders, indexes; reused between runs)")
    p.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES))
    p.add_argument("--budgets", type=int, nargs="+", default=[500, 1000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epsilon", type=float, default=0.58)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--epochs", type=int, default=15, help="epochs of the evaluation classifier")
    p.add_argument("--encoder-epochs", type=int, default=EncoderConfig.epochs)
    p.add_argument(
        "--encoder-config",
        type=json.loads,
        default={},
        metavar="JSON",
        help="encoder settings other than the defaults, e.g. '{\"pixel_weight\": 0}' (ablations; another --workdir)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--accuracy-regimes",
        nargs="*",
        choices=REGIMES,
        default=["flat", "lodo"],
        help="regimes whose selections train the evaluation classifier (default: flat lodo; the others "
        "report shares only; unlabelled never has accuracy)",
    )
    p.add_argument("--ablation-accuracy", action="store_true", help="also train on the ecos-nocov selections")
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/eval_pools_<source>.json)")
    p.add_argument("--docs", default="docs/results")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["ecos", "ecos-nocov", "ecos-nodom", "random", "kcenter", "oracle", "local-only"],
        help="methods to run (default: all)",
    )
    p.add_argument(
        "--ecos-config",
        type=json.loads,
        default={},
        metavar="JSON",
        help="ECOS sampler settings, e.g. '{\"uncovered_far_share\": 0.5}' (default: the defaults)",
    )
    p.add_argument("--tag", default="", help="suffix of the output names (to run regimes in parallel processes)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="only merge these result files into one report")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args)
    if args.quick:
        args.budgets, args.seeds, args.epochs, args.encoder_epochs, args.k = [60], [0], 3, 1, 16
    import torch

    torch.set_num_threads(args.threads)
    setup_logging()
    t0 = time.time()
    result = run(args)
    result.update(
        summary=summarise(result["rows"]),
        per_domain=per_domain(result["rows"]),
        seconds=time.time() - t0,
        command=" ".join(sys.argv[1:] if argv is None else argv),
        machine={"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    )
    stem = f"eval_pools_{args.source}" + ("_quick" if args.quick else "") + args.tag
    write_report(
        result, args.out or os.path.join("benchmarks", "results", stem + ".json"), args.docs, stem, markdown(result)
    )
    plot(result, os.path.join(args.docs, stem + ".png"))
    print(markdown(result).split("Per device domain")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
