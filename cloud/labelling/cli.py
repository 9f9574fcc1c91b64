"""``ecos-cloud`` commands of the two labelling tasks (docs/tasks.md).

Selective manual labelling:

    ecos-cloud export-labels --selection sel.csv --labels 0,1,2,3,4,5,6,7,8,9 --out-dir job/
    (label job/tasks.json in Label Studio, or fill job/tasks.csv; export)
    ecos-cloud import-labels --state job/labels.state.json export.json [more.json ...] --out labelled.csv
    ecos-cloud simulate-labels --state job/labels.state.json --truth sel.csv --out export.json   (demo, benchmarks)
    ecos-cloud train-semisup --selection labelled.csv --index pool.index.npz --out-dir student/

Automated client labelling:

    ecos-cloud label-query --selection sel.csv --labels 0,1,...,9 --out round.labelquery [--signing-key KEY.pem]
    ecos-device label-vote LABELLED_FOLDER --query round.labelquery --out dev.votes --ledger ledger.json --epsilon 2 \
        [--trusted-key PUB.pem]
    ecos-cloud apply-votes --query round.labelquery --votes dev.votes --out labelled.csv
    ecos-cloud train-semisup --selection labelled.csv --index pool.index.npz --out-dir student/
"""

from __future__ import annotations

import argparse
import json
import os

from cloud.log import LOG
from device_sdk.fsutil import atomic_write_bytes, atomic_write_text


def cmd_export_labels(args: argparse.Namespace) -> int:
    from cloud.labelling.labelstudio import LOCAL_FILES_PREFIX, export_tasks, parse_label_names, read_selection

    labels = parse_label_names(args.labels)
    prefill = None
    if args.prefill:
        prefill = {r.path: (r.label, 1.0) for r in read_selection(args.prefill) if r.label}
    paths = export_tasks(
        args.selection,
        labels,
        args.out_dir,
        args.document_root,
        args.url_prefix if args.url_prefix is not None else LOCAL_FILES_PREFIX,
        prefill,
    )
    n = len(read_selection(args.selection))
    print(
        f"{n} labelling tasks ({len(labels)} labels) -> {paths['tasks.json']} (Label Studio), "
        f"{paths['tasks.csv']} (CSV); "
        f"interface {paths['label_config.xml']}; resume state {paths['labels.state.json']}"
    )
    return 0


def cmd_import_labels(args: argparse.Namespace) -> int:
    from cloud.labelling.labelstudio import import_labels

    s = import_labels(args.state, args.files, args.out, partial=args.partial)
    print(
        f"read {s['read']} labels ({s['new']} new, {s['changed']} changed): {s['labelled']} of {s['total']} images "
        f"labelled, {s['missing']} missing" + (f" -> {s['out']}" if s["out"] else "")
    )
    return 0


def cmd_simulate_labels(args: argparse.Namespace) -> int:
    from cloud.labelling.labelstudio import LabelState
    from cloud.labelling.simulate import read_truth, simulate_labels, write_labelstudio_export

    state = LabelState.load(args.state)
    paths = [r.path for r in state.rows()]
    answers = simulate_labels(paths, read_truth(args.truth), state.labels, args.error_rate, args.fraction, args.seed)
    write_labelstudio_export(answers, state, args.out)
    print(
        f"simulated labeller: {len(answers)} of {len(paths)} images answered (error rate {args.error_rate:g}) "
        f"-> {args.out}"
    )
    return 0


def cmd_label_query(args: argparse.Namespace) -> int:
    import numpy as np

    from cloud.labelling.client import build_label_query, group_features, picks_of_selection, thumbnail_query_features
    from cloud.labelling.labelstudio import parse_label_names, read_selection
    from device_sdk.labelling import THUMB16

    labels = parse_label_names(args.labels)
    rows = read_selection(args.selection)
    paths = [r.path for r in rows]
    if args.index:
        from cloud.pool.index import PoolIndex

        index = PoolIndex.load(args.index)
        features, space = index.features[picks_of_selection(index, paths)], index.encoder_sha256
    else:
        features, space = thumbnail_query_features(paths), THUMB16
    centroids, assign = group_features(features, args.groups, seed=args.seed)
    query = build_label_query(centroids, space, labels, args.votes_per_sample, args.max_distance)
    if args.signing_key:
        from cloud.security.keys import SigningKey

        key = SigningKey.load(args.signing_key)
        payload = query.to_bytes(signer=key)
        LOG.info("label query signed with key %s", key.key_id)
    else:
        LOG.warning("label query not signed (no --signing-key): a device with a trust store refuses it")
        payload = query.to_bytes()
    atomic_write_bytes(args.out, payload)
    groups_path = args.out + ".groups.json"
    atomic_write_text(
        groups_path,
        json.dumps(
            {
                "query_id": query.id,
                "selection": os.path.abspath(args.selection),
                "paths": paths,
                "group": [int(g) for g in np.asarray(assign)],
            }
        )
        + "\n",
    )
    print(
        f"label query {query.id[:12]}: {len(paths)} images in {query.n_queries} groups, feature space "
        f"{space[:16]}, {len(labels)} labels -> {args.out} ({len(payload)} bytes); groups -> {groups_path}"
    )
    return 0


