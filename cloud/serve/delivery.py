"""The cloud's end of artifact delivery: a signed manifest, then chunks paced by the device's acks.

``build_manifest`` hashes an artifact file (whole and per chunk), names who may install it
(``targets``: device ids, or ``fleet:<id>``) and signs the manifest with the cloud's current
Ed25519 key (the signature carries its key id). ``ArtifactSender`` sends one artifact to one device: the manifest, then
chunks from the device's ``next_chunk`` with at most ``window`` unacknowledged, and on a
timeout the manifest again plus the window from the last ack (the device answers a manifest
with its resume point, so a device that restarted, or lost chunks when the broker restarted,
gets exactly what it lacks). The device's persisted chunks are the source of truth: a daemon
that was killed only needs the manifest (``manifest.to_bytes()``) and the file to build a new
sender, and may pass the last ``acked`` it stored to skip a round trip.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from pathlib import Path
from typing import Any, Dict, Optional, Protocol, Sequence, Union

from cloud.security.keys import SigningKey, as_signer
from device_sdk.errors import ArtifactError, UsageError
from device_sdk.fsutil import PathLike
from device_sdk.protocol import (
    DEFAULT_CHUNK_SIZE,
    FORMATS,
    Ack,
    ArtifactChunk,
    ArtifactManifest,
    Installed,
    InstallFailed,
    inbox,
)
from device_sdk.protocol.envelope import parse_json
from device_sdk.runtime.artifact import META_KEY

LOG = logging.getLogger("ecos.cloud.serve.delivery")


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Any: ...


def build_manifest(
    artifact_path: PathLike,
    signer: Union[SigningKey, PathLike],
    *,
    name: str,
    version: int,
    targets: Sequence[str],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    meta: Optional[Dict[str, Any]] = None,
    artifact_id: Optional[str] = None,
) -> ArtifactManifest:
    """The signed manifest of one artifact file.

    ``signer`` is a ``cloud.security.keys.SigningKey`` (or the path of a private key). ``targets`` lists
    the device ids that may install it (or ``fleet:<fleet id>``); ``version`` must be above
    every version of the same kind already delivered to those devices, or they refuse it.
    ``meta`` defaults to the artifact's ``.json`` sidecar (written by the exporters), else the
    metadata embedded in an ONNX file. The default ``artifact_id`` is derived from name, version
    and content, so rebuilding the manifest after a restart gives the same id.
    """
    path = Path(artifact_path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise UsageError(f"{path}: cannot deliver a {path.suffix!r} file (formats: {', '.join(FORMATS)})")
    whole, chunk_hashes, size = hashlib.sha256(), [], 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            whole.update(block)
            chunk_hashes.append(hashlib.sha256(block).hexdigest())
            size += len(block)
    digest = whole.hexdigest()
    meta = dict(meta) if meta is not None else _read_meta(path, digest)
    if artifact_id is None:
        artifact_id = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:40]}-v{version}-{digest[:12]}"
    if isinstance(targets, str) or not targets:
        raise UsageError(f"targets must be a non-empty list of device ids (or fleet:<id>), got {targets!r}")
    manifest = ArtifactManifest(
        artifact_id,
        name,
        int(version),
        fmt,
        str(meta.get("precision", "fp32")),
        size,
        digest,
        chunk_size,
        chunk_hashes,
        meta,
        targets=sorted(set(targets)),
    )
    manifest.to_bytes()  # schema check before signing: never sign something a device must reject
    return manifest.signed_by(as_signer(signer))


def _read_meta(path: Path, digest: str) -> Dict[str, Any]:
    """The artifact's metadata from its sidecar or its ONNX metadata; any defect is a typed error."""
    sidecar = Path(str(path) + ".json")
    if sidecar.exists():
        doc = parse_json(sidecar.read_bytes(), str(sidecar), UsageError)
        if not isinstance(doc, dict) or not isinstance(doc.get("meta"), dict):
            raise UsageError(f"{sidecar} is not an artifact sidecar (no 'meta' object); re-export it")
        if doc.get("sha256") != digest:
            raise UsageError(
                f"{sidecar} describes another file (sha256 {str(doc.get('sha256'))[:12]}...); re-export it"
            )
        return dict(doc["meta"])
    if path.suffix.lower() == ".onnx":
        import onnx

        try:
            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception as exc:  # noqa: BLE001 - protobuf raises its own types for a damaged file
            raise ArtifactError(f"{path}: not a readable ONNX file ({exc.__class__.__name__})") from None
        if META_KEY in props:
            meta = parse_json(props[META_KEY], f"{path}: metadata", ArtifactError)
            if not isinstance(meta, dict):
                raise ArtifactError(f"{path}: its ECOS metadata is not a JSON object")
            return meta
    raise UsageError(f"{path}: no metadata (no {sidecar.name} sidecar and none embedded); pass meta=")


