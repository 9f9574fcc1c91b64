"""The cloud daemon: rounds as persisted state machines, driven by MQTT messages and a clock.

    ecos-cloud serve --config cloud.toml

One round (``device``: one device, its own model; ``fleet``: several devices, summed scores,
one model for all) walks ``probing -> collecting -> sampling -> training -> signing ->
delivering -> done`` (or ``failed``). Every transition is one compare-and-set in the store
(cloud/serve/store/), made only after the stage's outputs are safely written, and every stage can
run again after a crash without effect beyond its first run:

* probing/collecting: the probe (id = round id) is re-sent to devices that have not answered;
  a device answers a repeated probe from its ledger (same bytes, no new privacy cost), and the
  store keeps one response per (round, device);
* sampling: deterministic (seeded) from the stored responses; the CSV is written atomically;
* training: a job in a worker thread; its result is stored; a job found "running" after a
  restart was interrupted and starts again;
* signing: one artifact per round (the store refuses a second);
* delivering: the device's acknowledged chunk is stored; a restarted daemon re-sends the
  manifest and the device answers with where to resume.

Messages are decoded and checked on the MQTT thread's behalf by one loop thread (the network
thread only queues them), so state changes happen in one place, in order. Malformed, oversized,
misaddressed and late messages are logged and dropped; nothing a device sends can stop the loop.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from device_sdk.config import broker_password, broker_tls
from device_sdk.errors import (BudgetError, EcosError, ImplausibleScores, MessageError, MismatchError, StoreUnavailable,
                               UsageError)
from device_sdk.fsutil import atomic_write_bytes
from device_sdk.logsafe import clean
from device_sdk.protocol.round import Probe, Scores, new_id
from device_sdk.protocol.schema import MessageType
from device_sdk.protocol.messages import CLOUD_STATUS, CLOUD_SUBSCRIPTIONS, Ack, ArtifactManifest, InstallFailed, Installed, Refusal, Status, check_device_id, decode_from_device, inbox
from device_sdk.transport import MqttTransport
from device_sdk.protocol.envelope import decode

from cloud.serve.config import CloudConfig, require_index
from cloud.serve.delivery import ArtifactSender, build_manifest
from cloud.security.keys import KeyRing
from cloud.serve.eventlog import log_event
from cloud.pool.index import PoolIndex
from cloud.serve.metrics import DaemonMetrics, MetricsServer
from cloud.sampling import get_sampler
from cloud.sampling.selection import DEFAULT_MAX_EPSILON, DEFAULT_MAX_SAMPLES, Plausibility, check_plausible, combine_scores, composition, select, write_selection_csv
from cloud.serve.store import ArtifactRecord, DeliveryRecord, NewRound, ResponseRecord, RoundRecord, RoundState, Store
from cloud.training.trainers import Trainer

LOG = logging.getLogger("ecos.daemon")
ACTIVE = tuple(s for s in RoundState if not s.terminal)
MAX_TRAIN_ATTEMPTS = 3
TICK_SECONDS = 0.1
QUEUE_LIMIT = 10_000  # device messages waiting for the loop; more are dropped (and counted), not buffered
STORE_LOG_SECONDS = 30.0  # while the store cannot be written: one warning, then one every this many seconds
RECONNECT_RESEND_SECONDS = 1.0  # a device's "online" twice within this: one re-sent probe
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # a stage that meets these on its own files is retried, not failed


def round_params(cfg: CloudConfig, **overrides: Any) -> Dict[str, Any]:
    """A round's settings, frozen at creation so a restart with another config finishes it unchanged."""
    params = {**dataclasses.asdict(cfg.rounds), **{k: v for k, v in overrides.items() if v is not None}}
    params["ask_devices"] = get_sampler(params["method"]).needs_scores
    return params


def create_round(store: Store, cfg: CloudConfig, index: PoolIndex, devices: Sequence[str], fleet: bool = False,
                 round_id: Optional[str] = None, **overrides: Any) -> RoundRecord:
    """Validate and persist a new round; the daemon (this process or another) picks it up."""
    devices = list(dict.fromkeys(check_device_id(d) for d in devices))
    if not devices or (not fleet and len(devices) != 1):
        raise UsageError("a device round targets exactly one device; use a fleet round for several")
    params = round_params(cfg, **overrides)
    params["min_responses"] = min(params["min_responses"], len(devices))  # a fleet default must not doom a small round
    params["index"] = index.probe_id  # the pool index's identity: its centroids are what the devices score
    if not 1 <= params["budget"] <= len(index.paths):
        raise BudgetError(f"budget {params['budget']} does not fit the pool of {len(index.paths)} images")
    spec = NewRound(round_id or new_id(), "fleet" if fleet else "device", devices, params)
    return store.create_round(spec)


