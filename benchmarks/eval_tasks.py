"""The paper's three tasks on our data: model compression, selective manual labelling, client labelling.

For each device domain of the six-domain benchmark (generated, or the real-data one of
``ecos-make-digits --source real``), each budget and seed, one proxy set per method (ecos,
random, kcenter; the same set for the three tasks), then:

- ``compression``: a teacher trained once on the whole labelled pool, distilled into a small
  student on the proxy set (soft targets T=4, alpha=0.7, plus the proxy set's labels);
- ``manual``: the pool is unlabelled; the simulated labeller (cloud/labelling/simulate.py,
  ``--label-error`` wrong answers) reveals the proxy set's labels, out-of-class images skipped;
  FixMatch (cloud/training/semisup.py ``fixmatch_loop``) on the labelled proxy set plus
  ``--unlabelled`` pool images; ``manual-sup`` is the same without the unlabelled term (ablation);
- ``client``: the pool is unlabelled; the cloud groups the proxy set (``--groups`` cosine
  clusters of its thumbnails) and the device answers a label query over the groups' centroids
  with the real device code (device_sdk/labelling.py: reverse-kNN vote, ``--votes-per-sample``
  votes per sample, Gaussian noise at ``--vote-epsilon``, charged to the same ledger as its ECOS
  scores); each image takes its group's label where that leads by ``--min-margin`` sigmas, and
  FixMatch trains with the rest unlabelled;
- ``local-only``: the student trained on the device's own labelled images.

Each task's total epsilon is what the device's ledger shows at the end (ECOS scoring at
``--epsilon``, plus the vote for ``client``; random and k-center ask the device nothing for the
selection, so their ``client`` epsilon is the vote's alone).

The classifiers are MLPs on ``thumb16`` features (16x16 grey thumbnails, centred, unit norm;
device_sdk/labelling.py), the space the label vote uses too: a teacher MLP (two hidden layers of
256) and a student MLP (one hidden layer of 64); weak view = shift of up to 1 pixel, strong view =
shift of up to 2, a 6x6 cutout, inverted contrast for half the images. This is what a two-core
shared machine allows for hundreds of trainings; the image pipeline (``ecos-cloud distill``,
``train-semisup``) trains CNNs on 32x32 colour images and is not what this table measures. The
ECOS encoder's features are not used to classify: trained without labels to tell domains apart,
they hold little of the digit (1-NN label accuracy within a device's own domain 0.09-0.36,
thumbnails 0.19-0.97; docs/tasks.md).

The encoder (contrastive, trained on the pool without labels or domain folders) and the k-means
use seed 0; seeds vary the device noise, the samplers, the labeller and the classifiers.

    nice -n 10 python benchmarks/eval_tasks.py --source generated --workdir runs/tasks-gen
    python benchmarks/eval_tasks.py --report     # docs/results/tasks.md and .png from the JSON files

Writes benchmarks/results/eval_tasks_<source>.json (``--out`` for another name, e.g. one budget per
run), then docs/results/tasks.md and tasks.png from every eval_tasks_*.json present, the runs of one
source merged (a later file's row replaces an earlier one for the same cell).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.eval_pools import encoder_and_index, ensure_data, regime_view  # noqa: E402
from cloud.labelling.client import build_label_query, confident_labels, group_features  # noqa: E402
from cloud.labelling.simulate import simulate_labels  # noqa: E402
from cloud.log import LOG, setup_logging  # noqa: E402
from cloud.pool.dataset import load_image_set  # noqa: E402
from cloud.pool.index import PoolIndex  # noqa: E402
from cloud.sampling.selection import combine_scores, select  # noqa: E402
from cloud.training.encoder_config import EncoderConfig  # noqa: E402
from cloud.training.semisup import SemiSupConfig, fixmatch_loop  # noqa: E402
from device_sdk.device import answer_probe  # noqa: E402
from device_sdk.imagefolder import (
    load_images,  # noqa: E402
    scan_image_folder,  # noqa: E402
)
from device_sdk.labelling import THUMB16, THUMB_SIZE, answer_label_query, thumbnail_features  # noqa: E402
from device_sdk.privacy.ledger import PrivacyLedger  # noqa: E402
from device_sdk.runtime import load_model  # noqa: E402
from device_sdk.scoring import encode_items  # noqa: E402

TASKS = ("compression", "manual", "manual-sup", "client")
METHODS = ("ecos", "random", "kcenter")
RADIUS_QUANTILE = 0.95


# ---- classifiers on features --------------------------------------------------------------------


def mlp(d: int, classes: int, hidden: List[int]):
    from torch import nn

    layers, width = [], d
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, classes))


def _renorm(x):
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)


def _shift(x, gen, pad: int):
    from torch.nn import functional as F

    side = THUMB_SIZE[0]
    img = F.pad(x.view(-1, 1, side, side), (pad,) * 4, mode="replicate")
    import torch

    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return img[:, :, dy : dy + side, dx : dx + side]


def weak_features(x, gen):
    """Weak view of thumbnails: a shift of up to 1 pixel, a little noise."""
    import torch

    return _renorm(_shift(x, gen, 1).reshape(len(x), -1) + 0.005 * torch.randn(x.shape, generator=gen))


def strong_features(x, gen):
    """Strong view: a shift of up to 2 pixels, a 6x6 cutout, inverted contrast for half the images, noise."""
    import torch

    side = THUMB_SIZE[0]
    img = _shift(x, gen, 2)
    n = len(x)
    c = torch.randint(0, side, (n, 2), generator=gen)
    ys, xs = torch.arange(side).view(1, side, 1), torch.arange(side).view(1, 1, side)
    box = ((ys - c[:, 0].view(n, 1, 1)).abs() <= 3) & ((xs - c[:, 1].view(n, 1, 1)).abs() <= 3)
    img = img.masked_fill(box.unsqueeze(1), 0.0).reshape(n, -1)
    sign = torch.where(torch.rand(n, 1, generator=gen) < 0.5, -1.0, 1.0)
    return _renorm(img * sign + 0.02 * torch.randn(x.shape, generator=gen))


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        return float(np.mean(model(torch.from_numpy(x)).argmax(1).numpy() == y))


def train_student(
    x: np.ndarray, y: np.ndarray, unlabelled: Optional[np.ndarray], classes: int, seed: int, args, semisup: bool
) -> object:
    """Student MLP: FixMatch with ``unlabelled`` (semisup), else supervised on ``y >= 0`` (same loop)."""
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    keep = y >= 0
    model = mlp(x.shape[1], classes, [64])
    cfg = SemiSupConfig(
        epochs=args.epochs,
        min_steps=args.min_steps,
        mu=3 if semisup else 0,
        threshold=args.threshold,
        lr=3e-3,
        seed=seed,
    )
    xu = torch.from_numpy(unlabelled) if semisup and unlabelled is not None and len(unlabelled) else None
    fixmatch_loop(
        model,
        torch.from_numpy(x[keep]),
        torch.from_numpy(y[keep]),
        xu,
        weak_features,
        strong_features,
        cfg,
        gen,
        what="student",
    )
    return model


def train_teacher(x: np.ndarray, y: np.ndarray, classes: int, args):
    import torch

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = mlp(x.shape[1], classes, [256, 256])
    cfg = SemiSupConfig(epochs=args.teacher_epochs, min_steps=0, batch_size=256, mu=0, lr=3e-3, seed=0)
    fixmatch_loop(
        model, torch.from_numpy(x), torch.from_numpy(y), None, weak_features, strong_features, cfg, gen, what="teacher"
    )
    return model


def distill_student(x: np.ndarray, y: np.ndarray, teacher, classes: int, seed: int, args):
    import torch

    from cloud.training.classifier import distillation_loss
    from cloud.training.encoder import warmup_cosine

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = mlp(x.shape[1], classes, [64])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        soft = teacher(xt)
    steps = max(args.min_steps, args.epochs * math.ceil(len(x) / 64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(64, len(x)),), generator=gen)
        loss = distillation_loss(model(weak_features(xt[idx], gen)), soft[idx], yt[idx], 4.0, 0.7)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model


# ---- the run -------------------------------------------------------------------------------------


def codes(values, labels: List[str]) -> np.ndarray:
    index = {v: i for i, v in enumerate(labels)}
    return np.array([index.get(str(v), -1) for v in values], dtype=np.int64)


def run(args) -> Dict:
    import torch

    data_root = ensure_data(args.workdir, args.source, False)
    pool_items = scan_image_folder(os.path.join(data_root, "pool"))
    domains = sorted(os.listdir(os.path.join(data_root, "devices")))
    if args.domains:
        domains = [d for d in domains if d in args.domains]
    labels = sorted({it.label for it in scan_image_folder(os.path.join(data_root, "devices", domains[0]))})
    cfg = EncoderConfig(seed=0)
    index_dir = os.path.join(args.workdir, "unlabelled")
    if os.path.exists(os.path.join(index_dir, "pool.index.npz")) and os.path.exists(
        os.path.join(index_dir, "encoder.onnx")
    ):
        # made earlier (here or by eval_pools): reused as it is, whatever EncoderConfig has gained since
        index = PoolIndex.load(os.path.join(index_dir, "pool.index.npz"))
        model = load_model(os.path.join(index_dir, "encoder.onnx"), threads=args.threads)
    else:
        pool = regime_view(load_image_set(pool_items), "unlabelled")
        index, model, _ = encoder_and_index(index_dir, pool, cfg, args.k, args.threads)
    thumbs = dict(
        zip([it.path for it in pool_items], thumbnail_features(load_image_set(pool_items, THUMB_SIZE).images))
    )
    feats = np.stack([thumbs[str(p)] for p in index.paths]).astype(np.float32)  # the classifiers' and votes' space
    pool_y = codes(index.labels, labels)  # the pool's hidden labels (-1: out of class)
    LOG.info("teacher MLP on %d labelled pool features", int((pool_y >= 0).sum()))
    teacher = train_teacher(feats[pool_y >= 0], pool_y[pool_y >= 0], len(labels), args)
    rows: List[Dict] = []
    t_start = time.time()
    for d_i, domain in enumerate(domains):
        local = scan_image_folder(os.path.join(data_root, "devices", domain, "local"))
        test = scan_image_folder(os.path.join(data_root, "devices", domain, "test"))
        local_enc = encode_items(model, local)  # the encoder's features: ECOS scoring
        local_x = thumbnail_features(load_images([it.path for it in local], THUMB_SIZE))
        test_x = thumbnail_features(load_images([it.path for it in test], THUMB_SIZE))
        local_lab = [it.label for it in local]
        local_y, test_y = codes(local_lab, labels), codes([it.label for it in test], labels)
        for seed in args.seeds:
            acc = accuracy(train_student(local_x, local_y, None, len(labels), seed, args, False), test_x, test_y)
            rows.append(
                dict(
                    domain=domain,
                    seed=seed,
                    budget=0,
                    method="local-only",
                    task="local-only",
                    accuracy=acc,
                    epsilon=0.0,
                    share=1.0,
                )
            )
            for budget in args.budgets:
                for method in METHODS:
                    rows += run_cell(
                        args,
                        index,
                        model,
                        feats,
                        pool_y,
                        teacher,
                        labels,
                        domain,
                        d_i,
                        seed,
                        budget,
                        method,
                        local_enc,
                        local_x,
                        local_lab,
                        test_x,
                        test_y,
                    )
        LOG.info("domain %s done (%d/%d, %.0f s)", domain, d_i + 1, len(domains), time.time() - t_start)
    torch.set_num_threads(args.threads)
    return {"rows": rows, "domains": domains, "labels": labels}


def run_cell(
    args,
    index,
    model,
    feats,
    pool_y,
    teacher,
    labels,
    domain,
    d_i,
    seed,
    budget,
    method,
    local_enc,
    local_x,
    local_lab,
    test_x,
    test_y,
) -> List[Dict]:
    noise_seed = 1000 * seed + d_i
    rng = np.random.default_rng(noise_seed)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        ledger = PrivacyLedger.open(
            os.path.join(tmp, "ledger.json"), device_id=f"{domain}-{seed}", budget_epsilon=args.budget_epsilon
        )
        if method == "ecos":
            probe = index.probe(radius_quantile=RADIUS_QUANTILE)
            scores, _ = answer_probe(probe, model, local_enc, ledger, epsilon=args.epsilon, rng=rng)
            picks = select(
                index, "ecos", budget, combine_scores(index, [scores], RADIUS_QUANTILE), seed=seed, use_domains=False
            )
        else:
            picks = select(index, method, budget, None, seed=seed)
        eps_select = ledger.spent()[0]
        share = float(np.mean(index.domains[picks] == domain))
        x_sel = feats[picks]
        rest = np.setdiff1d(np.arange(len(feats)), picks)
        unl = feats[np.random.default_rng(seed).choice(rest, size=min(args.unlabelled, len(rest)), replace=False)]
        common = dict(domain=domain, seed=seed, budget=budget, method=method, share=share)

        # compression: labelled pool, teacher -> student on the proxy set
        y_true = pool_y[picks]
        keep = y_true >= 0
        student = distill_student(x_sel[keep], y_true[keep], teacher, len(labels), seed, args)
        out.append(dict(common, task="compression", accuracy=accuracy(student, test_x, test_y), epsilon=eps_select))

        # selective manual labelling: simulated labeller, FixMatch (and supervised only, the ablation)
        paths = [str(p) for p in index.paths[picks]]
        answers = simulate_labels(
            paths,
            {p: str(v) for p, v in zip(paths, index.labels[picks])},
            labels,
            error_rate=args.label_error,
            seed=seed,
        )
        y_man = codes([answers.get(p, "") for p in paths], labels)
        for task, semi in (("manual", True), ("manual-sup", False)):
            st = train_student(x_sel, y_man, np.concatenate([x_sel[y_man < 0], unl]), len(labels), seed, args, semi)
            out.append(
                dict(
                    common,
                    task=task,
                    accuracy=accuracy(st, test_x, test_y),
                    epsilon=eps_select,
                    labelled=int((y_man >= 0).sum()),
                )
            )

        # automated client labelling: the device's private vote over the proxy set, same ledger
        centroids, assign = group_features(x_sel, args.groups, seed=seed)
        query = build_label_query(
            centroids, THUMB16, labels, args.votes_per_sample, query_id=f"q-{domain}-{seed}-{budget}"
        )
        votes, result = answer_label_query(
            query, THUMB16, local_x, local_lab, ledger, epsilon=args.vote_epsilon, rng=rng
        )
        y_groups, _ = confident_labels(votes.votes, votes.sigma, args.min_margin)
        y_cli = y_groups[assign]
        kept = y_cli >= 0
        label_acc = float(np.mean(y_cli[kept] == y_true[kept])) if kept.any() else float("nan")
        if kept.sum() >= 2:
            st = train_student(x_sel, y_cli, np.concatenate([x_sel[~kept], unl]), len(labels), seed, args, True)
            acc = accuracy(st, test_x, test_y)
        else:
            acc = 1.0 / len(labels)  # nothing confidently labelled: a constant guess
        out.append(
            dict(
                common,
                task="client",
                accuracy=acc,
                epsilon=ledger.spent()[0],
                labelled=int(kept.sum()),
                label_accuracy=label_acc,
                vote_epsilon=result.charged_epsilon,
                sigma=votes.sigma,
                query_bytes=len(query.to_bytes()),
                votes_bytes=len(result.payload),
            )
        )
    for r in out:
        LOG.info(
            "%-12s B=%-4d seed %d %-8s %-11s acc %.3f eps %.2f%s",
            domain,
            budget,
            seed,
            method,
            r["task"],
            r["accuracy"],
            r["epsilon"],
            f" kept {r['labelled']} label acc {r['label_accuracy']:.3f}" if r["task"] == "client" else "",
        )
    return out


# ---- report --------------------------------------------------------------------------------------


def summarise(rows: List[Dict]) -> Dict:
    """Per (task, budget, method): mean over domains per seed, then mean and std over seeds."""
    cells: Dict = {}
    for r in rows:
        cells.setdefault((r["task"], r["budget"], r["method"]), {}).setdefault(r["seed"], []).append(r)
    out: Dict = {}
    for (task, budget, method), by_seed in cells.items():
        entry = {}
        for key in ("accuracy", "epsilon", "share", "labelled", "label_accuracy"):
            per_seed = [np.nanmean([r[key] for r in rs]) for rs in by_seed.values() if all(key in r for r in rs)]
            if per_seed:
                entry[key] = float(np.mean(per_seed))
                entry[key + "_std"] = float(np.std(per_seed))
        entry["seeds"] = len(by_seed)
        entry["domains"] = len(next(iter(by_seed.values())))
        out.setdefault(task, {}).setdefault(str(budget), {})[method] = entry
    return out


def per_domain(rows: List[Dict]) -> List[Dict]:
    cells: Dict = {}
    for r in rows:
        cells.setdefault((r["task"], r["budget"], r["domain"], r["method"]), []).append(r["accuracy"])
    return [
        dict(task=t, budget=b, domain=d, method=m, accuracy=float(np.mean(v)))
        for (t, b, d, m), v in sorted(cells.items())
    ]


def markdown(results: List[Dict]) -> str:
    lines = [
        "# The paper's three tasks on our data",
        "",
        "Generated by `benchmarks/eval_tasks.py` (see its docstring for every setting). Accuracy on each device "
        "domain's held-out images, mean over the six device domains; ± is the standard deviation over seeds of "
        "that mean. epsilon = what the device's privacy ledger shows at the end of the task (delta 1e-5, "
        "gaussian accountant): ECOS scoring, plus the label vote for client labelling. Classifiers are MLPs "
        "on 16x16 grey thumbnails (not CNNs on 32x32 colour images; see the script's docstring). Tasks: "
        "compression = teacher on the labelled pool distilled on the proxy set; manual = simulated labeller + "
        "FixMatch with unlabelled pool images; manual-sup = the same labels without the unlabelled term "
        "(FixMatch ablation); client = the device's private vote + FixMatch. local only = the student trained "
        "on the device's own 300 labelled images (nothing leaves the device).",
        "",
    ]
    for res in results:
        c = res["config"]
        s = res["summary"]
        lines += [
            f"## {c['source']} benchmark",
            "",
            f"Command: `python benchmarks/eval_tasks.py {res['command']}`; {res['machine']['platform']}, "
            f"{res['machine']['cpus']} CPUs (shared), wall time {res['seconds'] / 60:.0f} min in all. Budgets "
            f"{c['budgets']}, seeds {c['seeds']}, scoring epsilon {c['epsilon']}, vote epsilon "
            f"{c['vote_epsilon']} over {c['groups']} groups with {c['votes_per_sample']} votes per device sample, "
            "min margin "
            f"{c['min_margin']} sigma, labeller error {c['label_error']}, {c['unlabelled']} unlabelled pool "
            "images for FixMatch.",
            "",
            "| task | B | ECOS | random | k-center | local only | ECOS − random | ε (ECOS / random, k-center) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        local = s.get("local-only", {}).get("0", {}).get("local-only", {})
        for task in TASKS:
            for b in sorted(s.get(task, {}), key=int):
                m = s[task][b]

                def cell(name, key="accuracy", m=m):
                    e = m.get(name, {})
                    return f"{e[key]:.3f} ± {e[key + '_std']:.3f}" if key in e else "–"

                diff = (
                    m["ecos"]["accuracy"] - m["random"]["accuracy"] if "ecos" in m and "random" in m else float("nan")
                )
                eps = f"{m['ecos']['epsilon']:.2f} / {m['random']['epsilon']:.2f}"
                loc = f"{local['accuracy']:.3f} ± {local['accuracy_std']:.3f}" if local else "–"
                lines.append(
                    f"| {task} | {b} | {cell('ecos')} | {cell('random')} | {cell('kcenter')} | {loc} | "
                    f"{diff:+.3f} | {eps} |"
                )
        if "client" in s:
            lines += [
                "",
                "Client labelling, per method: images kept as confidently labelled (of B) and the accuracy "
                "of those labels against the pool's hidden ones; share of the selection from the device's "
                "domain:",
                "",
                "| B | method | kept | label accuracy | share |",
                "|---|---|---|---|---|",
            ]
            for b in sorted(s["client"], key=int):
                for method, e in s["client"][b].items():
                    lines.append(
                        f"| {b} | {method} | {e.get('labelled', float('nan')):.0f} | "
                        f"{e.get('label_accuracy', float('nan')):.3f} | {e['share']:.3f} |"
                    )
        client_rows = [r for r in res["rows"] if r["task"] == "client" and r["method"] == "ecos"]
        if client_rows:
            r0 = client_rows[0]
            lines += [
                "",
                f"Traffic of one client-labelling round ({c['groups']} groups): label query "
                f"{r0['query_bytes']:,} bytes (float16 thumbnail centroids), votes {r0['votes_bytes']:,} bytes "
                f"(float32 counts); vote noise sigma {r0['sigma']:.2f}. The vote alone is an epsilon "
                f"{c['vote_epsilon']} release; after ECOS scoring (epsilon {c['epsilon']}) it raises the device's "
                f"composed epsilon by {r0['vote_epsilon']:.2f} to {r0['epsilon']:.2f} (the ledger composes the two "
                "Gaussian releases; it does not add their epsilons).",
            ]
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), len(TASKS), figsize=(4 * len(TASKS), 3.4 * len(results)), squeeze=False)
    for row, res in enumerate(results):
        s = res["summary"]
        local = s.get("local-only", {}).get("0", {}).get("local-only", {}).get("accuracy")
        for col, task in enumerate(TASKS):
            ax = axes[row][col]
            budgets = sorted(s.get(task, {}), key=int)
            for j, method in enumerate(METHODS):
                vals = [s[task][b].get(method, {}).get("accuracy", np.nan) for b in budgets]
                errs = [s[task][b].get(method, {}).get("accuracy_std", 0) for b in budgets]
                ax.bar(np.arange(len(budgets)) + (j - 1) * 0.27, vals, 0.27, yerr=errs, capsize=2, label=method)
            if local is not None:
                ax.axhline(local, color="k", ls="--", lw=1, label="local only")
            ax.set_xticks(np.arange(len(budgets)), [f"B={b}" for b in budgets])
            ax.set_ylim(0, 1)
            ax.set_title(f"{res['config']['source']}: {task}")
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(docs: str) -> None:
    """docs/results/tasks.md and .png from every eval_tasks_*.json, runs of one source merged into one section."""
    by_source: Dict[str, Dict] = {}
    for path in sorted(glob.glob(os.path.join("benchmarks", "results", "eval_tasks_*.json"))):
        with open(path) as fh:
            part = json.load(fh)
        src = part["config"]["source"]
        if src not in by_source:
            by_source[src] = dict(part, runs=[part])
            continue
        merged = by_source[src]
        merged["runs"].append(part)
        rows = {(r["domain"], r["seed"], r["budget"], r["method"], r["task"]): r for r in merged["rows"]}
        rows.update({(r["domain"], r["seed"], r["budget"], r["method"], r["task"]): r for r in part["rows"]})
        merged["rows"] = list(rows.values())
    if not by_source:
        raise SystemExit("no benchmarks/results/eval_tasks_*.json yet")
    results = []
    for merged in by_source.values():
        runs = merged.pop("runs")
        merged["summary"] = summarise(merged["rows"])
        merged["command"] = " + ".join(r["command"] for r in runs)
        merged["seconds"] = sum(r["seconds"] for r in runs)
        merged["config"] = dict(merged["config"], budgets=sorted({b for r in runs for b in r["config"]["budgets"]}))
        results.append(merged)
    os.makedirs(docs, exist_ok=True)
    with open(os.path.join(docs, "tasks.md"), "w") as fh:
        fh.write(markdown(results))
    plot(results, os.path.join(docs, "tasks.png"))
    print(markdown(results))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=("generated", "real"), default="generated")
    p.add_argument("--workdir", help="work folder (data, encoder, index; reused between runs and with eval_pools)")
    p.add_argument("--budgets", type=int, nargs="+", default=[500, 1000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--domains", nargs="*", help="device domains (default: all)")
    p.add_argument("--epsilon", type=float, default=0.58, help="epsilon of the ECOS scores")
    p.add_argument("--vote-epsilon", type=float, default=2.0, help="epsilon of the client-labelling vote")
    p.add_argument("--votes-per-sample", type=int, default=2, help="m: queries each device sample votes for")
    p.add_argument(
        "--groups", type=int, default=50, help="the proxy set's groups the device votes over (0: one per image)"
    )
    p.add_argument("--min-margin", type=float, default=2.0, help="keep a voted label leading by this many sigmas")
    p.add_argument("--budget-epsilon", type=float, default=3.0, help="the device ledger's total budget")
    p.add_argument("--label-error", type=float, default=0.0, help="simulated labeller's error rate")
    p.add_argument("--unlabelled", type=int, default=4000, help="unlabelled pool images for FixMatch")
    p.add_argument("--threshold", type=float, default=0.95, help="FixMatch confidence threshold")
    p.add_argument("--epochs", type=int, default=30, help="student passes over its labelled set")
    p.add_argument("--min-steps", type=int, default=300, help="student optimisation steps at least")
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="JSON result (default benchmarks/results/eval_tasks_<source>.json)")
    p.add_argument("--docs", default="docs/results")
    p.add_argument("--report", action="store_true", help="only write docs/results/tasks.md and .png from the JSONs")
    args = p.parse_args(argv)
    if args.report:
        report(args.docs)
        return 0
    if not args.workdir:
        p.error("--workdir is required (except with --report)")
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
        config=vars(args),
        machine={"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    )
    out = args.out or os.path.join("benchmarks", "results", f"eval_tasks_{args.source}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    report(args.docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
