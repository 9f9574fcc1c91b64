"""Automated client labelling in the daemon: the signed label query after sampling, the ``voting`` state.

A round with ``task = "client"`` samples the proxy set as any round, then (docs/tasks.md):

* sampling -> voting: the proxy set's features (``thumb16`` thumbnails, or the pool encoder's) are
  grouped (``label_groups`` cosine groups) into a :class:`~device_sdk.protocol.labels.LabelQuery`
  with the id ``<round>.labels`` and a deadline ``label_seconds`` away, signed with the key ring's
  current key and written to ``<round>/labels/query.labelquery`` (with ``groups.json``: which
  image is in which group) before the transition, so a restarted daemon sends the same bytes;
* voting: the query goes to every device of the round (after the key update, during a rotation),
  again to those that have not answered every ``probe_resend_seconds`` and at once when one comes
  back online; a device answers a repeated query from its ledger for free. The daemon checks every
  ``label_votes`` on arrival (``check_votes``: the query's shape, sensitivity, enough noise,
  counts in range) and keeps one answer per device in the store, under the query's id. At the
  deadline, or once every device answered, the votes are summed, each group keeps its top label
  where it leads by ``min_margin`` noise sigmas, and ``<round>/labelled.csv`` (the selection with
  those labels; the rest unlabelled) is what the round trains on (trainer ``semisup``).

Nothing waits in memory: the query, the groups and the answers are on disk and in the store.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional

import numpy as np

from cloud.errors import ImplausibleVotes
from cloud.serve.eventlog import log_event
from cloud.serve.round_types import RoundParams, SampleResult
from cloud.serve.store import DeviceState, ResponseKind, ResponseRecord, RoundRecord, RoundState
from device_sdk.errors import EcosError, InputError, MessageError
from device_sdk.fsutil import atomic_write_bytes, atomic_write_text
from device_sdk.logsafe import clean
from device_sdk.protocol import Refusal
from device_sdk.protocol.envelope import read_json_file
from device_sdk.protocol.labels import LabelQuery, LabelVotes
from device_sdk.protocol.round import Scores
from device_sdk.protocol.topics import MAX_ID_CHARS, PROBE_ID

if TYPE_CHECKING:
    from cloud.serve.daemon import Daemon

LOG = logging.getLogger("ecos.daemon")
LABEL_QUERY_SUFFIX = ".labels"
LABEL_MESSAGE_TYPES = ("label_query", "label_votes", "label_refusal")  # traffic rows of the label exchange


def label_query_id(round_id: str) -> str:
    """The id of a round's label query: ``<round>.labels`` (a refusal names it, so it must differ from the probe's)."""
    return round_id + LABEL_QUERY_SUFFIX


def round_of_label_query(query_id: str) -> Optional[str]:
    """The round a label query id belongs to, or None if it is not one."""
    if query_id.endswith(LABEL_QUERY_SUFFIX) and len(query_id) > len(LABEL_QUERY_SUFFIX):
        return query_id[: -len(LABEL_QUERY_SUFFIX)]
    return None


def check_client_round_id(round_id: str) -> None:
    """A client-labelling round's id must leave room for its label query's id (a probe id of 1-128 characters)."""
    if not PROBE_ID.fullmatch(label_query_id(round_id)):
        raise InputError(
            f"round id {round_id[:40]!r} is too long for a client-labelling round: its label query id "
            f"{LABEL_QUERY_SUFFIX!r} suffix must fit {MAX_ID_CHARS} characters"
        )


@dataclass(frozen=True)
class LabelQueryRef:
    """Where a voting round's label query and groups are, and what it asks (``result["client_labelling"]``)."""

    query_id: str
    query: str  # the signed label query as sent
    groups: str  # groups.json: the selection's paths and each one's group
    labelled: str  # where the labelled selection is written
    queries: int
    feature_space: str
    query_bytes: int

    @classmethod
    def from_json(cls, result: Mapping[str, Any]) -> "LabelQueryRef":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in result.items() if k in names})

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class ClientLabellingStages:
    """The client-labelling part of a round; mixed into ``Daemon`` through ``RoundStages``."""

    _label_queries: Dict[str, LabelQuery]

    # ---- sampling -> voting ----------------------------------------------------------------------

    def _start_voting(self: "Daemon", r: RoundRecord, p: RoundParams, picks: np.ndarray, sampled: SampleResult) -> None:
        from cloud.labelling.client import build_label_query, group_features, thumbnail_query_features
        from device_sdk.labelling import THUMB16

        work = self._round_dir(r) / "labels"
        paths = [str(self.index.paths[i]) for i in picks]
        if p.label_feature_space == "encoder":
            features, space = np.asarray(self.index.features)[picks], self.index.encoder_sha256
        else:
            features, space = thumbnail_query_features(paths), THUMB16
        centroids, assign = group_features(features, p.label_groups, seed=p.seed)
        deadline = time.time() + p.label_seconds
        labels = list(p.labels or [])
        query_id = label_query_id(r.round_id)
        query = build_label_query(centroids, space, labels, p.votes_per_sample, p.label_max_distance, query_id=query_id)
        payload = dataclasses.replace(query, deadline=deadline).to_bytes(signer=self.keyring.current)
        groups = {"query_id": query.id, "paths": paths, "group": [int(g) for g in np.asarray(assign)]}
        atomic_write_text(work / "groups.json", json.dumps(groups) + "\n")
        atomic_write_bytes(work / "query.labelquery", payload)
        ref = LabelQueryRef(
            query.id,
            str(work / "query.labelquery"),
            str(work / "groups.json"),
            str(self._round_dir(r) / "labelled.csv"),
            query.n_queries,
            space,
            len(payload),
        )
        log_event(LOG, "label_query_made", round=r.round_id, queries=query.n_queries, bytes=len(payload))
        self._transition(
            r, RoundState.VOTING, result={**sampled.to_json(), "client_labelling": ref.to_json()}, deadline=deadline
        )

    # ---- voting ------------------------------------------------------------------------------------

    def _label_query(self: "Daemon", ref: LabelQueryRef) -> LabelQuery:
        query = self._label_queries.get(ref.query_id)
        if query is None:
            with open(ref.query, "rb") as fh:
                query = self._label_queries[ref.query_id] = LabelQuery.from_bytes(fh.read(), ref.query)
        return query

    def _stage_voting(self: "Daemon", r: RoundRecord) -> None:
        ref = LabelQueryRef.from_json(r.result["client_labelling"])
        responses = self.store.responses(ref.query_id)
        answered = {x.device_id for x in responses}
        pending = [d for d in r.devices if d not in answered]
        open_ = r.deadline is not None and time.time() < r.deadline
        if ref.query_id not in self._probed:  # first time here (or after a restart): to every device not answered
            if pending and open_:  # past the deadline a device would only refuse it
                self._send_label_query(r, ref, pending)
            self._probed.add(ref.query_id)
        elif pending and open_:
            now, every = time.monotonic(), self.cfg.rounds.probe_resend_seconds
            due = [d for d in pending if now - self._probe_sent.get((ref.query_id, d), -math.inf) >= every]
            due = [d for d in due if getattr(self.store.get_device(d), "state", None) != DeviceState.OFFLINE]
            if due:
                self._send_label_query(r, ref, due, resend="timer")
        if pending and open_:
            return
        self._finish_voting(r, ref, responses)

    def _finish_voting(self: "Daemon", r: RoundRecord, ref: LabelQueryRef, responses: List[ResponseRecord]) -> None:
        from cloud.labelling.client import combine_votes, confident_labels
        from cloud.labelling.labelstudio import read_selection, write_selection

        p = RoundParams.from_json(r.params)
        query = self._label_query(ref)
        self._label_queries.pop(ref.query_id, None)  # the round leaves voting (trains or fails); late answers: disk
        votes = [LabelVotes.from_bytes(x.payload) for x in responses if x.kind == ResponseKind.LABEL_VOTES]
        refused = {x.device_id: Refusal.from_bytes(x.payload).code for x in responses if x.kind == ResponseKind.REFUSAL}
        missing = sorted(set(r.devices) - {x.device_id for x in responses})
        summary: Dict[str, Any] = {
            **ref.to_json(),
            "answered": sorted(v.device_id for v in votes),
            "refused": refused,
            "missing": missing,
        }
        implausible = {d: c for d, c in self._implausible.get(ref.query_id, {}).items() if d in missing}
        if implausible:
            summary["implausible"] = implausible
        summary.update(self._label_accounting(r, votes))
        if not votes:
            self._fail(
                r,
                f"no device sent label votes by the deadline; refused: {refused or 'none'}; "
                f"missing: {missing or 'none'}"
                + (f" (implausible votes refused: {implausible})" if implausible else ""),
                result={"client_labelling": summary},
            )
            return
        vs = combine_votes(query, votes)
        codes, _ = confident_labels(vs.votes, vs.sigma, p.min_margin)
        groups = read_json_file(ref.groups, f"groups file {ref.groups}")
        group_of = dict(zip(groups["paths"], groups["group"]))
        rows = read_selection(SampleResult.from_json(r.result).selection)
        labels = {row.path: query.labels[codes[group_of[row.path]]] for row in rows if codes[group_of[row.path]] >= 0}
        summary.update(
            sigma=vs.sigma,
            groups_labelled=int((codes >= 0).sum()),
            images_labelled=len(labels),
            images=len(rows),
            min_margin=p.min_margin,
        )
        if not labels:
            self._fail(
                r,
                f"no group of the label query was labelled with confidence (top label ahead by {p.min_margin:g} "
                f"noise sigmas, sigma {vs.sigma:.2f}): nothing to train on; ask more devices, fewer label_groups "
                "or a lower min_margin",
                result={"client_labelling": summary},
            )
            return
        write_selection(rows, labels, ref.labelled)
        log_event(
            LOG,
            "label_votes_applied",
            round=r.round_id,
            devices=len(votes),
            groups_labelled=summary["groups_labelled"],
            images_labelled=len(labels),
        )
        self._transition(r, RoundState.TRAINING, result={"selection": ref.labelled, "client_labelling": summary})

    def _label_accounting(self: "Daemon", r: RoundRecord, votes: List[LabelVotes]) -> Dict[str, Any]:
        """Epsilon per device (the votes', and composed with the probe's answer) and the round's traffic so far."""
        from device_sdk.privacy.accounting import epsilon as compose_epsilon

        scores = {
            x.device_id: Scores.from_bytes(x.payload)
            for x in self.store.responses(r.round_id)
            if x.kind == ResponseKind.SCORES
        }
        total: Dict[str, Optional[float]] = {}
        for v in votes:
            releases = [(v.sigma, v.sensitivity)]
            s = scores.get(v.device_id)
            if s is not None:
                releases.append((s.sigma, s.sensitivity))
            try:
                total[v.device_id] = compose_epsilon(
                    releases, float(v.privacy["delta"]), str(v.privacy.get("accountant") or "gaussian")
                )
            except EcosError:  # an accountant this cloud does not know: the device's own figure stands alone
                total[v.device_id] = None
        traffic: Dict[str, Dict[str, int]] = {"down": {}, "up": {}}
        for row in self.store.traffic(round_id=r.round_id):
            by_type = traffic.setdefault(row.direction, {})
            by_type[row.msg_type] = by_type.get(row.msg_type, 0) + row.bytes
        label = {d: sum(b for t, b in traffic[d].items() if t in LABEL_MESSAGE_TYPES) for d in ("down", "up")}
        return {
            "epsilon": {v.device_id: v.epsilon for v in votes},
            "epsilon_with_probe": total,
            "traffic": traffic,
            "label_bytes_down": label["down"],
            "label_bytes_up": label["up"],
        }

    def _send_label_query(
        self: "Daemon", r: RoundRecord, ref: LabelQueryRef, devices: List[str], resend: str = ""
    ) -> None:
        with open(ref.query, "rb") as fh:
            payload = fh.read()
        self._send_signed(r, payload, devices, "label_query", ref.query_id, resend)
        log_event(
            LOG,
            "label_query_sent",
            round=r.round_id,
            devices=devices,
            bytes=len(payload),
            **({"resend": resend} if resend else {}),
        )

    def _resend_label_query_on_reconnect(self: "Daemon", device_id: str, reconnect_seconds: float) -> None:
        now = time.monotonic()
        for r in self.store.list_rounds([RoundState.VOTING]):
            ref = LabelQueryRef.from_json(r.result.get("client_labelling", {}))
            if (
                device_id not in r.devices
                or ref.query_id not in self._probed
                or r.deadline is None
                or time.time() >= r.deadline
                or now - self._probe_sent.get((ref.query_id, device_id), -math.inf) < reconnect_seconds
            ):
                continue
            if all(x.device_id != device_id for x in self.store.responses(ref.query_id)):
                try:
                    self._send_label_query(r, ref, [device_id], resend="reconnect")
                except OSError as exc:  # the round's own stage fails it at the next tick; this status goes on
                    log_event(
                        LOG, "label_query_unreadable", logging.ERROR, round=r.round_id, device=device_id, error=str(exc)
                    )

    # ---- the devices' answers ------------------------------------------------------------------------

    def _voting_round(self: "Daemon", device_id: str, query_id: str, what: str, nbytes: int) -> Optional[RoundRecord]:
        """The round that asked ``device_id`` this label query, if it still waits for votes (else None, logged);
        the message's bytes are counted in the round's traffic as ``what``."""
        round_id = round_of_label_query(query_id)
        r = None if round_id is None else self.store.get_round(round_id)
        if r is None or device_id not in r.devices or "client_labelling" not in r.result:
            raise MessageError(f"{what} from {device_id} for label query {query_id[:40]!r}, which did not ask it")
        self.store.add_traffic(device_id, r.round_id, "up", what, nbytes)
        if r.state is not RoundState.VOTING:
            self.metrics.responses.inc(kind=what, outcome="late")
            log_event(LOG, "response_late", round=r.round_id, device=device_id, state=r.state.value, kind=what)
            return None
        return r

    def _on_label_votes(self: "Daemon", device_id: str, msg: LabelVotes, payload: bytes) -> None:
        from cloud.labelling.client import check_votes

        r = self._voting_round(device_id, msg.query_id, "label_votes", len(payload))
        if r is None:
            return
        query = self._label_query(LabelQueryRef.from_json(r.result["client_labelling"]))
        try:  # before anything is recorded: a forged answer must not take the place of the device's real one
            check_votes(query, msg, self._limits(r))
        except ImplausibleVotes as err:
            self.metrics.scores_refused.inc(check=f"votes_{err.check}")
            self._implausible.setdefault(msg.query_id, {})[device_id] = err.check
            raise
        self._store_label_answer(device_id, msg.query_id, ResponseKind.LABEL_VOTES.value, msg.id, payload)

    def _on_label_refusal(self: "Daemon", device_id: str, msg: Refusal, payload: bytes) -> None:
        log_event(
            LOG,
            "label_query_refused",
            query=clean(msg.probe_id),
            device=device_id,
            code=clean(msg.code),
            reason=clean(msg.reason),
        )
        if self._voting_round(device_id, msg.probe_id, "label_refusal", len(payload)) is not None:
            self._store_label_answer(device_id, msg.probe_id, ResponseKind.REFUSAL.value, msg.id, payload)

    def _store_label_answer(self: "Daemon", device_id: str, query_id: str, kind: str, message_id: str, payload: bytes):
        new = self.store.add_response(ResponseRecord(query_id, device_id, kind, message_id, payload, time.time()))
        self.metrics.responses.inc(kind=kind, outcome="new" if new else "duplicate")
        log_event(LOG, "response", query=query_id, device=device_id, kind=kind, duplicate=not new, bytes=len(payload))