def cmd_apply_votes(args: argparse.Namespace) -> int:
    import numpy as np

    from cloud.labelling.client import combine_votes, confident_labels
    from cloud.labelling.labelstudio import read_selection, write_selection
    from device_sdk.errors import MismatchError
    from device_sdk.protocol.envelope import read_file, read_json_file
    from device_sdk.protocol.labels import LABEL_QUERY, LABEL_VOTES, LabelQuery, LabelVotes

    query = LabelQuery.from_envelope(read_file(args.query, LABEL_QUERY), args.query)
    answers = [LabelVotes.from_envelope(read_file(path, LABEL_VOTES), path) for path in args.votes]
    groups_path = args.groups or args.query + ".groups.json"
    groups = read_json_file(groups_path, f"groups file {groups_path}", MismatchError)
    if not isinstance(groups, dict) or groups.get("query_id") != query.id:
        raise MismatchError(f"{groups_path} is not the groups file of query {query.id[:12]}")
    vs = combine_votes(query, answers)
    codes, margin = confident_labels(vs.votes, vs.sigma, args.min_margin)
    assign = np.asarray(groups["group"], dtype=np.int64)
    if assign.size and (assign.min() < 0 or assign.max() >= query.n_queries):
        raise MismatchError(f"{groups_path}: group numbers outside the query's {query.n_queries} groups")
    per_image = dict(zip(groups["paths"], codes[assign]))
    rows = read_selection(args.selection or groups["selection"])
    missing = [r.path for r in rows if r.path not in per_image]
    if missing:
        raise MismatchError(f"{len(missing)} selected images are not in the label query; first: {missing[0]}")
    labels = {r.path: query.labels[per_image[r.path]] for r in rows if per_image[r.path] >= 0}
    write_selection(rows, labels, args.out)
    eps = ", ".join(f"{d} {e:.3f}" for d, e in vs.epsilons.items())
    print(
        f"{int((codes >= 0).sum())} of {query.n_queries} groups confidently labelled (margin >= {args.min_margin:g} "
        f"sigma, sigma {vs.sigma:.2f}): {len(labels)} of {len(rows)} images labelled -> {args.out}"
    )
    print(f"devices: {len(vs.devices)}; epsilon of their votes: {eps}")
    return 0


def cmd_train_semisup(args: argparse.Namespace) -> int:
    from cloud.cli.common import _threads
    from cloud.cli.models import _eval_set, _export_and_print, _export_config
    from cloud.labelling.labelstudio import parse_label_names
    from cloud.training.classifier import save_checkpoint
    from cloud.training.semisup import SemiSupConfig, load_semisup_data, train_fixmatch

    _threads(args)
    cfg = SemiSupConfig(
        arch=args.arch,
        width=args.width,
        epochs=args.epochs,
        min_steps=args.min_steps,
        batch_size=args.batch_size,
        mu=args.mu,
        threshold=args.threshold,
        lambda_u=args.lambda_u,
        lr=args.lr,
        max_unlabelled=args.unlabelled,
        seed=args.seed,
    )
    export_cfg = _export_config(args)
    labels = parse_label_names(args.labels) if args.labels else None
    data, unlabelled = load_semisup_data(args.selection, args.index, labels, cfg)
    known = data.labels >= 0
    evaluation = _eval_set(args, data.label_names, data) if args.eval else None
    trained = train_fixmatch(
        data.images,
        data.labels,
        data.label_names,
        unlabelled,
        cfg,
        evaluation.images if evaluation else None,
        evaluation.labels if evaluation else None,
    )
    os.makedirs(args.out_dir, exist_ok=True)
    checkpoint = os.path.join(args.out_dir, f"{args.name}.safetensors")
    save_checkpoint(trained, checkpoint)
    print(
        f"{cfg.arch} trained (FixMatch) on {int(known.sum())} labelled + {trained.report['unlabelled']} unlabelled "
        f"images in {trained.report['steps']} steps -> {checkpoint}"
    )
    if evaluation is None:
        import dataclasses

        evaluation = dataclasses.replace(data, images=data.images[known], labels=data.labels[known])
    return _export_and_print(trained, data.images, evaluation, args.out_dir, export_cfg)


