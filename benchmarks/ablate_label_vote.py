"""Ablations behind the client-labelling design (docs/tasks.md): the vote's feature space and its groups.

1. Feature space: 1-NN label accuracy from each device domain's labelled images to its test images,
   in the ECOS encoder's features and in ``thumb16`` thumbnails (device_sdk/labelling.py).
2. Groups: on one ECOS and one random selection per device domain (B=500, seed 0, the device's
   scores through the real device code at epsilon 0.58), the device's vote at ``--vote-epsilon``
   with one query per image or over ``--groups`` cosine clusters, for several ``m``; reported: how
   many images get a label that leads by ``--min-margin`` sigmas and how many of those are right.

Needs the work folder of ``benchmarks/eval_tasks.py`` (data, encoder, index).

    nice -n 10 python benchmarks/ablate_label_vote.py --workdir runs/tasks-gen

Writes benchmarks/results/ablate_label_vote_<source>.json and docs/results/label_vote_<source>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cloud.labelling.client import confident_labels, group_features  # noqa: E402
from cloud.pool.index import PoolIndex  # noqa: E402
from cloud.sampling.selection import combine_scores, select  # noqa: E402
from device_sdk.device import answer_probe  # noqa: E402
from device_sdk.imagefolder import load_images, scan_image_folder  # noqa: E402
from device_sdk.labelling import THUMB_SIZE, thumbnail_features, vote_histograms, vote_sensitivity  # noqa: E402
from device_sdk.privacy.accounting import calibrate_sigma, gaussian_noise  # noqa: E402
from device_sdk.privacy.ledger import PrivacyLedger  # noqa: E402
from device_sdk.runtime import load_model  # noqa: E402
from device_sdk.scoring import encode_items  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--source", default="generated")
    p.add_argument("--budget", type=int, default=500)
    p.add_argument("--vote-epsilon", type=float, default=2.0)
    p.add_argument("--groups", type=int, default=50)
    p.add_argument("--votes-per-sample", type=int, nargs="+", default=[1, 2, 5, 20])
    p.add_argument("--min-margin", type=float, default=2.0)
    args = p.parse_args(argv)
    t0 = time.time()
    root = os.path.join(args.workdir, "data")
    index = PoolIndex.load(os.path.join(args.workdir, "unlabelled", "pool.index.npz"))
    model = load_model(os.path.join(args.workdir, "unlabelled", "encoder.onnx"))
    domains = sorted(os.listdir(os.path.join(root, "devices")))
    labels = sorted({it.label for it in scan_image_folder(os.path.join(root, "devices", domains[0]))})
    code = {v: i for i, v in enumerate(labels)}
    nn_rows, vote_rows = [], []
    for d_i, domain in enumerate(domains):
        local = scan_image_folder(os.path.join(root, "devices", domain, "local"))
        test = scan_image_folder(os.path.join(root, "devices", domain, "test"))
        yl = np.array([code[it.label] for it in local])
        yt = np.array([code[it.label] for it in test])
        enc_l, enc_t = encode_items(model, local), encode_items(model, test)
        th_l = thumbnail_features(load_images([it.path for it in local], THUMB_SIZE))
        th_t = thumbnail_features(load_images([it.path for it in test], THUMB_SIZE))
        nn_rows.append(
            {
                "domain": domain,
                "encoder": float(np.mean(yl[(enc_t @ enc_l.T).argmax(1)] == yt)),
                "thumb16": float(np.mean(yl[(th_t @ th_l.T).argmax(1)] == yt)),
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            ledger = PrivacyLedger.open(os.path.join(tmp, "l.json"), device_id=domain, budget_epsilon=10)
            scores, _ = answer_probe(
                index.probe(radius_quantile=0.95), model, enc_l, ledger, epsilon=0.58, rng=np.random.default_rng(d_i)
            )
        picks = {
            "ecos": select(
                index, "ecos", args.budget, combine_scores(index, [scores], 0.95), seed=0, use_domains=False
            ),
            "random": select(index, "random", args.budget, None, seed=0),
        }
        for method, sel in picks.items():
            q = thumbnail_features(load_images([str(x) for x in index.paths[sel]], THUMB_SIZE))
            truth = np.array([code.get(str(v), -1) for v in index.labels[sel]])
            for grouped in (False, True):
                cents, assign = group_features(q, args.groups if grouped else 0, seed=0)
                for m in args.votes_per_sample:
                    hist = vote_histograms(cents, th_l, yl, len(labels), m)
                    sigma = calibrate_sigma(args.vote_epsilon, 1e-5, vote_sensitivity(m))
                    noisy = hist + gaussian_noise(hist.size, sigma, np.random.default_rng(d_i)).reshape(hist.shape)
                    codes, _ = confident_labels(noisy, sigma, args.min_margin)
                    per = codes[assign]
                    kept = per >= 0
                    vote_rows.append(
                        {
                            "domain": domain,
                            "method": method,
                            "groups": args.groups if grouped else 0,
                            "m": m,
                            "kept": int(kept.sum()),
                            "right": int(np.sum(per[kept] == truth[kept])),
                            "clean_accuracy": float(np.mean(hist.argmax(1)[assign] == truth)),
                        }
                    )
        print(f"{domain} done ({time.time() - t0:.0f} s)", flush=True)
    result = {
        "feature_space_1nn": nn_rows,
        "votes": vote_rows,
        "config": vars(args),
        "seconds": time.time() - t0,
        "command": " ".join(sys.argv[1:] if argv is None else argv),
    }
    os.makedirs("benchmarks/results", exist_ok=True)
    with open(f"benchmarks/results/ablate_label_vote_{args.source}.json", "w") as fh:
        json.dump(result, fh, indent=1)
    md = markdown(result)
    with open(f"docs/results/label_vote_{args.source}.md", "w") as fh:
        fh.write(md)
    print(md)
    return 0


def markdown(result: Dict) -> str:
    c = result["config"]
    lines = [
        f"# Client labelling: the vote's feature space and groups ({c['source']} benchmark)",
        "",
        f"`python benchmarks/ablate_label_vote.py {result['command']}` ({result['seconds']:.0f} s). One ECOS "
        f"and one random selection of B={c['budget']} per device domain (seed 0), vote epsilon "
        f"{c['vote_epsilon']}, min margin {c['min_margin']} sigma.",
        "",
        "1-NN label accuracy, device's labelled images -> its test images:",
        "",
        "| domain | ECOS encoder features | thumb16 |",
        "|---|---|---|",
    ]
    for r in result["feature_space_1nn"]:
        lines.append(f"| {r['domain']} | {r['encoder']:.3f} | {r['thumb16']:.3f} |")
    lines += [
        "",
        "Images given a confident label (sum over the domains) and the share of them right; `clean` = "
        "accuracy of the noise-free vote's top label over all B images (mean over domains):",
        "",
        "| selection | queries | m | kept | right | clean |",
        "|---|---|---|---|---|---|",
    ]
    cells: Dict = {}
    for r in result["votes"]:
        cells.setdefault((r["method"], r["groups"], r["m"]), []).append(r)
    for (method, groups, m), rs in sorted(cells.items()):
        kept, right = sum(r["kept"] for r in rs), sum(r["right"] for r in rs)
        share = right / kept if kept else float("nan")
        lines.append(
            f"| {method} | {'one per image' if groups == 0 else f'{groups} groups'} | {m} | {kept} | "
            f"{share:.2f} | {np.mean([r['clean_accuracy'] for r in rs]):.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