class _CountingPublisher:
    """What an ArtifactSender publishes through: counts every manifest and chunk per device and round."""

    def __init__(self, daemon: "Daemon", round_id: str, device_id: str):
        self.daemon, self.round_id, self.device_id = daemon, round_id, device_id

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Any:
        return self.daemon.publish(topic, payload, self.device_id, self.round_id, decode(payload).type)


class Daemon:
    """Owns the transport, the loop thread and the training worker; see the module docstring."""

    def __init__(self, cfg: CloudConfig, store: Store, index: PoolIndex, trainer: Trainer,
                 transport_factory: Callable[..., Any] = MqttTransport):
        self.cfg, self.store, self.index, self.trainer = cfg, store, index, trainer
        self.state_dir = Path(cfg.store.state_dir)
        self.keyring = KeyRing(cfg.store.key_dir)  # signs probes and manifests; restart after 'ecos-cloud keys ...'
        self.key_path, self.public_key_path = self.keyring.private_key_path, self.keyring.public_key_path
        key_update = self.keyring.key_update()  # during a rotation: sent ahead of every probe
        self._key_update = None if key_update is None else key_update.to_bytes()
        self.metrics = DaemonMetrics(store.round_counts, self._devices_by_state)
        b = cfg.broker
        self.transport = transport_factory(
            b.client_id, b.host, b.port, protocol=b.protocol, subscriptions=list(CLOUD_SUBSCRIPTIONS),
            on_message=self._enqueue, will=(CLOUD_STATUS, b"offline", True), online=(CLOUD_STATUS, b"online", True),
            keepalive=b.keepalive, username=b.username, password=broker_password(b), tls=broker_tls(b))
        self._queue: "queue.Queue[Tuple[str, bytes]]" = queue.Queue(maxsize=QUEUE_LIMIT)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._jobs: Dict[str, threading.Thread] = {}
        self._training = threading.Lock()  # one training at a time: it uses every core it is given
        self._probed: Set[str] = set()
        self._implausible: Dict[str, Dict[str, str]] = {}  # round -> device -> failed check (for the round's summary)
        self._probe_sent: Dict[Tuple[str, str], float] = {}  # (round, device) -> monotonic time of the last probe
        self._store_down: Optional[float] = None  # monotonic time of the last "store_unavailable" warning
        self._senders: Dict[Tuple[str, str], ArtifactSender] = {}
        self._artifact_rounds: Dict[str, str] = {}
        self._metrics_server: Optional[MetricsServer] = None
        self._last_tick = 0.0

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self, background: bool = True) -> "Daemon":
        """Connect, serve metrics, and run the loop (in a thread unless ``background`` is False)."""
        m = self.cfg.metrics
        if m.port:
            self._metrics_server = MetricsServer(self.metrics.render, m.host, m.port).start()
            log_event(LOG, "metrics", url=f"http://{m.host}:{self._metrics_server.address[1]}/metrics")
        self.transport.start()
        unfinished = self.store.list_rounds(ACTIVE)
        log_event(LOG, "daemon_start", broker=f"{self.cfg.broker.host}:{self.cfg.broker.port}", state_dir=str(self.state_dir),
                  unfinished_rounds=len(unfinished), public_key=str(self.public_key_path))
        if background:
            self._thread = threading.Thread(target=self.run, name="ecos-daemon", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """``ecos-cloud serve``: run the loop in this thread until ``request_stop`` (SIGTERM), then stop."""
        self.start(background=False)
        try:
            self.run()
        finally:
            self.stop()

    def run(self) -> None:
        """The loop: handle queued messages, advance rounds, until ``stop``; nothing that goes wrong ends it."""
        while not self._stop.is_set():
            try:
                self.step()
            except StoreUnavailable as err:  # e.g. the rounds cannot even be listed: said, counted, tried again
                self._store_unavailable(err, "tick")
                time.sleep(TICK_SECONDS)
            except Exception:  # noqa: BLE001 - a bug here must not stop every round; logged with its traceback
                LOG.exception("unexpected failure in the daemon loop; going on")
                self.metrics.errors.inc(reason="loop_internal_error")
                time.sleep(TICK_SECONDS)

    def step(self, timeout: float = TICK_SECONDS) -> None:
        """Handle the messages queued within ``timeout``, then advance rounds if a tick is due."""
        self.drain(timeout)
        if time.monotonic() - self._last_tick >= TICK_SECONDS:
            self._last_tick = time.monotonic()
            self.tick()

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        """Stop the loop and disconnect (publishing ``offline``).

        A training job still running is not waited for: its thread dies with the process and
        the job, still "running" in the store, starts again on the next start.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.transport.stop()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        log_event(LOG, "daemon_stop")

    # ---- rounds --------------------------------------------------------------------------------

    def submit_round(self, devices: Sequence[str], fleet: bool = False, **overrides: Any) -> RoundRecord:
        r = create_round(self.store, self.cfg, self.index, devices, fleet, **overrides)
        log_event(LOG, "round_created", round=r.round_id, kind=r.kind, devices=list(r.devices), method=r.params["method"],
                  budget=r.params["budget"])
        return r

    def wait_round(self, round_id: str, timeout: float, poll: float = 0.2) -> RoundRecord:
        """Block until the round is done or failed (or ``timeout``); returns its last record."""
        end = time.monotonic() + timeout
        while True:
            r = self.store.get_round(round_id)
            if r is None or r.state.terminal or time.monotonic() > end:
                return r
            time.sleep(poll)

    def tick(self) -> None:
        """Advance every unfinished round by at most one stage."""
        for r in self.store.list_rounds(ACTIVE):
            self._advance(r)
        if self._store_down is not None and self.store.writable():
            self._store_down = None
            self.metrics.store_writable.set(1.0)
            log_event(LOG, "store_recovered", database=self.cfg.store.database)

    def _advance(self, r: RoundRecord) -> None:
        stage = getattr(self, f"_stage_{r.state.value}")
        try:
            if r.params["index"] != self.index.probe_id:
                raise MismatchError(f"the pool index changed since this round started ({r.params['index'][:12]}... -> "
                                    f"{self.index.probe_id[:12]}...); start a new round")
            stage(r)
        except StoreUnavailable as err:  # disk full, read-only: the round stays where it is; the next tick retries
            self._store_unavailable(err, f"round_{r.state.value}")
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                LOG.exception("round %s: unexpected failure in stage %s", r.round_id, r.state.value)
                self._fail(r, f"{r.state.value}: internal error {exc!r}")
                return
            full = StoreUnavailable(f"{r.state.value}: {exc.strerror}", "disk_full")
            self._store_unavailable(full, f"round_{r.state.value}")
        except EcosError as err:
            self._fail(r, f"{r.state.value}: {err} [{err.code}]")
        except Exception as exc:  # a bug in one round must not take the daemon (and other rounds) down
            LOG.exception("round %s: unexpected failure in stage %s", r.round_id, r.state.value)
            self._fail(r, f"{r.state.value}: internal error {exc!r}")

    def _store_unavailable(self, err: StoreUnavailable, where: str) -> None:
        """Count every failed write; log the first, then one every STORE_LOG_SECONDS (not one per tick)."""
        self.metrics.store_errors.inc(reason=err.reason)
        self.metrics.store_writable.set(0.0)
        now = time.monotonic()
        if self._store_down is None or now - self._store_down >= STORE_LOG_SECONDS:
            self._store_down = now
            log_event(LOG, "store_unavailable", logging.WARNING, reason=err.reason, where=where,
                      detail=clean(str(err), 300), action="rounds wait where they are; retried every tick")

    def _transition(self, r: RoundRecord, target: RoundState, *, result: Optional[Dict[str, Any]] = None,
                    deadline: Optional[float] = None, error: str = "") -> None:
        seconds = max(0.0, time.time() - r.updated)
        timings = {**r.result.get("timings", {}), r.state.value: round(seconds, 3)}
        if self.store.transition(r.round_id, r.state, target, result={**(result or {}), "timings": timings},
                                 deadline=deadline, error=error):
            self.metrics.transitions.inc(state=target.value)
            self.metrics.stage_seconds.inc(seconds, stage=r.state.value)
            level = logging.WARNING if target is RoundState.FAILED else logging.INFO
            log_event(LOG, "round_state", level, round=r.round_id, state=target.value, previous=r.state.value,
                      seconds=round(seconds, 3), **({"error": error} if error else {}))

    def _fail(self, r: RoundRecord, error: str, result: Optional[Dict[str, Any]] = None) -> None:
        self.metrics.errors.inc(reason=f"round_{r.state.value}")
        try:
            self._transition(r, RoundState.FAILED, result=result, error=error)
        except StoreUnavailable as err:  # cannot even be marked failed now: the stage runs (and fails) again later
            self._store_unavailable(err, f"round_{r.state.value}")

    def _round_dir(self, r: RoundRecord) -> Path:
        return self.state_dir / "rounds" / r.round_id

    # ---- stages (each may run again after a crash) ----------------------------------------------

    def _stage_probing(self, r: RoundRecord) -> None:
        self._transition(r, RoundState.COLLECTING, deadline=time.time() + r.params["collect_seconds"])

    def _stage_collecting(self, r: RoundRecord) -> None:
        if not r.params["ask_devices"]:  # random / kcenter baselines: the devices are not asked (epsilon 0)
            self._transition(r, RoundState.SAMPLING, result={"answered": [], "refused": {}, "missing": []})
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
        summary = {"answered": sorted(answered - set(refused)), "refused": refused,
                   "missing": sorted(set(r.devices) - answered)}
        implausible = {d: c for d, c in self._implausible.get(r.round_id, {}).items() if d in summary["missing"]}
        if implausible:
            summary["implausible"] = implausible
        n_scores = len(summary["answered"])
        if n_scores < r.params["min_responses"]:
            self._fail(r, f"{n_scores} of {len(r.devices)} devices sent scores by the deadline (need "
                          f"{r.params['min_responses']}); refused: {refused or 'none'}; "
                          f"missing: {summary['missing'] or 'none'}"
                          + (f" (implausible scores refused: {implausible})" if implausible else ""),
                       result=summary)
            return
        self._transition(r, RoundState.SAMPLING, result=summary)

    def _resend_due(self, r: RoundRecord, pending: List[str]) -> None:
        """The probe again to devices that have not answered for ``probe_resend_seconds``, unless known offline
        (the broker would only pile copies up for them; they get one when they come back, see ``_on_status``)."""
        now, every = time.monotonic(), self.cfg.rounds.probe_resend_seconds
        due = [d for d in pending if now - self._probe_sent.get((r.round_id, d), -math.inf) >= every]
        due = [d for d in due if getattr(self.store.get_device(d), "state", "unknown") != "offline"]
        if due:
            self._send_probe(r, due, resend="timer")

    def _resend_on_reconnect(self, device_id: str) -> None:
        """A device came (back) online: the probe of every collecting round it has not answered, at once."""
        now = time.monotonic()
        for r in self.store.list_rounds([RoundState.COLLECTING]):
            if (device_id not in r.devices or not r.params["ask_devices"] or r.round_id not in self._probed
                    or r.deadline is None or time.time() >= r.deadline
                    or now - self._probe_sent.get((r.round_id, device_id), -math.inf) < RECONNECT_RESEND_SECONDS):
                continue
            if all(x.device_id != device_id for x in self.store.responses(r.round_id)):
                self._send_probe(r, [device_id], resend="reconnect")

    def _send_probe(self, r: RoundRecord, devices: List[str], resend: str = "") -> None:
        p = r.params
        quantile = p.get("radius_quantile") or None  # rounds created before coverage existed have none
        probe = Probe(r.round_id, self.index.encoder_sha256, self.index.centroids, p["codec"], p["max_distance"],
                      time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(r.created)), r.deadline,
                      radii=None if quantile is None else self.index.radii(quantile),
                      encoders=self.index.accepted_encoders[1:] or None)  # e.g. the TFLite encoder next to the ONNX one
        payload = probe.to_bytes(signer=self.keyring.current)
        for device in devices:
            if self._key_update is not None:  # trusted before anything is signed with the next key
                self.publish(inbox(device), self._key_update, device, r.round_id, "key_update")
            self.publish(inbox(device), payload, device, r.round_id, "probe")
            self._probe_sent[(r.round_id, device)] = time.monotonic()
        if resend:
            self.metrics.probes_resent.inc(len(devices), reason=resend)
        log_event(LOG, "probe_sent", round=r.round_id, devices=devices, bytes=len(payload), k=probe.k,
                  **({"resend": resend} if resend else {}))

    def _stage_sampling(self, r: RoundRecord) -> None:
        index = dataclasses.replace(self.index, probe_id=r.round_id)
        limits = self._limits(r)
        answers = []
        for x in self.store.responses(r.round_id):
            if x.kind == "scores":
                answer = Scores.from_bytes(x.payload)
                try:  # refused on arrival already; a response stored by an older daemon is checked here
                    check_plausible(answer, limits)
                except ImplausibleScores as err:
                    log_event(LOG, "scores_excluded", logging.WARNING, round=r.round_id, device=x.device_id,
                              check=err.check)
                    self.metrics.scores_refused.inc(check=err.check)
                    continue
                answers.append(answer)
        p = r.params
        quantile = p.get("radius_quantile") or None
        scores = (combine_scores(index, answers, radius_quantile=quantile or 0.95, limits=limits)
                  if p["ask_devices"] else None)
        config = {"threshold_sigmas": p["threshold_sigmas"], "coverage": quantile is not None} if p["method"] == "ecos" else {}
        picks = select(index, p["method"], p["budget"], scores, seed=p["seed"], **config)
        path = self._round_dir(r) / "selection.csv"
        write_selection_csv(index, picks, str(path))
        self._transition(r, RoundState.TRAINING, result={
            "selection": str(path), "selected": int(len(picks)), "composition": composition(index, picks),
            "epsilon": {s.device_id: s.epsilon for s in answers}, "noise_sigma": None if scores is None else scores.sigma})

    def _stage_training(self, r: RoundRecord) -> None:
        job_id = f"{r.round_id}:train"
        worker = self._jobs.get(job_id)
        if worker is not None and worker.is_alive():
            return
        self._jobs.pop(job_id, None)
        job = self.store.get_job(job_id)
        if job is not None and job.state == "done":
            self._transition(r, RoundState.SIGNING, result={"model_path": job.result["artifact_path"],
                                                             "train_report": job.result["report"]})
        elif job is not None and job.state == "failed":
            self._fail(r, f"training failed: {job.error}")
        elif job is not None and job.attempt >= MAX_TRAIN_ATTEMPTS:
            self._fail(r, f"training was interrupted {job.attempt} times; giving up")
        else:  # not started yet, or interrupted by a crash ("running" in the store, not here)
            job = self.store.start_job(job_id, r.round_id, "train")
            log_event(LOG, "job_start", round=r.round_id, job=job_id, attempt=job.attempt)
            worker = self._jobs[job_id] = threading.Thread(target=self._train, args=(r, job_id), name=f"ecos-train-{r.round_id[:8]}",
                                                           daemon=True)
            worker.start()

    def _train(self, r: RoundRecord, job_id: str) -> None:
        """Worker thread: run the trainer; its outcome goes to the store, which the loop reads."""
        target = r.devices[0] if r.kind == "device" else "fleet"

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
                result = self.trainer.train(r.result["selection"], target, str(self._round_dir(r) / "train"), progress)
            except Exception as exc:  # the round fails with the reason; the daemon goes on
                LOG.exception("round %s: training failed", r.round_id)
                self._finish_job(job_id, "failed", error=f"{exc.__class__.__name__}: {exc}")
                return
            finally:
                self.metrics.training_progress.set(1.0)
        self._finish_job(job_id, "done", result={"artifact_path": result.artifact_path, "report": result.report})
        log_event(LOG, "job_done", round=r.round_id, job=job_id, seconds=round(time.monotonic() - started, 1))

    def _finish_job(self, job_id: str, state: str, **outcome: Any) -> None:
        """Record a job's outcome, retrying while the store cannot be written (a full disk must not cost a training)."""
        while True:
            try:
                self.store.finish_job(job_id, state, **outcome)
                return
            except StoreUnavailable as err:
                self._store_unavailable(err, "job_finish")
                if self._stop.wait(1.0):
                    return  # stopping: the job stays "running" and starts again with the next daemon

    def _stage_signing(self, r: RoundRecord) -> None:
        art = self.store.artifact_of_round(r.round_id)
        if art is None:
            art = self._sign(r)
        manifest = ArtifactManifest.from_bytes(art.manifest)
        for device in r.devices:
            self.store.add_delivery(art.artifact_id, device, r.round_id, manifest.n_chunks)
        self._transition(r, RoundState.DELIVERING, result={
            "artifact_id": art.artifact_id, "artifact_version": art.version, "sha256": art.sha256, "size": art.size,
            "chunks": manifest.n_chunks})

    def _sign(self, r: RoundRecord) -> ArtifactRecord:
        """Copy the trained file into the artifact store and sign its manifest."""
        source = r.result["model_path"]
        name = f"classifier-{r.devices[0] if r.kind == 'device' else 'fleet'}"
        # devices refuse a version not above the highest they installed: above their own models' and the fleet's
        version = max(self.store.next_version(n) for n in ["classifier-fleet"] + [f"classifier-{d}" for d in r.devices])
        manifest = build_manifest(source, self.keyring.current, name=name, version=version, targets=list(r.devices),
                                  chunk_size=self.cfg.delivery.chunk_size)
        dest = self.state_dir / "artifacts" / f"{manifest.artifact_id}{Path(source).suffix}"
        atomic_write_bytes(dest, Path(source).read_bytes())
        log_event(LOG, "artifact_signed", round=r.round_id, artifact=manifest.artifact_id, size=manifest.size,
                  chunks=manifest.n_chunks, precision=manifest.precision)
        return self.store.add_artifact(ArtifactRecord(manifest.artifact_id, r.round_id, name, version, manifest.sha256,
                                                      manifest.size, str(dest), manifest.to_bytes()))

    def _stage_delivering(self, r: RoundRecord) -> None:
        art = self.store.artifact_of_round(r.round_id)
        pending = [d for d in self.store.deliveries(r.round_id) if d.state == "sending"]
        expired = time.time() - r.updated > self.cfg.delivery.deadline_seconds
        for d in pending:
            if expired:
                self.store.update_delivery(art.artifact_id, d.device_id, state="failed", result={"code": "timeout"})
            else:
                self._pump(r, art, d)
        if pending and not expired:
            return
        final = {d.device_id: {"state": d.state, **d.result} for d in self.store.deliveries(r.round_id)}
        for device in final:
            self._senders.pop((art.artifact_id, device), None)
        if any(x["state"] == "installed" for x in final.values()):
            self._transition(r, RoundState.DONE, result={"deliveries": final})
        else:
            self._fail(r, f"no device installed the model: {final}", result={"deliveries": final})

    def _pump(self, r: RoundRecord, art: ArtifactRecord, d: DeliveryRecord) -> None:
        """Send what a delivery needs now: everything from the stored ack on the first tick
        (also the first after a restart: the manifest makes the device say where to resume),
        resends after a timeout on later ones."""
        key = (art.artifact_id, d.device_id)
        sender = self._senders.get(key)
        if sender is not None:
            sender.tick()
            return
        self._artifact_rounds[art.artifact_id] = r.round_id
        sender = self._senders[key] = ArtifactSender(
            _CountingPublisher(self, r.round_id, d.device_id), d.device_id, art.path, ArtifactManifest.from_bytes(art.manifest),
            window=self.cfg.delivery.window, timeout=self.cfg.delivery.ack_timeout, max_attempts=None, acked=d.next_chunk)
        sender.start()

    # ---- messages --------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, device_id: str, round_id: str, msg_type: str) -> Any:
        """Publish (QoS 1) and count the bytes, per device and round, in the store and the metrics."""
        info = self.transport.publish(topic, payload, qos=1)
        self.metrics.messages.inc(direction="out", type=msg_type)
        self.metrics.bytes.inc(len(payload), direction="out", type=msg_type)
        if msg_type == "artifact_chunk":
            self.metrics.chunks.inc()
        try:
            self.store.add_traffic(device_id, round_id, "down", msg_type, len(payload))
        except StoreUnavailable as err:  # sent all the same; only this message's byte count is lost
            self._store_unavailable(err, "traffic")
        return info

    def _enqueue(self, topic: str, payload: bytes) -> None:
        """MQTT network thread: queue for the loop; a flood beyond ``QUEUE_LIMIT`` is counted and dropped."""
        try:
            self._queue.put_nowait((topic, payload))
        except queue.Full:
            self.metrics.dropped.inc(reason="queue_full")
            self.metrics.errors.inc(reason="queue_full")

    def drain(self, timeout: float) -> None:
        """Handle queued device messages: wait up to ``timeout`` for the first, then take all queued."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self.handle_message(*item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return

    def handle_message(self, topic: str, payload: bytes) -> None:
        """Check and dispatch one device message; anything wrong is logged, counted and dropped.

        Never raises: a message that fails a check is rejected (``message_rejected``), and one
        that makes the handling fail in a way no check foresaw (a bug) is dropped
        (``message_dropped``, reason ``internal_error``), so one message costs at most itself,
        never the loop. Both are counted in ``ecos_messages_dropped_total{reason}``.
        """
        try:
            self._handle_message(topic, payload)
        except Exception as exc:  # noqa: BLE001 - the loop (and every round) must outlive any one message
            self._drop(topic, "internal_error", f"{exc.__class__.__name__}: {exc}", event="message_dropped")
            LOG.debug("traceback of the dropped message", exc_info=True)

    def _handle_message(self, topic: str, payload: bytes) -> None:
        if len(payload) > self.cfg.broker.max_message_bytes:
            self._reject(topic, "oversized", f"{len(payload)} bytes is over max_message_bytes={self.cfg.broker.max_message_bytes}")
            return
        try:
            device_id, msg = decode_from_device(topic, payload)
        except MessageError as err:
            self._reject(topic, "malformed", str(err))
            return
        msg_type = msg.TYPE
        self.metrics.messages.inc(direction="in", type=msg_type)
        self.metrics.bytes.inc(len(payload), direction="in", type=msg_type)
        handler = {Scores: self._on_scores, Refusal: self._on_refusal, Ack: self._on_ack, Installed: self._on_result,
                   InstallFailed: self._on_result, Status: self._on_status}[type(msg)]
        try:
            handler(device_id, msg, payload)
        except StoreUnavailable as err:  # not recorded; a device's answer comes again with the re-sent probe
            self._store_unavailable(err, f"message_{msg_type}")
            self._reject(topic, err.code, str(err))
        except EcosError as err:
            self._reject(topic, err.code, str(err))

    def _reject(self, topic: str, reason: str, detail: str) -> None:
        self._drop(topic, reason, detail, event="message_rejected")

    def _drop(self, topic: Any, reason: str, detail: str, event: str) -> None:
        """Count and log a message that is not handled; what came from the message is escaped and cut."""
        self.metrics.errors.inc(reason=reason)
        self.metrics.dropped.inc(reason=reason)
        log_event(LOG, event, logging.WARNING, topic=clean(topic, 200), reason=clean(reason, 40),
                  detail=clean(detail, 300))

    def _on_status(self, device_id: str, msg: Status, payload: bytes) -> None:
        if msg.state == "online":  # first: a full disk that cannot record the status must not cost the probe
            self._resend_on_reconnect(device_id)
        self.store.record_status(device_id, msg.state, msg.model, time.time())
        self.store.add_traffic(device_id, "", "up", "status", len(payload))
        log_event(LOG, "device_status", device=device_id, state=msg.state, model=msg.model)

    def _on_scores(self, device_id: str, msg: Scores, payload: bytes) -> None:
        if msg.encoder_sha256 != self.index.encoder_sha256 or msg.k != self.index.k:
            raise MessageError(f"scores from {device_id} were made with encoder {msg.encoder_sha256[:12]}... and k={msg.k}; "
                               f"this pool's are {self.index.encoder_sha256[:12]}... and k={self.index.k}")
        r = self.store.get_round(msg.probe_id)
        if r is not None and device_id in r.devices:
            try:  # before anything is recorded: a forged answer must not take the place of the device's real one
                check_plausible(msg, self._limits(r))
            except ImplausibleScores as err:
                self.metrics.scores_refused.inc(check=err.check)
                self._implausible.setdefault(r.round_id, {})[device_id] = err.check
                raise
        self._record_answer(device_id, msg.probe_id, "scores", msg.message_id, payload)

    @staticmethod
    def _limits(r: RoundRecord) -> Plausibility:
        """What an honest answer to ``r`` looks like (rounds created before these settings get the defaults)."""
        p = r.params
        return Plausibility.for_round(p.get("max_epsilon", DEFAULT_MAX_EPSILON), p.get("delta", 1e-5),
                                      p.get("max_samples", DEFAULT_MAX_SAMPLES))

    def _on_refusal(self, device_id: str, msg: Refusal, payload: bytes) -> None:
        log_event(LOG, "probe_refused", round=clean(msg.probe_id), device=device_id, code=clean(msg.code),
                  reason=clean(msg.reason))
        self._record_answer(device_id, msg.probe_id, "refusal", msg.id, payload)

    def _record_answer(self, device_id: str, round_id: str, kind: str, message_id: str, payload: bytes) -> None:
        r = self.store.get_round(round_id)
        if r is None or device_id not in r.devices:
            raise MessageError(f"{kind} from {device_id} for round {round_id[:40]!r}, which did not ask it")
        self.store.add_traffic(device_id, round_id, "up", MessageType(kind), len(payload))
        if r.state not in (RoundState.PROBING, RoundState.COLLECTING):
            self.metrics.responses.inc(kind=kind, outcome="late")
            log_event(LOG, "response_late", round=round_id, device=device_id, state=r.state.value)
            return
        new = self.store.add_response(ResponseRecord(round_id, device_id, kind, message_id, payload, time.time()))
        self.metrics.responses.inc(kind=kind, outcome="new" if new else "duplicate")
        log_event(LOG, "response", round=round_id, device=device_id, kind=kind, duplicate=not new, bytes=len(payload))

    def _on_ack(self, device_id: str, msg: Ack, payload: bytes) -> None:
        round_id = self._delivery_round(msg.artifact_id)
        self.store.add_traffic(device_id, round_id, "up", "ack", len(payload))
        delivery = self.store.get_delivery(msg.artifact_id, device_id)
        if delivery is not None and msg.next_chunk > delivery.total_chunks:
            raise MessageError(f"ack from {device_id} of chunk {msg.next_chunk} of {msg.artifact_id}, "
                               f"which has {delivery.total_chunks} chunks")
        self.store.update_delivery(msg.artifact_id, device_id, next_chunk=msg.next_chunk)
        sender = self._senders.get((msg.artifact_id, device_id))
        if sender is not None:
            sender.on_ack(msg)

    def _on_result(self, device_id: str, msg: Any, payload: bytes) -> None:
        round_id = self._delivery_round(msg.artifact_id)
        self.store.add_traffic(device_id, round_id, "up", msg.TYPE, len(payload))
        if isinstance(msg, Installed):
            state, result = "installed", {"accuracy": msg.accuracy, "n_eval": msg.n_eval, "version": msg.version}
            self.store.set_device_model(device_id, {"artifact_id": msg.artifact_id, "version": msg.version,
                                                    "sha256": msg.sha256}, time.time())
        else:
            state, result = "failed", {"code": msg.code, "reason": msg.reason}
        if self.store.update_delivery(msg.artifact_id, device_id, state=state, result=result):
            self.metrics.deliveries.inc(outcome=state)
            log_event(LOG, "delivery_" + state, round=round_id, device=device_id, artifact=msg.artifact_id, **result)
        sender = self._senders.get((msg.artifact_id, device_id))
        if sender is not None:
            sender.on_result(msg)

    def _delivery_round(self, artifact_id: str) -> str:
        """The round an artifact belongs to (cached: acks arrive once per chunk)."""
        if artifact_id not in self._artifact_rounds:
            art = self.store.get_artifact(artifact_id)
            if art is None:
                raise MessageError(f"delivery message about unknown artifact {artifact_id!r}")
            self._artifact_rounds[artifact_id] = art.round_id
        return self._artifact_rounds[artifact_id]

    def _devices_by_state(self) -> Dict[str, int]:
        counts: Dict[str, int] = {"online": 0, "offline": 0}
        for d in self.store.list_devices():
            counts[d.state] = counts.get(d.state, 0) + 1
        return counts


def build_daemon(cfg: CloudConfig, transport_factory: Callable[..., Any] = MqttTransport) -> Daemon:
    """Open the store, the pool index and the trainer named in ``cfg``."""
    from cloud.serve.store import open_store
    from cloud.training.trainers import TrainerContext, get_trainer

    os.makedirs(cfg.store.state_dir, exist_ok=True)
    index_path = require_index(cfg)
    index = PoolIndex.load(index_path)
    cache_dir = cfg.trainer.cache_dir or os.path.join(cfg.store.state_dir, "cache")
    trainer = get_trainer(cfg.trainer.name, TrainerContext(index_path, cache_dir, cfg.trainer.threads), cfg.trainer.options)
    _set_torch_threads(cfg.trainer.threads)
    return Daemon(cfg, open_store(cfg.store), index, trainer, transport_factory)


def _set_torch_threads(threads: int) -> None:
    try:
        import torch
    except ImportError:  # a trainer without torch is possible; nothing to limit then
        return
    torch.set_num_threads(threads)
