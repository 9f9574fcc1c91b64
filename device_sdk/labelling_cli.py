"""``ecos-device label-vote``: answer a label query with a private kNN vote over a labelled image folder."""

from __future__ import annotations

import argparse
import logging

from device_sdk.clikit import add_trust_arguments, positive_int
from device_sdk.privacy.accounting import DEFAULT_BUDGET_DELTA, DEFAULT_BUDGET_EPSILON

LOG = logging.getLogger("ecos.device")


def cmd_label_vote(args: argparse.Namespace) -> int:
    from device_sdk.errors import InputError, MismatchError, UsageError
    from device_sdk.fsutil import atomic_write_bytes
    from device_sdk.imagefolder import load_images, scan_image_folder
    from device_sdk.labelling import THUMB16, THUMB_SIZE, answer_label_query, check_query_conflict, thumbnail_features
    from device_sdk.privacy.ledger import PrivacyLedger
    from device_sdk.protocol.envelope import read_file
    from device_sdk.protocol.labels import LabelQuery
    from device_sdk.scoring import log_unreadable
    from device_sdk.trust import DeviceTrust, verify_label_query

    query = LabelQuery.from_envelope(read_file(args.query, "label_query"), args.query)
    if args.revoked_key and not args.trusted_key:
        raise UsageError("--revoked-key needs --trusted-key (the keys to trust)")
    trust = DeviceTrust.from_files(args.trusted_key, args.revoked_key or ()) if args.trusted_key else None
    signer = verify_label_query(query, trust, args.accept_unsigned)  # before an image or the ledger
    if trust is None:
        LOG.warning("label query %s not verified: no --trusted-key given (offline use only)", query.id[:12])
    elif signer is None:
        LOG.warning("label query %s is unsigned and accepted (--accept-unsigned)", query.id[:12])
    ledger = PrivacyLedger.open(
        args.ledger, device_id=args.device_id, budget_epsilon=args.budget_epsilon, budget_delta=args.budget_delta
    )
    check_query_conflict(query, ledger)  # before a single private image is read
    items = [it for it in scan_image_folder(args.folder) if it.label]
    if not items:
        raise InputError(f"{args.folder}: no labelled images (labels are the names of the images' parent folders)")
    unreadable: list = []  # (path, reason) of files that cannot be decoded: skipped, as score does
    if query.feature_space == THUMB16:
        images = load_images([it.path for it in items], THUMB_SIZE, unreadable=unreadable)
        features = thumbnail_features(images) if len(images) else None  # none readable: the error below
    else:
        if not args.encoder:
            raise UsageError(f"the query is in encoder {query.feature_space[:12]}...'s feature space: give --encoder")
        from device_sdk.runtime import load_model
        from device_sdk.scoring import encode_items

        model = load_model(args.encoder, threads=args.threads)
        if model.sha256 != query.feature_space:
            raise MismatchError(
                f"the query was made for encoder {query.feature_space[:12]}..., "
                f"{args.encoder} is {model.sha256[:12]}..."
            )
        features = encode_items(model, items, args.batch_size, unreadable=unreadable)
    if unreadable:
        log_unreadable(LOG, args.folder, unreadable)
        skipped = {path for path, _ in unreadable}
        items = [it for it in items if it.path not in skipped]
        if not items:
            raise InputError(f"{args.folder}: no readable labelled image ({len(unreadable)} unreadable)")
    labels = [it.label for it in items]
    unknown = sorted(set(labels) - set(query.labels))
    if unknown:
        LOG.warning("%d local label(s) are not in the query and do not vote: %s", len(unknown), ", ".join(unknown[:10]))
    votes, result = answer_label_query(
        query,
        query.feature_space,
        features,
        labels,
        ledger,
        epsilon=args.epsilon,
        sigma=args.sigma,
        commit=lambda payload: atomic_write_bytes(args.out, payload),
    )
    budget_eps, delta = ledger.budget
    verb = "replayed earlier answer to" if result.repeated else "answered"
    print(
        f"{verb} label query {query.id[:12]}: {votes.votes.shape[0]} x {votes.votes.shape[1]} noisy votes from "
        f"{len(items)} labelled images (sigma={votes.sigma:.3f}, L2 sensitivity {votes.sensitivity:.3f}) -> {args.out}"
    )
    print(
        f"privacy: charged epsilon {result.charged_epsilon:.4f}; spent {result.spent_epsilon:.4f} of {budget_eps:g} "
        f"at delta={delta:g} ({ledger.accountant} accountant)"
    )
    return 0


def add_command(sub, add_common) -> None:
    p = sub.add_parser(
        "label-vote",
        help="answer a label query with a private kNN vote over a labelled image folder",
        description="Each labelled local image votes, with its label, for its m nearest query groups "
        "(m set by the query); Gaussian noise calibrated to --epsilon (L2 sensitivity "
        "sqrt(m)) is added to every count and the release is charged to the ledger, like "
        "a probe's scores (docs/tasks.md).",
    )
    p.add_argument(
        "folder",
        help="local labelled image folder (labels = parent folder names; unreadable files are skipped with a warning)",
    )
    p.add_argument("--query", required=True, help="label query from 'ecos-cloud label-query'")
    p.add_argument("--out", required=True, help="where to write the votes message")
    p.add_argument("--ledger", required=True, help="this device's privacy ledger (JSON; created on first use)")
    noise = p.add_mutually_exclusive_group(required=True)
    noise.add_argument("--epsilon", type=float, help="privacy cost of this release (epsilon at the ledger's delta)")
    noise.add_argument("--sigma", type=float, help="noise standard deviation instead of --epsilon")
    p.add_argument("--encoder", help="the encoder, when the query is in an encoder's feature space")
    p.add_argument("--device-id", help="device id recorded in a new ledger (default: random)")
    p.add_argument(
        "--budget-epsilon", type=float, help=f"total epsilon budget of a new ledger (default {DEFAULT_BUDGET_EPSILON})"
    )
    p.add_argument("--budget-delta", type=float, help=f"delta of a new ledger (default {DEFAULT_BUDGET_DELTA})")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=positive_int, default=256)
    add_trust_arguments(p, "query", "an image is read or anything is charged")
    add_common(p)
    p.set_defaults(func=cmd_label_vote)