def read_chunk(artifact_path: PathLike, manifest: ArtifactManifest, index: int) -> bytes:
    with open(artifact_path, "rb") as fh:
        fh.seek(index * manifest.chunk_size)
        return fh.read(manifest.chunk_size)


class ArtifactSender:
    """Delivers one artifact to one device; the daemon feeds it acks/results and clock ticks.

    ``done`` turns true on the device's ``installed`` (``outcome == "installed"``) or
    ``install_failed`` (``"install_failed"``), or after ``max_attempts`` timeouts without
    progress (``"timeout"``; ``None`` retries forever). ``acked`` is the device's last
    ``next_chunk``: what a daemon persists to resume a delivery after a restart. Not thread-safe:
    call it from one thread (the daemon's loop), not from MQTT callbacks.
    """

    def __init__(
        self,
        transport: Publisher,
        device_id: str,
        artifact_path: PathLike,
        manifest: ArtifactManifest,
        *,
        window: int = 8,
        timeout: float = 10.0,
        max_attempts: Optional[int] = 10,
        acked: int = 0,
    ):
        if window < 1 or timeout <= 0:
            raise UsageError(f"window must be >= 1 and timeout > 0 (got {window}, {timeout})")
        self.transport, self.device_id, self.artifact_path, self.manifest = (
            transport,
            device_id,
            artifact_path,
            manifest,
        )
        self.window, self.timeout, self.max_attempts = window, timeout, max_attempts
        self.acked = self._next_to_send = min(max(0, acked), manifest.n_chunks)
        self.attempts, self.bytes_sent, self.chunks_sent = 0, 0, 0
        self.outcome: Optional[str] = None
        self.result: Optional[Union[Installed, InstallFailed]] = None
        self._last_progress = 0.0

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def start(self, now: Optional[float] = None) -> None:
        """Send the manifest and the first window (from ``acked``)."""
        self._last_progress = _now(now)
        self._send_manifest()
        self._pump()

    def on_ack(self, ack: Ack, now: Optional[float] = None) -> None:
        if self.done or not self._mine(ack) or ack.next_chunk > self.manifest.n_chunks:
            return
        if ack.next_chunk < self.acked:  # the device lost chunks (e.g. its disk was wiped): start over there
            LOG.warning(
                "%s: %s went back from chunk %d to %d",
                self.manifest.artifact_id,
                self.device_id,
                self.acked,
                ack.next_chunk,
            )
            self._next_to_send = ack.next_chunk
        self.acked = ack.next_chunk
        self._next_to_send = max(self._next_to_send, self.acked)
        self._last_progress = _now(now)
        self._pump()

    def on_result(self, msg: Union[Installed, InstallFailed]) -> None:
        if self.done or not self._mine(msg):
            return
        self.result = msg
        self.outcome = "installed" if isinstance(msg, Installed) else "install_failed"
        LOG.info(
            "%s -> %s: %s (%d chunks, %d bytes sent)",
            self.manifest.artifact_id,
            self.device_id,
            self.outcome,
            self.chunks_sent,
            self.bytes_sent,
        )

    def tick(self, now: Optional[float] = None) -> None:
        """Call periodically: after ``timeout`` without progress, resend manifest and window from ``acked``."""
        now = _now(now)
        if self.done or now - self._last_progress < self.timeout:
            return
        self.attempts += 1
        if self.max_attempts is not None and self.attempts > self.max_attempts:
            self.outcome = "timeout"
            LOG.warning(
                "%s -> %s: gave up after %d timeouts", self.manifest.artifact_id, self.device_id, self.max_attempts
            )
            return
        LOG.info(
            "%s -> %s: no progress for %.1fs, resending from chunk %d",
            self.manifest.artifact_id,
            self.device_id,
            now - self._last_progress,
            self.acked,
        )
        self._last_progress = now
        self._next_to_send = self.acked
        self._send_manifest()
        self._pump()

    def _mine(self, msg: Union[Ack, Installed, InstallFailed]) -> bool:
        return msg.device_id == self.device_id and msg.artifact_id == self.manifest.artifact_id

    def _send_manifest(self) -> None:
        self._publish(self.manifest.to_bytes())

    def _pump(self) -> None:
        stop = min(self.acked + self.window, self.manifest.n_chunks)
        while self._next_to_send < stop:
            index = self._next_to_send
            data = read_chunk(self.artifact_path, self.manifest, index)
            self._publish(ArtifactChunk(self.manifest.artifact_id, index, data).to_bytes())
            self.chunks_sent += 1
            self._next_to_send += 1

    def _publish(self, payload: bytes) -> None:
        self.transport.publish(inbox(self.device_id), payload, qos=1)
        self.bytes_sent += len(payload)


def _now(now: Optional[float]) -> float:
    return time.monotonic() if now is None else now
