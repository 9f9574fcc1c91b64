"""The stages of a round, each run by the daemon's loop on a round in that state.

Every stage can run again after a crash without effect beyond its first run:

* probing/collecting: the probe (id = round id) is re-sent to devices that have not answered;
  a device answers a repeated probe from its ledger (same bytes, no new privacy cost), and the
  store keeps one response per (round, device);
* sampling: deterministic (seeded) from the stored responses; the CSV is written atomically;
* training: a job in a worker thread; its result is stored; a job found "running" after a
  restart was interrupted and starts again;
* signing: one artifact per round (the store refuses a second);
* delivering: the device's acknowledged chunk is stored; a restarted daemon re-sends the
  manifest and the device answers with where to resume.

Signing and delivering are in cloud/serve/rounds_delivery.py; the label query and the ``voting``
state of a client-labelling round in cloud/serve/rounds_labels.py.

A stage reads the round's parameters and the earlier stages' results as the typed records of
cloud/serve/round_types.py and ends with one compare-and-set transition that stores its own.
``RoundStages`` is a part of ``Daemon`` (cloud/serve/daemon.py), which owns the state it uses.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

from cloud.errors import BudgetError, ImplausibleScores, StoreUnavailable
from cloud.pool.index import PoolIndex
from cloud.sampling import get_sampler
from cloud.sampling.selection import (
    Plausibility,
    check_plausible,
    combine_scores,
    composition,
    select,
    write_selection_csv,
)
from cloud.serve.config import CloudConfig
from cloud.serve.eventlog import log_event
from cloud.serve.round_types import (
    CollectResult,
    RoundParams,
    SampleResult,
    TrainOutcome,
)
from cloud.serve.rounds_delivery import DeliveryStages
from cloud.serve.rounds_labels import ClientLabellingStages, check_client_round_id
from cloud.serve.store import (
    DeviceState,
    JobState,
    NewRound,
    RoundRecord,
    RoundState,
    Store,
)
from device_sdk.errors import UsageError
from device_sdk.protocol import Refusal, check_device_id, inbox
from device_sdk.protocol.round import Probe, Scores, new_id

if TYPE_CHECKING:
    from cloud.serve.daemon import Daemon

LOG = logging.getLogger("ecos.daemon")
MAX_TRAIN_ATTEMPTS = 3
RECONNECT_RESEND_SECONDS = 1.0  # a device's "online" twice within this: one re-sent probe
TASKS = ("compression", "manual", "client")  # client: automated client labelling (cloud/serve/rounds_labels.py)


def round_params(cfg: CloudConfig, **overrides: Any) -> RoundParams:
    """A round's settings, frozen at creation so a restart with another config finishes it unchanged.

    ``index`` is left empty (``create_round`` sets it); an override that names no setting is a UsageError."""
    values = {**dataclasses.asdict(cfg.rounds), **{k: v for k, v in overrides.items() if v is not None}}
    known = {f.name for f in dataclasses.fields(RoundParams)} - {"index", "ask_devices"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"unknown round setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return RoundParams(**values, index="", ask_devices=get_sampler(values["method"]).needs_scores)


def create_round(
    store: Store,
    cfg: CloudConfig,
    index: PoolIndex,
    devices: Sequence[str],
    fleet: bool = False,
    round_id: Optional[str] = None,
    **overrides: Any,
) -> RoundRecord:
    """Validate and persist a new round; the daemon (this process or another) picks it up."""
    devices = list(dict.fromkeys(check_device_id(d) for d in devices))
    if not devices or (not fleet and len(devices) != 1):
        raise UsageError("a device round targets exactly one device; use a fleet round for several")
    params = round_params(cfg, **overrides)
    params = dataclasses.replace(
        params,
        min_responses=min(params.min_responses, len(devices)),  # a fleet default must not doom a small round
        index=index.probe_id,  # the pool index's identity: its centroids are what the devices score
    )
    if params.task not in TASKS:
        raise UsageError(f"unknown round task {params.task!r}; choose {', '.join(TASKS)}")
    what = {"manual": "a manual-labelling round", "client": "a client-labelling round"}.get(params.task)
    if what and (not params.labels or len(set(params.labels)) < 2 or len(set(params.labels)) != len(params.labels)):
        raise UsageError(f"{what} needs at least two label names, all different (labels=[...])")
    if what and cfg.trainer.name != "semisup":
        raise UsageError(
            f'{what} needs [trainer] name = "semisup": the {cfg.trainer.name!r} trainer would '
            "ignore the labels (docs/tasks.md)"
        )
    round_id = round_id or new_id()
    if params.task == "client":
        check_client_round_id(round_id)
    if not 1 <= params.budget <= len(index.paths):
        raise BudgetError(f"budget {params.budget} does not fit the pool of {len(index.paths)} images")
    spec = NewRound(round_id, "fleet" if fleet else "device", devices, params.to_json())
    return store.create_round(spec)


def limits(params: RoundParams) -> Plausibility:
    """What an honest answer to a round with ``params`` looks like."""
    return Plausibility.for_round(params.max_epsilon, params.delta, params.max_samples)


class RoundStages(DeliveryStages, ClientLabellingStages):
    """The stage of each working state, and what the stages share; mixed into ``Daemon``."""

    # what the daemon provides (see Daemon.__init__)
    cfg: CloudConfig
    store: Store
    state_dir: Path
    _jobs: Dict[str, threading.Thread]
    _probed: set
    _probe_sent: Dict[Any, float]

    def _stage(self, state: RoundState) -> Callable[[RoundRecord], None]:
        """The stage that advances a round in ``state`` (a KeyError for a final state)."""
        return {
            RoundState.PROBING: self._stage_probing,
            RoundState.COLLECTING: self._stage_collecting,
            RoundState.SAMPLING: self._stage_sampling,
            RoundState.LABELLING: self._stage_labelling,
            RoundState.VOTING: self._stage_voting,
            RoundState.TRAINING: self._stage_training,
            RoundState.SIGNING: self._stage_signing,
            RoundState.DELIVERING: self._stage_delivering,
        }[state]

    @staticmethod
    def _limits(r: RoundRecord) -> Plausibility:
        """What an honest answer to ``r`` looks like (rounds created before these settings get the defaults)."""
        return limits(RoundParams.from_json(r.params))

    def _transition(
        self: "Daemon",
        r: RoundRecord,
        target: RoundState,
        *,
        result: Optional[Dict[str, Any]] = None,
        deadline: Optional[float] = None,
        error: str = "",
    ) -> None:
        seconds = max(0.0, time.time() - r.updated)
        timings = {**r.result.get("timings", {}), r.state.value: round(seconds, 3)}
        if self.store.transition(
            r.round_id, r.state, target, result={**(result or {}), "timings": timings}, deadline=deadline, error=error
        ):
            self.metrics.transitions.inc(state=target.value)
            self.metrics.stage_seconds.inc(seconds, stage=r.state.value)
            level = logging.WARNING if target is RoundState.FAILED else logging.INFO
            log_event(
                LOG,
                "round_state",
                level,
                round=r.round_id,
                state=target.value,
                previous=r.state.value,
                seconds=round(seconds, 3),
                **({"error": error} if error else {}),
            )

    def _fail(self: "Daemon", r: RoundRecord, error: str, result: Optional[Dict[str, Any]] = None) -> None:
        self.metrics.errors.inc(reason=f"round_{r.state.value}")
        try:
            self._transition(r, RoundState.FAILED, result=result, error=error)
        except StoreUnavailable as err:  # cannot even be marked failed now: the stage runs (and fails) again later
            self._store_unavailable(err, f"round_{r.state.value}")

    def _round_dir(self, r: RoundRecord) -> Path:
        return self.state_dir / "rounds" / r.round_id

    # ---- probing and collecting ------------------------------------------------------------------

    def _stage_probing(self: "Daemon", r: RoundRecord) -> None:
        params = RoundParams.from_json(r.params)
        self._transition(r, RoundState.COLLECTING, deadline=time.time() + params.collect_seconds)

    def _stage_collecting(self: "Daemon", r: RoundRecord) -> None:
        params = RoundParams.from_json(r.params)
        if not params.ask_devices:  # random / kcenter baselines: the devices are not asked (epsilon 0)
            self._transition(r, RoundState.SAMPLING, result=CollectResult([], {}, []).to_json())
            return
        responses = self.store.responses(r.round_id)
        answered = {x.device_id for x in responses}
        pending = [d for d in r.devices if d not in answered]
        if r.round_id not in self._probed:
            self._send_probe(r, pending)
            self._probed.add(r.round_id)
        elif pending and time.time() < r.deadline:
            self._resend_due(r, pending)
        if len(answered) < len(r.devices) and time.time() < r.deadline:
            return
        refused = {x.device_id: Refusal.from_bytes(x.payload).code for x in responses if x.kind == "refusal"}
        missing = sorted(set(r.devices) - answered)
        implausible = {d: c for d, c in self._implausible.get(r.round_id, {}).items() if d in missing}
        summary = CollectResult(sorted(answered - set(refused)), refused, missing, implausible)
        n_scores = len(summary.answered)
        if n_scores < params.min_responses:
            self._fail(
                r,
                f"{n_scores} of {len(r.devices)} devices sent scores by the deadline (need "
                f"{params.min_responses}); refused: {refused or 'none'}; "
                f"missing: {summary.missing or 'none'}"
                + (f" (implausible scores refused: {implausible})" if implausible else ""),
                result=summary.to_json(),
            )
            return
        self._transition(r, RoundState.SAMPLING, result=summary.to_json())

    def _resend_due(self: "Daemon", r: RoundRecord, pending: List[str]) -> None:
        """The probe again to devices that have not answered for ``probe_resend_seconds``, unless known offline
        (the broker would only pile copies up for them; they get one when they come back, see ``_on_status``)."""
        now, every = time.monotonic(), self.cfg.rounds.probe_resend_seconds
        due = [d for d in pending if now - self._probe_sent.get((r.round_id, d), -math.inf) >= every]
        due = [d for d in due if getattr(self.store.get_device(d), "state", DeviceState.UNKNOWN) != DeviceState.OFFLINE]
        if due:
            self._send_probe(r, due, resend="timer")

    def _resend_on_reconnect(self: "Daemon", device_id: str) -> None:
        """A device came (back) online: the probe of every collecting round it has not answered, at once (and the
        label query of every voting round)."""
        self._resend_label_query_on_reconnect(device_id, RECONNECT_RESEND_SECONDS)
        now = time.monotonic()
        for r in self.store.list_rounds([RoundState.COLLECTING]):
            if (
                device_id not in r.devices
                or not RoundParams.from_json(r.params).ask_devices
                or r.round_id not in self._probed
                or r.deadline is None
                or time.time() >= r.deadline
                or now - self._probe_sent.get((r.round_id, device_id), -math.inf) < RECONNECT_RESEND_SECONDS
            ):
                continue
            if all(x.device_id != device_id for x in self.store.responses(r.round_id)):
                self._send_probe(r, [device_id], resend="reconnect")

    def _send_signed(
        self: "Daemon", r: RoundRecord, payload: bytes, devices: List[str], kind: str, sent_id: str, resend: str
    ) -> None:
        """A signed probe or label query to each device's inbox (after the next key, if one is being
        rolled out), remembering when it went for the resend timer."""
        for device in devices:
            if self._key_update is not None:  # trusted before anything is signed with the next key
                self.publish(inbox(device), self._key_update, device, r.round_id, "key_update")
            self.publish(inbox(device), payload, device, r.round_id, kind)
            self._probe_sent[(sent_id, device)] = time.monotonic()
        if resend:
            self.metrics.probes_resent.inc(len(devices), reason=resend)

    def _send_probe(self: "Daemon", r: RoundRecord, devices: List[str], resend: str = "") -> None:
        p = RoundParams.from_json(r.params)
        quantile = p.coverage_quantile  # rounds created before coverage existed have none
        probe = Probe(
            r.round_id,
            self.index.encoder_sha256,
            self.index.centroids,
            p.codec,
            p.max_distance,
            time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(r.created)),
            r.deadline,
            radii=None if quantile is None else self.index.radii(quantile),
            encoders=self.index.accepted_encoders[1:] or None,
        )  # e.g. the TFLite encoder next to the ONNX one
        payload = probe.to_bytes(signer=self.keyring.current)
        self._send_signed(r, payload, devices, "probe", r.round_id, resend)
        log_event(
            LOG,
            "probe_sent",
            round=r.round_id,
            devices=devices,
            bytes=len(payload),
            k=probe.k,
            **({"resend": resend} if resend else {}),
        )

    # ---- sampling and training ---------------------------------------------------------------------

    def _stage_sampling(self: "Daemon", r: RoundRecord) -> None:
        index = dataclasses.replace(self.index, probe_id=r.round_id)
        p = RoundParams.from_json(r.params)
        plausible = limits(p)
        answers = []
        for x in self.store.responses(r.round_id):
            if x.kind == "scores":
                answer = Scores.from_bytes(x.payload)
                try:  # refused on arrival already; a response stored by an older daemon is checked here
                    check_plausible(answer, plausible)
                except ImplausibleScores as err:
                    log_event(
                        LOG, "scores_excluded", logging.WARNING, round=r.round_id, device=x.device_id, check=err.check
                    )
                    self.metrics.scores_refused.inc(check=err.check)
                    continue
                answers.append(answer)
        quantile = p.coverage_quantile
        scores = (
            combine_scores(index, answers, radius_quantile=quantile or 0.95, limits=plausible)
            if p.ask_devices
            else None
        )
        config = (
            {
                "threshold_sigmas": p.threshold_sigmas,
                "coverage": quantile is not None,
                "misfit_diversity": p.misfit_diversity,
            }
            if p.method == "ecos"
            else {}
        )
        picks = select(index, p.method, p.budget, scores, seed=p.seed, use_domains=p.use_domains, **config)
        path = self._round_dir(r) / "selection.csv"
        write_selection_csv(index, picks, str(path))
        sampled = SampleResult(
            str(path),
            int(len(picks)),
            composition(index, picks),
            {s.device_id: s.epsilon for s in answers},
            None if scores is None else scores.sigma,
        )
        if p.task == "manual":  # selective manual labelling: hand the proxy set to the labellers, then wait
            from cloud.labelling.labelstudio import export_tasks

            files = export_tasks(str(path), list(p.labels or []), str(self._round_dir(r) / "labelling"))
            labelling = {
                "labelling": {
                    "state": files["labels.state.json"],
                    "tasks": files["tasks.json"],
                    "labelled": str(self._round_dir(r) / "labelled.csv"),
                }
            }
            self._transition(r, RoundState.LABELLING, result={**sampled.to_json(), **labelling})
            return
        if p.task == "client":  # automated client labelling: ask the devices for their private label votes, then wait
            self._start_voting(r, p, picks, sampled)
            return
        self._transition(r, RoundState.TRAINING, result=sampled.to_json())

    def _stage_labelling(self: "Daemon", r: RoundRecord) -> None:
        """Wait for ``ecos-cloud round-labels`` to write the labelled selection; then train on it.

        Nothing is held in memory: the labels so far are in the round's labels.state.json, so a
        restarted daemon waits on where it stopped."""
        labelled = r.result.get("labelling", {}).get("labelled")
        if labelled and os.path.exists(labelled):
            self._transition(r, RoundState.TRAINING, result={"selection": labelled})

    def _stage_training(self: "Daemon", r: RoundRecord) -> None:
        job_id = f"{r.round_id}:train"
        worker = self._jobs.get(job_id)
        if worker is not None and worker.is_alive():
            return
        self._jobs.pop(job_id, None)
        job = self.store.get_job(job_id)
        if job is not None and job.state is JobState.DONE:
            self._transition(r, RoundState.SIGNING, result=TrainOutcome.from_job(job.result).to_json())
        elif job is not None and job.state is JobState.FAILED:
            self._fail(r, f"training failed: {job.error}")
        elif job is not None and job.attempt >= MAX_TRAIN_ATTEMPTS:
            self._fail(r, f"training was interrupted {job.attempt} times; giving up")
        else:  # not started yet, or interrupted by a crash ("running" in the store, not here)
            job = self.store.start_job(job_id, r.round_id, "train")
            log_event(LOG, "job_start", round=r.round_id, job=job_id, attempt=job.attempt)
            worker = self._jobs[job_id] = threading.Thread(
                target=self._train, args=(r, job_id), name=f"ecos-train-{r.round_id[:8]}", daemon=True
            )
            worker.start()

    def _train(self: "Daemon", r: RoundRecord, job_id: str) -> None:
        """Worker thread: run the trainer; its outcome goes to the store, which the loop reads."""
        target = r.devices[0] if r.kind == "device" else "fleet"
        selection = SampleResult.from_json(r.result).selection
        p = RoundParams.from_json(r.params)
        # a labelling round's own label list: the model's classes, whichever of them the labels bought or voted use
        labelling = {"labels": list(p.labels)} if p.task in ("manual", "client") and p.labels else {}

        def progress(done: int, total: int, note: str) -> None:
            try:
                self.store.job_progress(job_id, done, total, note)
            except StoreUnavailable as err:  # progress is informational: training goes on
                self._store_unavailable(err, "job_progress")
            self.metrics.training_progress.set(done / max(total, 1))
            log_event(LOG, "job_progress", round=r.round_id, job=job_id, done=done, total=total, step=note)

        with self._training:
            started = time.monotonic()
            try:
                result = self.trainer.train(selection, target, str(self._round_dir(r) / "train"), progress, **labelling)
            except Exception as exc:  # the round fails with the reason; the daemon goes on
                LOG.exception("round %s: training failed", r.round_id)
                self._finish_job(job_id, JobState.FAILED, error=f"{exc.__class__.__name__}: {exc}")
                return
            finally:
                self.metrics.training_progress.set(1.0)
        self._finish_job(job_id, JobState.DONE, result=TrainOutcome(result.artifact_path, result.report).job_json())
        log_event(LOG, "job_done", round=r.round_id, job=job_id, seconds=round(time.monotonic() - started, 1))

    def _finish_job(self: "Daemon", job_id: str, state: JobState, **outcome: Any) -> None:
        """Record a job's outcome, retrying while the store cannot be written (a full disk must not cost a training)."""
        while True:
            try:
                self.store.finish_job(job_id, state, **outcome)
                return
            except StoreUnavailable as err:
                self._store_unavailable(err, "job_finish")
                if self._stop.wait(1.0):
                    return  # stopping: the job stays "running" and starts again with the next daemon