def cmd_round_labels(args: argparse.Namespace) -> int:
    from cloud.labelling.labelstudio import import_labels
    from cloud.serve.config import load_config
    from cloud.serve.store import RoundState, open_store
    from device_sdk.errors import UsageError

    cfg = load_config(args.config)
    r = open_store(cfg.store).get_round(args.round_id)
    if r is None:
        raise UsageError(f"no round {args.round_id!r} in {cfg.store.database}")
    labelling = r.result.get("labelling")
    if r.state is not RoundState.LABELLING or not labelling:
        raise UsageError(f"round {r.round_id} is {r.state.value}, not waiting for labels")
    s = import_labels(labelling["state"], args.files, labelling["labelled"], partial=args.partial)
    print(
        f"round {r.round_id}: {s['labelled']} of {s['total']} images labelled, {s['missing']} missing -> "
        f"{s['out']}; the daemon trains on it within a second"
    )
    return 0


def add_commands(sub, add_common) -> None:
    from cloud.cli.models import _add_export_options

    p = sub.add_parser(
        "export-labels",
        help="selective manual labelling: write a selection as Label Studio tasks and CSV",
        description="Write OUT_DIR/tasks.json (Label Studio tasks: data.image, data.ecos_path), "
        "tasks.csv (image,ecos_path,ecos_rank,label), label_config.xml (the interface) and "
        "labels.state.json (resume state). The selection's own label column is not exported.",
    )
    p.add_argument("--selection", required=True, help="selection CSV from 'ecos-cloud sample'")
    p.add_argument("--labels", required=True, help="comma-separated label names the labellers choose from")
    p.add_argument("--out-dir", required=True)
    p.add_argument(
        "--document-root",
        help="make image URLs relative to this folder (Label Studio's "
        "LOCAL_FILES_DOCUMENT_ROOT); default: the paths as they are",
    )
    p.add_argument(
        "--url-prefix",
        help="prefix of the image URLs (default /data/local-files/?d=, Label Studio's local-files route)",
    )
    p.add_argument(
        "--prefill",
        metavar="CSV",
        help="a selection CSV whose labels become Label Studio predictions "
        "(pre-labels to confirm or correct), e.g. from apply-votes",
    )
    add_common(p)
    p.set_defaults(func=cmd_export_labels)

    p = sub.add_parser(
        "round-labels",
        help="import labels into a daemon round waiting in 'labelling'",
        description="The labels of FILE(s) (Label Studio JSON/JSON-MIN export or CSV) for the tasks "
        "the daemon wrote to <state_dir>/rounds/ROUND/labelling/tasks.json; as "
        "import-labels. Once every image is labelled (or with --partial) the labelled "
        "selection is written and the daemon moves the round on to training.",
    )
    p.add_argument("round_id", metavar="ROUND")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--config", help="cloud.toml (see docs/operations.md; ECOS_CLOUD_* variables override it)")
    p.add_argument("--partial", action="store_true", help="train with the images still unlabelled as unlabelled data")
    add_common(p)
    p.set_defaults(func=cmd_round_labels)

    p = sub.add_parser(
        "import-labels",
        help="read labels back from a Label Studio JSON/JSON-MIN export or a CSV",
        description="Merge the labels of FILE(s) into the state and write the labelled selection CSV. "
        "Unknown labels and tasks not in the selection are refused (nothing kept); images "
        "still unlabelled are saved as progress and refused unless --partial: import "
        "the rest later to resume.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="Label Studio export (.json) or CSV (.csv)")
    p.add_argument("--state", required=True, help="labels.state.json from export-labels")
    p.add_argument("--out", help="labelled selection CSV (written when every image is labelled, or with --partial)")
    p.add_argument(
        "--partial",
        action="store_true",
        help="write --out even with images unlabelled (they stay unlabelled for train-semisup)",
    )
    add_common(p)
    p.set_defaults(func=cmd_import_labels)

    p = sub.add_parser(
        "simulate-labels",
        help="a simulated labeller (demo, benchmarks): reveal hidden labels",
        description="Answer the tasks of a labelling state with the labels of --truth (a CSV "
        "path,label, e.g. the selection CSV of a labelled pool), a share of them wrong "
        "(--error-rate), only part of them (--fraction); writes a Label Studio JSON "
        "export (or its CSV export if OUT ends in .csv).",
    )
    p.add_argument("--state", required=True)
    p.add_argument("--truth", required=True, help="CSV with path and label columns")
    p.add_argument("--out", required=True)
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--fraction", type=float, default=1.0, help="share of the tasks answered (default 1)")
    p.add_argument("--seed", type=int, default=0)
    add_common(p)
    p.set_defaults(func=cmd_simulate_labels)

    p = sub.add_parser(
        "label-query",
        help="automated client labelling: the proxy set's features for the devices' vote",
        description="Group the selection (cosine k-means of its features) and write the label query "
        "(the groups' centroids, the label names, the vote's parameters) and "
        "OUT.groups.json (which image is in which group).",
    )
    p.add_argument("--selection", required=True)
    p.add_argument("--labels", required=True, help="comma-separated label names the devices vote over")
    p.add_argument("--out", required=True)
    p.add_argument("--groups", type=int, default=50, help="groups the device votes over (0: one per image; default 50)")
    p.add_argument(
        "--votes-per-sample",
        type=int,
        default=2,
        help="m: each device sample votes for its m nearest groups; L2 sensitivity sqrt(m) (default 2)",
    )
    p.add_argument(
        "--max-distance", type=float, help="a device sample votes only for groups within this cosine distance"
    )
    p.add_argument(
        "--index",
        help="use this index's encoder features (feature space = the encoder); default: "
        "16x16 grey thumbnails (thumb16, label-bearing; docs/tasks.md)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--signing-key",
        metavar="PRIVATE_KEY",
        help="sign the query with this Ed25519 private key (e.g. <state_dir>/keys/cloud_ed25519.pem); "
        "devices with a trust store (label-vote --trusted-key, the agent) refuse unsigned queries",
    )
    add_common(p)
    p.set_defaults(func=cmd_label_query)

    p = sub.add_parser(
        "apply-votes",
        help="keep the labels the devices' noisy votes are confident about",
        description="Sum the devices' votes, label each group whose top label leads the runner-up by "
        "--min-margin noise sigmas, give every image its group's label (empty = unlabelled) "
        "and write the selection CSV for train-semisup.",
    )
    p.add_argument("--query", required=True)
    p.add_argument("--votes", nargs="+", required=True, help="label votes messages from devices")
    p.add_argument("--groups", help="groups file (default QUERY.groups.json)")
    p.add_argument("--selection", help="selection CSV (default: the one the query was made from)")
    p.add_argument("--out", required=True)
    p.add_argument("--min-margin", type=float, default=2.0, help="in noise sigmas (default 2)")
    add_common(p)
    p.set_defaults(func=cmd_apply_votes)

    p = sub.add_parser(
        "train-semisup",
        help="FixMatch on a labelled selection plus unlabelled pool images, then export",
        description="Train the student from scratch with FixMatch on the labelled rows of --selection "
        "(empty labels are unlabelled) plus --unlabelled images of the --index pool; save "
        "DIR/NAME.safetensors; export fp32/int8 ONNX/TFLite behind the gate (evaluated on "
        "--eval, else on the labelled proxy images).",
    )
    p.add_argument("--selection", required=True)
    p.add_argument("--index", help="pool index: its other images are the unlabelled set")
    p.add_argument("--labels", help="comma-separated label names (default: those in the selection)")
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=30, help="passes over the labelled images (default 30)")
    p.add_argument("--min-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mu", type=int, default=3, help="unlabelled images per labelled one in a step (default 3)")
    p.add_argument("--threshold", type=float, default=0.95, help="pseudo-label confidence (default 0.95)")
    p.add_argument("--lambda-u", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--unlabelled", type=int, default=6000, help="pool images drawn as unlabelled (default 6000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    _add_export_options(p)
    add_common(p)
    p.set_defaults(func=cmd_train_semisup)
    LOG.debug("labelling commands registered")
