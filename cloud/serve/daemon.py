"""The cloud daemon: rounds as persisted state machines, driven by MQTT messages and a clock.

    ecos-cloud serve --config cloud.toml

One round (``device``: one device, its own model; ``fleet``: several devices, summed scores,
one model for all) walks ``probing -> collecting -> sampling -> training -> signing ->
delivering -> done`` (or ``failed``); a manual-labelling round waits in ``labelling`` between
sampling and training until ``ecos-cloud round-labels`` imports its labels, a client-labelling
round in ``voting`` until the devices' label votes are in (docs/tasks.md). Every
transition is one compare-and-set in the store (cloud/serve/store/), made only after the stage's
outputs are safely written, and every stage can run again after a crash without effect beyond its
first run (the stages: cloud/serve/rounds.py).

Messages are decoded and checked on the MQTT thread's behalf by one loop thread (the network
thread only queues them), so state changes happen in one place, in order. Malformed, oversized,
misaddressed and late messages are logged and dropped; nothing a device sends can stop the loop.

Over 400 lines on purpose: the daemon's loop and its handling of every device message, which
share the daemon's locks and queues; the stages live in rounds.py and rounds_delivery.py.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Set, Tuple

from cloud.errors import ImplausibleScores, StoreUnavailable
from cloud.pool.index import PoolIndex
from cloud.sampling.selection import check_plausible
from cloud.security.keys import KeyRing
from cloud.serve.config import CloudConfig, require_index
from cloud.serve.delivery import ArtifactSender
from cloud.serve.eventlog import log_event
from cloud.serve.metrics import DaemonMetrics, MetricsServer
from cloud.serve.round_types import RoundParams
from cloud.serve.rounds import RoundStages, create_round, round_params
from cloud.serve.rounds_labels import round_of_label_query
from cloud.serve.store import DeliveryState, DeviceState, ResponseRecord, RoundRecord, RoundState, Store
from cloud.training.trainers import Trainer
from device_sdk.config import broker_password, broker_tls
from device_sdk.errors import EcosError, MessageError, MismatchError
from device_sdk.logsafe import clean
from device_sdk.protocol import (
    CLOUD_STATUS,
    CLOUD_SUBSCRIPTIONS,
    Ack,
    Installed,
    InstallFailed,
    Refusal,
    Status,
    decode_from_device,
)
from device_sdk.protocol.labels import LabelVotes
from device_sdk.protocol.round import Scores
from device_sdk.protocol.schema import MessageType
from device_sdk.transport import MqttTransport

__all__ = ["Daemon", "build_daemon", "create_round", "round_params"]  # create_round, round_params: from rounds.py

LOG = logging.getLogger("ecos.daemon")
ACTIVE = tuple(s for s in RoundState if not s.terminal)
TICK_SECONDS = 0.1
QUEUE_LIMIT = 10_000  # device messages waiting for the loop; more are dropped (and counted), not buffered
STORE_LOG_SECONDS = 30.0  # while the store cannot be written: one warning, then one every this many seconds
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # a stage that meets these on its own files is retried, not failed


class Daemon(RoundStages):
    """Owns the transport, the loop thread and the training worker; see the module docstring."""

    def __init__(
        self,
        cfg: CloudConfig,
        store: Store,
        index: PoolIndex,
        trainer: Trainer,
        transport_factory: Callable[..., Any] = MqttTransport,
    ):
        self.cfg, self.store, self.index, self.trainer = cfg, store, index, trainer
        self.state_dir = Path(cfg.store.state_dir)
        self.keyring = KeyRing(cfg.store.key_dir)  # signs probes and manifests; restart after 'ecos-cloud keys ...'
        self.key_path, self.public_key_path = self.keyring.private_key_path, self.keyring.public_key_path
        key_update = self.keyring.key_update()  # during a rotation: sent ahead of every probe
        self._key_update = None if key_update is None else key_update.to_bytes()
        self.metrics = DaemonMetrics(store.round_counts, self._devices_by_state)
        b = cfg.broker
        self.transport = transport_factory(
            b.client_id,
            b.host,
            b.port,
            protocol=b.protocol,
            subscriptions=list(CLOUD_SUBSCRIPTIONS),
            on_message=self._enqueue,
            will=(CLOUD_STATUS, b"offline", True),
            online=(CLOUD_STATUS, b"online", True),
            keepalive=b.keepalive,
            username=b.username,
            password=broker_password(b),
            tls=broker_tls(b),
        )
        self._queue: "queue.Queue[Tuple[str, bytes]]" = queue.Queue(maxsize=QUEUE_LIMIT)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._jobs: Dict[str, threading.Thread] = {}
        self._training = threading.Lock()  # one training at a time: it uses every core it is given
        self._probed: Set[str] = set()
        self._implausible: Dict[str, Dict[str, str]] = {}  # round (or label query) -> device -> failed check
        self._label_queries: Dict[str, Any] = {}  # label query id -> LabelQuery (read from the round's folder)
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
        log_event(
            LOG,
            "daemon_start",
            broker=f"{self.cfg.broker.host}:{self.cfg.broker.port}",
            state_dir=str(self.state_dir),
            unfinished_rounds=len(unfinished),
            public_key=str(self.public_key_path),
        )
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
        log_event(
            LOG,
            "round_created",
            round=r.round_id,
            kind=r.kind,
            devices=list(r.devices),
            method=r.params["method"],
            budget=r.params["budget"],
        )
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
        try:
            stage = self._stage(r.state)
            index_id = RoundParams.from_json(r.params).index
            if index_id != self.index.probe_id:
                raise MismatchError(
                    f"the pool index changed since this round started ({index_id[:12]}... -> "
                    f"{self.index.probe_id[:12]}...); start a new round"
                )
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
            log_event(
                LOG,
                "store_unavailable",
                logging.WARNING,
                reason=err.reason,
                where=where,
                detail=clean(str(err), 300),
                action="rounds wait where they are; retried every tick",
            )

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
            self._reject(
                topic,
                "oversized",
                f"{len(payload)} bytes is over max_message_bytes={self.cfg.broker.max_message_bytes}",
            )
            return
        try:
            device_id, msg = decode_from_device(topic, payload)
        except MessageError as err:
            self._reject(topic, "malformed", str(err))
            return
        msg_type = msg.TYPE
        self.metrics.messages.inc(direction="in", type=msg_type)
        self.metrics.bytes.inc(len(payload), direction="in", type=msg_type)
        handler = {
            Scores: self._on_scores,
            Refusal: self._on_refusal,
            Ack: self._on_ack,
            Installed: self._on_result,
            InstallFailed: self._on_result,
            Status: self._on_status,
            LabelVotes: self._on_label_votes,
        }[type(msg)]
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
        log_event(
            LOG, event, logging.WARNING, topic=clean(topic, 200), reason=clean(reason, 40), detail=clean(detail, 300)
        )

    def _on_status(self, device_id: str, msg: Status, payload: bytes) -> None:
        if msg.state == "online":  # first: a full disk that cannot record the status must not cost the probe
            self._resend_on_reconnect(device_id)
        self.store.record_status(device_id, msg.state, msg.model, time.time())
        self.store.add_traffic(device_id, "", "up", "status", len(payload))
        log_event(LOG, "device_status", device=device_id, state=msg.state, model=msg.model)

    def _on_scores(self, device_id: str, msg: Scores, payload: bytes) -> None:
        if msg.encoder_sha256 != self.index.encoder_sha256 or msg.k != self.index.k:
            raise MessageError(
                f"scores from {device_id} were made with encoder {msg.encoder_sha256[:12]}... and k={msg.k}; "
                f"this pool's are {self.index.encoder_sha256[:12]}... and k={self.index.k}"
            )
        r = self.store.get_round(msg.probe_id)
        if r is not None and device_id in r.devices:
            try:  # before anything is recorded: a forged answer must not take the place of the device's real one
                check_plausible(msg, self._limits(r))
            except ImplausibleScores as err:
                self.metrics.scores_refused.inc(check=err.check)
                self._implausible.setdefault(r.round_id, {})[device_id] = err.check
                raise
        self._record_answer(device_id, msg.probe_id, "scores", msg.message_id, payload)

    def _on_refusal(self, device_id: str, msg: Refusal, payload: bytes) -> None:
        r = self.store.get_round(msg.probe_id)
        if (r is None or device_id not in r.devices) and round_of_label_query(msg.probe_id) is not None:
            self._on_label_refusal(device_id, msg, payload)  # a refusal of a round's label query (<round>.labels)
            return
        log_event(
            LOG,
            "probe_refused",
            round=clean(msg.probe_id),
            device=device_id,
            code=clean(msg.code),
            reason=clean(msg.reason),
        )
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
            raise MessageError(
                f"ack from {device_id} of chunk {msg.next_chunk} of {msg.artifact_id}, "
                f"which has {delivery.total_chunks} chunks"
            )
        self.store.update_delivery(msg.artifact_id, device_id, next_chunk=msg.next_chunk)
        sender = self._senders.get((msg.artifact_id, device_id))
        if sender is not None:
            sender.on_ack(msg)

    def _on_result(self, device_id: str, msg: Any, payload: bytes) -> None:
        round_id = self._delivery_round(msg.artifact_id)
        self.store.add_traffic(device_id, round_id, "up", msg.TYPE, len(payload))
        if isinstance(msg, Installed):
            state, result = (
                DeliveryState.INSTALLED,
                {"accuracy": msg.accuracy, "n_eval": msg.n_eval, "version": msg.version},
            )
            self.store.set_device_model(
                device_id, {"artifact_id": msg.artifact_id, "version": msg.version, "sha256": msg.sha256}, time.time()
            )
        else:
            state, result = DeliveryState.FAILED, {"code": msg.code, "reason": msg.reason}
        if self.store.update_delivery(msg.artifact_id, device_id, state=state, result=result):
            self.metrics.deliveries.inc(outcome=state.value)
            log_event(
                LOG, f"delivery_{state.value}", round=round_id, device=device_id, artifact=msg.artifact_id, **result
            )
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
        counts: Dict[str, int] = {DeviceState.ONLINE.value: 0, DeviceState.OFFLINE.value: 0}
        for d in self.store.list_devices():
            counts[d.state.value] = counts.get(d.state.value, 0) + 1
        return counts


def build_daemon(cfg: CloudConfig, transport_factory: Callable[..., Any] = MqttTransport) -> Daemon:
    """Open the store, the pool index and the trainer named in ``cfg``."""
    from cloud.serve.store import open_store
    from cloud.training.trainers import TrainerContext, get_trainer

    os.makedirs(cfg.store.state_dir, exist_ok=True)
    index_path = require_index(cfg)
    index = PoolIndex.load(index_path)
    cache_dir = cfg.trainer.cache_dir or os.path.join(cfg.store.state_dir, "cache")
    trainer = get_trainer(
        cfg.trainer.name, TrainerContext(index_path, cache_dir, cfg.trainer.threads), cfg.trainer.options
    )
    _set_torch_threads(cfg.trainer.threads)
    return Daemon(cfg, open_store(cfg.store), index, trainer, transport_factory)


def _set_torch_threads(threads: int) -> None:
    try:
        import torch
    except ImportError:  # a trainer without torch is possible; nothing to limit then
        return
    torch.set_num_threads(threads)
