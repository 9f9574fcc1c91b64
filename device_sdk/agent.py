"""The device agent: the SDK an app embeds, and what ``ecos-device run`` runs.

    frames = FrameBuffer(capacity=256)            # or FolderSource(...), CallableSource(fn); default: [data] local
    agent = DeviceAgent(load_device_config("device.toml"), on_event=print, data_source=frames)
    agent.start()
    frames.append(frame)             # from the app's camera loop, any thread
    labels = agent.predict(images)   # uint8 N x H x W x 3, with the installed classifier
    agent.stop()

docs/sdk.md describes this API; docs/sdk-reference.md is generated from the docstrings.

It subscribes to its own inbox only and handles one message at a time on a worker thread (the
MQTT network thread only queues payloads, so a long encoding never stalls keepalives):

* a probe's signature is checked first, against the device's trust store: an unsigned probe
  (unless ``[privacy] accept_unsigned_probes``), or one signed by an unknown or revoked key, or
  one whose signature does not verify, is dropped without a reply and without touching a private
  image or the ledger (a reply would let a forger fail the real round); then it is answered
  through the privacy ledger (``answer_probe``): a repeat replays the same bytes for free; a
  probe it will not answer (budget exhausted, wrong encoder, deadline passed, no local images,
  the id of an answered probe with other content) gets a ``refusal`` with the error's code;
* a label query (automated client labelling) goes through the same steps as a probe: its
  signature first (a forged one is dropped without a reply, nothing read or charged), then the
  device's labelled ``[data] labelled`` images vote (``answer_label_query``: noise, charged to the
  ledger before the votes are published; a repeat replays for free), or a ``refusal`` with the
  error's code (budget exhausted, another encoder, deadline passed, no labelled images);
* a key update (signed by a key the device trusts) adds keys and revocations to its trust
  store; the retained status then lists the key ids it trusts;
* manifests and chunks go to the ``DeliveryReceiver``; after an install the classifier is
  evaluated on the labelled ``[data] eval`` folder, if any, and the ``installed`` reply carries
  the accuracy; the retained status is republished with what now runs;
* anything malformed, oversized or not for this device is logged and dropped.

Over 400 lines on purpose: a long module docstring (the threading model an app must know) and
the agent's handlers, which share its locks and worker thread.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from device_sdk.config import DeviceConfig, broker_password, broker_tls
from device_sdk.datasource import DataSource, FolderSource, encode_source
from device_sdk.delivery.install import DeliveryReceiver, InstalledModel, ModelStore
from device_sdk.device import answer_probe, check_probe_conflict
from device_sdk.errors import (
    ArtifactError,
    DeadlinePassed,
    EcosError,
    InputError,
    LedgerCorrupt,
    LedgerUnavailable,
    MessageError,
    MismatchError,
    SignatureError,
)
from device_sdk.imagefolder import load_images, scan_image_folder
from device_sdk.labelling import THUMB16, THUMB_SIZE, answer_label_query, check_query_conflict, thumbnail_features
from device_sdk.logsafe import clean
from device_sdk.predict import Predictor, evaluate
from device_sdk.privacy.ledger import PrivacyLedger
from device_sdk.protocol import (
    ArtifactChunk,
    ArtifactManifest,
    Installed,
    InstallFailed,
    KeyUpdate,
    LabelQuery,
    Message,
    Refusal,
    Status,
    clip_reason,
    decode_for_device,
    device_status,
    inbox,
    outbox,
)
from device_sdk.protocol.round import Probe
from device_sdk.runtime import Model, load_model
from device_sdk.scoring import check_compatible, encode_items, log_unreadable
from device_sdk.transport import MqttTransport
from device_sdk.trust import trust_from_settings, verify_label_query, verify_probe

LOG = logging.getLogger("ecos.agent")
_LOCAL_PATH = re.compile(
    r"(?<![\w.:/])(?:~|[A-Za-z]:)?[/\\][^\s'\"(),;]+"
)  # what is left of a path after the known ones
ENCODER, CLASSIFIER = "encoder", "classifier"


class EventKind:
    """The ``AgentEvent.kind`` values (plain strings: compare ``event.kind == EventKind.PROBE_ANSWERED``).

    detail keys: PROBE_ANSWERED probe_id, repeated, charged_epsilon, spent_epsilon; PROBE_REFUSED and
    PROBE_REJECTED probe_id, code, reason; KEYS_UPDATED serial, added, removed, trusted;
    KEY_UPDATE_REFUSED serial, code, reason; INSTALLED artifact_id, version, accuracy, n_eval;
    INSTALL_FAILED artifact_id, code, reason; ROLLED_BACK kind, artifact_id, version; REJECTED topic, reason;
    LABEL_QUERY_ANSWERED query_id, repeated, queries, voters, charged_epsilon, spent_epsilon; LABEL_QUERY_REFUSED
    and LABEL_QUERY_REJECTED query_id, code, reason.
    """

    PROBE_ANSWERED = "probe_answered"
    PROBE_REFUSED = "probe_refused"
    PROBE_REJECTED = "probe_rejected"
    LABEL_QUERY_ANSWERED = "label_query_answered"
    LABEL_QUERY_REFUSED = "label_query_refused"
    LABEL_QUERY_REJECTED = "label_query_rejected"
    KEYS_UPDATED = "keys_updated"
    KEY_UPDATE_REFUSED = "key_update_refused"
    INSTALLED = "installed"
    INSTALL_FAILED = "install_failed"
    ROLLED_BACK = "rolled_back"
    REJECTED = "rejected"


@dataclass(frozen=True)
class ModelInfo:
    """What runs on the device for one kind of model (``DeviceAgent.model_info``)."""

    kind: str
    path: str
    sha256: str
    runtime: str
    feature_dim: Optional[int]
    labels: List[str]
    version: Optional[int] = None  # None: configured ([models] encoder), not delivered
    name: Optional[str] = None
    artifact_id: Optional[str] = None


@dataclass(frozen=True)
class AgentEvent:
    """What the agent did, for the app: ``kind`` is one of the ``on_event`` kinds listed in DeviceAgent."""

    kind: str
    detail: Dict[str, Any] = field(default_factory=dict)


@dataclass
class AgentStats:
    """Traffic of this agent, payload bytes: what a device pays on its uplink and downlink."""

    messages_in: int = 0
    bytes_in: int = 0
    messages_out: int = 0
    bytes_out: int = 0
    rejected: int = 0  # malformed, oversized, not for this device, or a probe that fails its signature check
    dropped: int = 0  # every message not handled: the rejected ones and those whose handling failed unexpectedly


def supported_formats() -> Tuple[str, ...]:
    """Artifact formats this device can run, from the runtimes installed."""
    formats = ["onnx"] if importlib.util.find_spec("onnxruntime") else []
    if importlib.util.find_spec("ai_edge_litert") or importlib.util.find_spec("tflite_runtime"):
        formats.append("tflite")
    return tuple(formats)


class DeviceAgent:
    """Connects, answers probes within the ledger, installs signed models, predicts.

    ``on_event(AgentEvent)`` is called on the worker thread with kinds ``probe_answered``,
    ``probe_refused``, ``probe_rejected`` (signature check failed: no reply, nothing charged),
    ``label_query_answered``, ``label_query_refused``, ``label_query_rejected`` (the same for a label
    query, answered from the labelled ``[data] labelled`` folder), ``keys_updated``, ``key_update_refused``,
    ``installed``, ``install_failed``, ``rolled_back`` and ``rejected`` (constants in :class:`EventKind`); a
    callback that raises is logged, never fatal, and a slow one delays the next message.

    Threads: messages are handled one at a time on the agent's worker thread (probes are scored
    there, from ``data_source``); the MQTT network thread only queues them. ``predict``,
    ``predictor``, ``model``, ``model_info`` and ``rollback`` may be called from any app thread
    while the agent runs (models are loaded under a lock; a TFLite interpreter runs one call at a
    time). ``start`` and ``stop`` belong to the thread that owns the agent.
    """

    def __init__(
        self,
        config: DeviceConfig,
        on_event: Optional[Callable[[AgentEvent], None]] = None,
        data_source: Optional[DataSource] = None,
    ):
        """``data_source`` gives the private images probes are scored on (default: ``FolderSource([data] local)``)."""
        self.config, self.device_id, self.on_event = config, config.device_id, on_event
        self.data_source = data_source if data_source is not None else FolderSource(config.data.local)
        privacy = config.privacy
        self.ledger = PrivacyLedger.open(
            privacy.ledger,
            device_id=self.device_id,
            budget_epsilon=privacy.budget_epsilon,
            budget_delta=privacy.budget_delta,
            accountant=privacy.accountant,
        )
        self.store = ModelStore(config.models.store)
        self.trust = trust_from_settings(config.models)
        self.accept_unsigned = privacy.accept_unsigned_probes
        if self.accept_unsigned:
            LOG.warning(
                "[privacy] accept_unsigned_probes is on: anyone who can write this device's inbox can spend "
                "its privacy budget (development only)"
            )
        self.receiver = DeliveryReceiver(
            self.store,
            self.trust,
            self.device_id,
            max_bytes=int(config.models.max_artifact_mb * (1 << 20)),
            formats=supported_formats(),
            allow_downgrade=config.models.allow_downgrade,
            validate=self._validate,
            evaluate=self._evaluate,
            fleets=config.models.fleets,
        )
        self.stats = AgentStats()
        self._models: Dict[str, Model] = {}
        self._models_lock = threading.Lock()
        self._features: Dict[Any, np.ndarray] = {}
        self._queue: "queue.Queue[Optional[Tuple[str, bytes]]]" = queue.Queue(maxsize=1024)
        self._worker: Optional[threading.Thread] = None
        self.transport = self._make_transport()

    def _make_transport(self) -> MqttTransport:
        b = self.config.broker
        offline = Status(self.device_id, "offline").to_bytes()
        return MqttTransport(
            f"ecos-device-{self.device_id}",
            b.host,
            b.port,
            protocol=b.protocol,
            subscriptions=[inbox(self.device_id)],
            on_message=self._enqueue,
            will=(device_status(self.device_id), offline, True),
            online=(device_status(self.device_id), self._status_payload(), True),
            keepalive=b.keepalive,
            session_expiry=b.session_expiry,
            username=b.username,
            password=broker_password(b),
            tls=broker_tls(b),
        )

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "DeviceAgent":
        """Start the worker thread and connect in the background (reconnecting until ``stop``); returns self."""
        self._worker = threading.Thread(target=self._work, name=f"ecos-agent-{self.device_id}", daemon=True)
        self._worker.start()
        self.transport.start()
        return self

    def wait_connected(self, timeout: float) -> bool:
        """True once connected to the broker, False if ``timeout`` seconds pass first (it keeps trying)."""
        return self.transport.wait_connected(timeout)

    def stop(self) -> None:
        """Handle what is already queued (its replies still go out), then publish ``offline`` and disconnect."""
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None
        self.transport.stop()

    # ---- what an app calls -----------------------------------------------------------------------

    def predict(self, images: np.ndarray) -> List[str]:
        """Labels for uint8 ``N x H x W x 3`` images from the installed classifier."""
        predictor = self.predictor()
        if predictor is None:
            raise ArtifactError("no classifier is installed yet: the cloud delivers one after a round")
        return [predictor.labels[k] for k in predictor.probabilities(images).argmax(axis=1)]

    def predictor(self) -> Optional[Predictor]:
        """The installed classifier (probabilities, file prediction), or None before the first install."""
        model = self.model(CLASSIFIER)
        return None if model is None else Predictor(model)

    def model(self, kind: str) -> Optional[Model]:
        """The loaded current model of ``kind`` (an encoder may also come from the config)."""
        installed = self.store.current(kind)
        path = installed.path if installed is not None else (self.config.models.encoder if kind == ENCODER else None)
        if path is None:
            return None
        with self._models_lock:
            cached = self._models.get(kind)
            if cached is None or cached.path != path:
                cached = self._models[kind] = load_model(path, self.config.models.runtime, self.config.models.threads)
            return cached

    def model_info(self) -> Dict[str, Optional[ModelInfo]]:
        """Per kind (``encoder``, ``classifier``): what runs now, or None; loads the model if needed."""
        out: Dict[str, Optional[ModelInfo]] = {}
        for kind in (ENCODER, CLASSIFIER):
            model, installed = self.model(kind), self.store.current(kind)
            out[kind] = (
                None
                if model is None
                else ModelInfo(
                    kind,
                    model.path,
                    model.sha256,
                    model.runtime,
                    model.meta.feature_dim,
                    list(model.meta.labels or []),
                    *((installed.version, installed.name, installed.artifact_id) if installed is not None else ()),
                )
            )
        return out

    def rollback(self, kind: str = CLASSIFIER) -> InstalledModel:
        """Make the previous model of ``kind`` current again and tell the cloud."""
        restored = self.store.rollback(kind)
        self.transport.set_online((device_status(self.device_id), self._status_payload(), True))
        self._emit("rolled_back", kind=kind, artifact_id=restored.artifact_id, version=restored.version)
        return restored

    # ---- message handling (worker thread) ----------------------------------------------------------

    def _enqueue(self, topic: str, payload: bytes) -> None:
        try:
            self._queue.put_nowait((topic, payload))
        except queue.Full:  # the cloud resends what matters (manifests, chunks) on its timeout
            LOG.warning("inbox queue full: dropped a %d-byte message", len(payload))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self.handle(*item)
            except Exception:  # handle() does not raise; this is the last line of defence
                LOG.exception("unexpected failure handling a message on %s", clean(item[0]))

    def handle(self, topic: str, payload: bytes) -> None:
        """Handle one inbox message (public for tests and for apps that bring their own transport).

        Never raises: a message that fails its checks is rejected, one whose handling fails in a
        way no check foresaw (a bug) is dropped; both are logged (topic and reason escaped and
        cut) and counted in ``stats.dropped``, and the agent goes on with the next message.
        """
        try:
            self._handle(topic, payload)
        except Exception as exc:  # noqa: BLE001 - one message must never stop the agent
            self.stats.dropped += 1
            LOG.warning(
                "dropped a message on %s: unexpected %s: %s", clean(topic), exc.__class__.__name__, clean(str(exc), 300)
            )
            LOG.debug("traceback of the dropped message", exc_info=True)
            self._emit("rejected", topic=topic, reason=f"internal error ({exc.__class__.__name__})")

    def _handle(self, topic: str, payload: bytes) -> None:
        self.stats.messages_in += 1
        self.stats.bytes_in += len(payload)
        try:
            msg = decode_for_device(self.device_id, topic, payload)
        except MessageError as err:
            self.stats.rejected += 1
            self.stats.dropped += 1
            LOG.warning("dropped a message on %s: %s", clean(topic), clean(str(err), 300))
            self._emit("rejected", topic=topic, reason=str(err))
            return
        if isinstance(msg, Probe):
            self._on_probe(msg)
        elif isinstance(msg, (ArtifactManifest, ArtifactChunk)):
            self._on_delivery(msg)
        elif isinstance(msg, KeyUpdate):
            self._on_key_update(msg)
        elif isinstance(msg, LabelQuery):
            self._on_label_query(msg)

    def _on_probe(self, probe: Probe) -> None:
        try:  # before anything else: a forged probe must cost neither a private image nor budget
            verify_probe(probe, self.trust, self.accept_unsigned)
        except SignatureError as err:
            self.stats.rejected += 1
            self.stats.dropped += 1
            LOG.warning("dropped probe %s: %s [%s]", clean(probe.probe_id), clean(str(err), 300), err.code)
            self._emit("probe_rejected", probe_id=probe.probe_id, code=err.code, reason=str(err))
            return
        try:
            check_probe_conflict(probe, self.ledger)
            if probe.deadline is not None and time.time() > probe.deadline:
                raise DeadlinePassed(
                    f"probe {probe.probe_id} arrived {time.time() - probe.deadline:.0f}s after its deadline"
                )
            encoder = self.model(ENCODER)
            if encoder is None:
                raise ArtifactError("no encoder on this device: set [models] encoder or deliver one")
            check_compatible(probe, encoder)  # before touching a single private image
            _, result = answer_probe(
                probe,
                encoder,
                self._local_features(encoder),
                self.ledger,
                epsilon=self.config.privacy.epsilon,
                sigma=self.config.privacy.sigma,
                commit=self._publish_out,
                trust=self.trust,
                accept_unsigned=self.accept_unsigned,
            )
        except EcosError as err:  # a ledger that cannot be written (disk full, read-only) too: a typed refusal
            level = logging.WARNING if isinstance(err, (LedgerUnavailable, LedgerCorrupt)) else logging.INFO
            LOG.log(level, "refused probe %s: %s", clean(probe.probe_id), clean(str(err), 300))
            self._send(Refusal(probe.probe_id, self.device_id, err.code, self._public_reason(err)))
            self._emit("probe_refused", probe_id=probe.probe_id, code=err.code, reason=str(err))
            return
        self._emit(
            "probe_answered",
            probe_id=probe.probe_id,
            repeated=result.repeated,
            charged_epsilon=result.charged_epsilon,
            spent_epsilon=result.spent_epsilon,
        )

    def _on_label_query(self, query: LabelQuery) -> None:
        """Automated client labelling: vote with the labelled folder, within the ledger (as a probe)."""
        try:  # before anything else: a forged query must cost neither a private image nor budget
            verify_label_query(query, self.trust, self.accept_unsigned)
        except SignatureError as err:
            self.stats.rejected += 1
            self.stats.dropped += 1
            LOG.warning("dropped label query %s: %s [%s]", clean(query.id), clean(str(err), 300), err.code)
            self._emit("label_query_rejected", query_id=query.id, code=err.code, reason=str(err))
            return
        try:
            check_query_conflict(query, self.ledger)
            if query.deadline is not None and time.time() > query.deadline:
                raise DeadlinePassed(
                    f"label query {query.id} arrived {time.time() - query.deadline:.0f}s after its deadline"
                )
            features, labels = self._labelled_features(query)
            unknown = sorted(set(labels) - set(query.labels))
            if unknown:  # the local log only: the device's label names never go to the cloud
                LOG.warning(
                    "label query %s: %d local label(s) are not among its labels and do not vote: %s",
                    clean(query.id),
                    len(unknown),
                    clean(", ".join(unknown[:10]), 300),
                )
            votes, result = answer_label_query(
                query,
                query.feature_space,
                features,
                labels,
                self.ledger,
                epsilon=self.config.privacy.epsilon_per_label_query,
                commit=self._publish_out,  # called only once the release is charged to the ledger
            )
        except EcosError as err:
            level = logging.WARNING if isinstance(err, (LedgerUnavailable, LedgerCorrupt)) else logging.INFO
            LOG.log(level, "refused label query %s: %s", clean(query.id), clean(str(err), 300))
            self._send(Refusal(query.id, self.device_id, err.code, self._public_reason(err)))
            self._emit("label_query_refused", query_id=query.id, code=err.code, reason=str(err))
            return
        self._emit(
            "label_query_answered",
            query_id=query.id,
            repeated=result.repeated,
            queries=query.n_queries,
            voters=len(labels),
            charged_epsilon=result.charged_epsilon,
            spent_epsilon=result.spent_epsilon,
        )

    def _labelled_features(self, query: LabelQuery) -> Tuple[np.ndarray, List[str]]:
        """Features (in the query's feature space) and labels of the ``[data] labelled`` images."""
        folder = self.config.data.labelled
        if not folder:
            raise InputError("no labelled images to vote with: set [data] labelled (a <label>/<image> folder)")
        if query.feature_space != THUMB16:
            encoder = self.model(ENCODER)
            if encoder is None:
                raise ArtifactError("no encoder on this device: set [models] encoder or deliver one")
            if encoder.sha256 != query.feature_space:
                raise MismatchError(
                    f"the label query was made for encoder {query.feature_space[:12]}..., "
                    f"this device runs {encoder.sha256[:12]}..."
                )
        items = [it for it in scan_image_folder(folder) if it.label]
        if not items:
            raise InputError(f"{folder}: no labelled images (labels are the names of the images' parent folders)")
        if query.feature_space == THUMB16:
            features = thumbnail_features(load_images([it.path for it in items], THUMB_SIZE))
        else:
            features = encode_items(encoder, items, self.config.data.batch_size)
        return features, [it.label for it in items]

    def _public_reason(self, err: EcosError) -> str:
        """What a refusal tells the cloud: the error without this device's local paths (the log keeps them)."""
        text = getattr(err, "public", None) or str(err)
        c = self.config
        for path, name in (
            (c.privacy.ledger, "<ledger>"),
            (c.data.local, "<data.local>"),
            (c.data.eval, "<data.eval>"),
            (c.data.labelled, "<data.labelled>"),
            (c.models.store, "<models.store>"),
            (c.models.encoder, "<models.encoder>"),
        ):
            if path:
                text = text.replace(os.path.abspath(path), name).replace(str(path), name)
        return clip_reason(_LOCAL_PATH.sub("<path>", text))

    def _on_key_update(self, update: KeyUpdate) -> None:
        """Apply a signed key update; republish the status (it lists the trusted key ids) if it changed."""
        try:
            result = self.trust.apply(update)
        except EcosError as err:
            self.stats.rejected += 1
            self.stats.dropped += 1
            LOG.warning("refused key update %d: %s [%s]", update.serial, clean(str(err), 300), err.code)
            self._emit("key_update_refused", serial=update.serial, code=err.code, reason=str(err))
            return
        if not result.applied:
            LOG.debug("key update %d already applied (serial %d)", update.serial, result.serial)
            return
        LOG.info(
            "key update %d applied: trusted %s, revoked %s",
            update.serial,
            self.trust.key_ids,
            sorted(self.trust.revoked),
        )
        self.transport.set_online((device_status(self.device_id), self._status_payload(), True))
        self._emit(
            "keys_updated", serial=result.serial, added=result.added, removed=result.revoked, trusted=self.trust.key_ids
        )

    def _local_features(self, encoder: Model) -> np.ndarray:
        """Features of the data source's images, cached per encoder and source content (``DataSource.key``)."""
        source_key = self.data_source.key()
        key = None if source_key is None else (encoder.sha256, source_key)
        if key is not None and key in self._features:
            return self._features[key]
        features = encode_source(encoder, self.data_source, self.config.data.batch_size)
        if len(features) == 0:
            raise InputError(f"no local images: {self.data_source!r} gave none")
        self._features = {} if key is None else {key: features}
        return features

    def _on_delivery(self, msg: Message) -> None:
        for reply in self.receiver.handle(msg):
            self._send(reply)
            if isinstance(reply, Installed):
                self.transport.set_online((device_status(self.device_id), self._status_payload(), True))
                self._emit(
                    "installed",
                    artifact_id=reply.artifact_id,
                    version=reply.version,
                    accuracy=reply.accuracy,
                    n_eval=reply.n_eval,
                )
            elif isinstance(reply, InstallFailed):
                self._emit("install_failed", artifact_id=reply.artifact_id, code=reply.code, reason=reply.reason)

    # ---- delivery hooks --------------------------------------------------------------------------

    def _validate(self, path: str, manifest: ArtifactManifest) -> None:
        """Refuse a verified file the runtime cannot load, or whose metadata is not the manifest's."""
        model = load_model(path, self.config.models.runtime, self.config.models.threads)
        expected = manifest.artifact_meta
        if (model.meta.kind, model.meta.input_shape) != (expected.kind, expected.input_shape):
            raise ArtifactError(
                f"model metadata ({model.meta.kind}, {model.meta.input_shape}) differs from the "
                f"manifest's ({expected.kind}, {expected.input_shape})"
            )

    def _evaluate(self, installed: InstalledModel) -> Tuple[Optional[float], int]:
        """Accuracy of an installed classifier on the labelled eval folder, or (None, 0)."""
        folder = self.config.data.eval
        if installed.kind != CLASSIFIER or folder is None:
            return None, 0
        skipped: List[Tuple[str, str]] = []  # unreadable files cost themselves, not the whole report
        try:
            predictor = self.predictor()
            items = scan_image_folder(folder)
            result = evaluate(
                predictor.predict_items(items, batch=self.config.data.batch_size, unreadable=skipped), predictor.labels
            )
        except (EcosError, OSError) as err:
            LOG.warning("could not evaluate %s on %s: %s", installed.artifact_id, folder, err)
            return None, 0
        log_unreadable(LOG, folder, skipped)
        return (result.accuracy if result.labelled else None), result.labelled

    # ---- sending -----------------------------------------------------------------------------------

    def _publish_out(self, payload: bytes) -> None:
        self.transport.publish(outbox(self.device_id), payload, qos=1)
        self.stats.messages_out += 1
        self.stats.bytes_out += len(payload)

    def _send(self, msg: Message) -> None:
        self._publish_out(msg.to_bytes())

    def _status_payload(self) -> bytes:
        refs = {
            kind: (m.ref() if m is not None else None)
            for kind, m in ((CLASSIFIER, self.store.current(CLASSIFIER)), (ENCODER, self.store.current(ENCODER)))
        }
        return Status(self.device_id, "online", refs[CLASSIFIER], refs[ENCODER], keys=self.trust.key_ids).to_bytes()

    def _emit(self, kind: str, **detail: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(AgentEvent(kind, detail))
        except Exception:  # an app's callback bug must not break the protocol
            LOG.exception("on_event callback failed on %s", kind)
