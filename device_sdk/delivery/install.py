"""The device's end of artifact delivery: receive, verify, install atomically, roll back.

``ModelStore`` is a folder::

    state.json                       {"slots": {kind: {"current": {...}, "previous": {...}, "max_version": n}}}
    models/<kind>-<sha256[:16]>.<ext> the installed files (only current and previous are kept)
    incoming/<artifact_id>/          manifest.msg and chunk-<index> files of a transfer in progress

One slot per artifact kind (``encoder``, ``classifier``) so a new encoder does not displace the
classifier. Installing is one ``os.replace`` of the model file and one of ``state.json``: a
reader, or a device that loses power, sees the old model or the new one, never a mix, and the
old one stays as ``previous`` to roll back to (its file is kept until the new one is installed;
only a model older than both is deleted). ``max_version`` is the highest version ever installed
in the slot: a version only goes up per device and slot.

``DeliveryReceiver`` turns manifests and chunks into replies. The manifest's signature (by a
trusted, unrevoked key: ``unsigned``, ``unknown_key``, ``revoked_key``, ``bad_signature``) and
its target (this device, or a fleet it is configured in: ``wrong_target``) are checked before
any chunk is accepted (so no bandwidth or disk is spent on an artifact not for this device),
then its version (above ``max_version``: ``stale_version``), every chunk against its signed
sha256, the reassembled file against the signed size and sha256, and the signature once more
right before installing (a key revoked meanwhile). Chunks are persisted as they arrive, so a
device that restarts resumes from the first chunk it lacks.

Over 400 lines on purpose: the receiver and the model store share one on-disk layout and one
atomic install/rollback; reading them apart would hide how a half-received model never runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from device_sdk.errors import (
    ArtifactRejected,
    ChunkError,
    DeliveryError,
    EcosError,
    HashMismatch,
    MessageError,
    StaleVersion,
    UsageError,
    WrongTarget,
)
from device_sdk.fsutil import PathLike, atomic_write_bytes, atomic_write_text
from device_sdk.logsafe import clean
from device_sdk.protocol import Ack, ArtifactChunk, ArtifactManifest, Installed, InstallFailed, Message, clip_reason
from device_sdk.protocol.envelope import read_json_file
from device_sdk.signing import as_trust_store

LOG = logging.getLogger("ecos.delivery")
DEFAULT_MAX_ARTIFACT_BYTES = 256 << 20
EXTENSIONS = {"onnx": ".onnx", "tflite": ".tflite"}
Validator = Callable[[str, ArtifactManifest], None]
Evaluator = Callable[["InstalledModel"], Tuple[Optional[float], int]]


@dataclass(frozen=True)
class InstalledModel:
    """One installed artifact: where its file is and what the signed manifest said about it."""

    kind: str
    artifact_id: str
    name: str
    version: int
    sha256: str
    format: str
    path: str
    installed_utc: str

    def ref(self) -> Dict[str, Any]:
        """The ``{artifact_id, version, ...}`` reference a status message carries."""
        return {"artifact_id": self.artifact_id, "version": self.version, "name": self.name, "sha256": self.sha256}


class ModelStore:
    """Installed models per kind, with ``current`` and ``previous``; see the module docstring."""

    def __init__(self, root: PathLike):
        self.root = Path(root)
        self.state_path = self.root / "state.json"
        self.models_dir = self.root / "models"
        self.incoming_dir = self.root / "incoming"

    def _state(self) -> Dict[str, Any]:
        """The parsed ``state.json``; a file that is not exactly its schema is a ``MessageError``."""
        if not self.state_path.exists():
            return {"slots": {}}
        source = f"model store state {self.state_path}"
        state = read_json_file(self.state_path, source)
        problem = _state_problem(state)
        if problem is not None:
            raise MessageError(f"{source} is unreadable ({problem})")
        return state

    def _slot(self, kind: str, which: str) -> Optional[InstalledModel]:
        record = self._state()["slots"].get(kind, {}).get(which)
        return None if record is None else InstalledModel(**record)

    def current(self, kind: str) -> Optional[InstalledModel]:
        return self._slot(kind, "current")

    def previous(self, kind: str) -> Optional[InstalledModel]:
        return self._slot(kind, "previous")

    def kinds(self) -> List[str]:
        return sorted(self._state()["slots"])

    def max_version(self, kind: str) -> Optional[int]:
        """The highest version ever installed in ``kind``'s slot (None before the first install)."""
        return _max_version(self._state()["slots"].get(kind, {}))

    def install(self, manifest: ArtifactManifest, staged: Path) -> InstalledModel:
        """Move a verified file into the store and make it current; the old current becomes previous."""
        kind = manifest.artifact_meta.kind
        dest = self.models_dir / f"{kind}-{manifest.sha256[:16]}{EXTENSIONS[manifest.format]}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, dest)
        record = InstalledModel(
            kind,
            manifest.artifact_id,
            manifest.name,
            manifest.version,
            manifest.sha256,
            manifest.format,
            str(dest.resolve()),
            datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        state = self._state()
        slot = state["slots"].get(kind, {})
        old = slot.get("current")
        keep_old = old is not None and old["sha256"] != manifest.sha256
        high = max(v for v in (_max_version(slot), manifest.version) if v is not None)
        state["slots"][kind] = {
            "current": asdict(record),
            "previous": old if keep_old else slot.get("previous"),
            "max_version": high,
        }
        self._write(state)
        return record

    def rollback(self, kind: str) -> InstalledModel:
        """Swap ``current`` and ``previous`` of ``kind``; the model rolled back from stays as previous."""
        state = self._state()
        slot = state["slots"].get(kind, {})
        if slot.get("previous") is None:
            raise UsageError(f"no previous {kind} model to roll back to in {self.root}")
        state["slots"][kind] = {
            "current": slot["previous"],
            "previous": slot["current"],
            "max_version": _max_version(slot),
        }
        self._write(state)
        return InstalledModel(**slot["previous"])

    def _write(self, state: Dict[str, Any]) -> None:
        atomic_write_text(self.state_path, json.dumps(state, indent=2, sort_keys=True) + "\n")
        self._prune(state)

    def _prune(self, state: Dict[str, Any]) -> None:
        """Delete model files that are neither current nor previous of any slot."""
        keep = {
            Path(slot[which]["path"]).name
            for slot in state["slots"].values()
            for which in ("current", "previous")
            if slot.get(which) is not None
        }
        for path in self.models_dir.glob("*"):
            if path.name not in keep:
                path.unlink()


_RECORD_FIELDS = frozenset(f.name for f in fields(InstalledModel))


def _max_version(slot: Dict[str, Any]) -> Optional[int]:
    """A slot's ``max_version``; for a state written before it, the larger of current and previous."""
    if slot.get("max_version") is not None:
        return slot["max_version"]
    versions = [slot[w]["version"] for w in ("current", "previous") if slot.get(w) is not None]
    return max(versions) if versions else None


def _state_problem(state: Any) -> Optional[str]:
    """What makes a parsed ``state.json`` unusable, or None."""
    if not isinstance(state, dict) or not isinstance(state.get("slots"), dict):
        return "no 'slots' object"
    for kind, slot in state["slots"].items():
        if not isinstance(slot, dict) or not set(slot) <= {"current", "previous", "max_version"}:
            return f"slot {clean(kind, 40)} is not an object of current/previous/max_version"
        high = slot.get("max_version")
        if high is not None and (not isinstance(high, int) or isinstance(high, bool) or high < 0):
            return f"{clean(kind, 40)}.max_version is not a version number"
        for which in ("current", "previous"):
            record = slot.get(which)
            if record is not None and not _record_ok(record):
                return f"{clean(kind, 40)}.{which} is not an installed-model record"
    return None


def _record_ok(record: Any) -> bool:
    if not isinstance(record, dict) or set(record) != _RECORD_FIELDS:
        return False
    version = record["version"]
    return (
        isinstance(version, int)
        and not isinstance(version, bool)
        and all(isinstance(v, str) for k, v in record.items() if k != "version")
    )


@dataclass
class _Transfer:
    manifest: ArtifactManifest
    folder: Path
    have: Set[int]
    next_chunk: int = 0

    def advance(self) -> int:
        while self.next_chunk in self.have:
            self.next_chunk += 1
        return self.next_chunk


class DeliveryReceiver:
    """Handles ``artifact_manifest`` and ``artifact_chunk`` messages for one device.

    ``validate(path, manifest)`` may refuse a verified file before it is installed (e.g. the
    runtime cannot load it) by raising an ``EcosError``; ``evaluate(installed)`` returns the
    ``(accuracy, n_eval)`` reported in the ``installed`` reply.

    ``trust`` is a ``TrustStore`` or ``DeviceTrust`` (a bare Ed25519 public key is accepted as
    a one-key store); ``fleets`` are the fleet ids this device accepts ``fleet:<id>`` targets of;
    ``allow_downgrade`` (development only) lets a version that is not above the slot's highest in.
    """

    def __init__(
        self,
        store: ModelStore,
        trust: Any,
        device_id: str,
        *,
        max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
        formats: Tuple[str, ...] = ("onnx",),
        allow_downgrade: bool = False,
        validate: Optional[Validator] = None,
        evaluate: Optional[Evaluator] = None,
        fleets: Sequence[str] = (),
    ):
        self.store, self.trust, self.device_id, self.fleets = store, as_trust_store(trust), device_id, tuple(fleets)
        self.max_bytes, self.formats, self.allow_downgrade = max_bytes, formats, allow_downgrade
        self.validate, self.evaluate = validate, evaluate
        self._transfers: Dict[str, _Transfer] = {}

    def handle(self, msg: Message) -> List[Message]:
        """The replies to publish for one message (possibly none)."""
        if isinstance(msg, ArtifactManifest):
            return self.on_manifest(msg)
        if isinstance(msg, ArtifactChunk):
            return self.on_chunk(msg)
        raise TypeError(f"not a delivery message: {type(msg).__name__}")

    def on_manifest(self, manifest: ArtifactManifest) -> List[Message]:
        try:
            self._authenticate(manifest)
            installed = self._installed_as_current(manifest)
            if installed is not None:  # a repeat after the cloud missed our report: report again
                return [self._installed_reply(installed)]
            self._policy(manifest)
        except DeliveryError as err:
            return [self._failed(manifest.artifact_id, err)]
        transfer = self._transfer(manifest.artifact_id)
        if transfer is None or transfer.manifest.signed_bytes() != manifest.signed_bytes():
            transfer = self._begin(manifest)
        return self._progress(transfer)

    def on_chunk(self, chunk: ArtifactChunk) -> List[Message]:
        transfer = self._transfer(chunk.artifact_id)
        if transfer is None or chunk.index >= transfer.manifest.n_chunks:
            LOG.info("ignoring chunk %d of %s: no manifest for it here", chunk.index, chunk.artifact_id)
            return []
        if chunk.index not in transfer.have:
            if hashlib.sha256(chunk.data).hexdigest() != transfer.manifest.chunk_sha256[chunk.index]:
                self._abandon(chunk.artifact_id)
                return [
                    self._failed(chunk.artifact_id, ChunkError(f"chunk {chunk.index} does not match its signed sha256"))
                ]
            # No fsync or rename: a chunk torn by a power cut fails its hash on resume and is fetched again.
            (transfer.folder / f"chunk-{chunk.index:06d}").write_bytes(chunk.data)
            transfer.have.add(chunk.index)
        return self._progress(transfer)

    # ---- steps -----------------------------------------------------------------------------

    def _admit(self, manifest: ArtifactManifest) -> None:
        """Signature, target and policy checks, before a single chunk is accepted."""
        self._authenticate(manifest)
        self._policy(manifest)

    def _authenticate(self, manifest: ArtifactManifest) -> None:
        """Signed by a trusted, unrevoked key, and for this device (or one of its fleets)."""
        self.trust.verify(
            manifest.signed_bytes(), manifest.key_id, manifest.signature, f"manifest {manifest.artifact_id}"
        )
        if not manifest.is_for(self.device_id, self.fleets):
            named = (
                ", ".join(manifest.targets[:3]) + (", ..." if len(manifest.targets) > 3 else "")
                if manifest.targets
                else "no target (a manifest from before targets)"
            )
            raise WrongTarget(f"{manifest.artifact_id} is for {clean(named, 200)}, not for {self.device_id}")

    def _policy(self, manifest: ArtifactManifest) -> None:
        if manifest.format not in self.formats:
            raise ArtifactRejected(f"format {manifest.format!r} is not supported here ({', '.join(self.formats)})")
        if manifest.size > self.max_bytes:
            raise ArtifactRejected(f"{manifest.size} bytes is over this device's limit of {self.max_bytes}")
        kind = manifest.artifact_meta.kind
        high = self.store.max_version(kind)
        if high is not None and manifest.version <= high and not self.allow_downgrade:
            raise StaleVersion(
                f"{manifest.name} v{manifest.version} is not above v{high}, the highest {kind} "
                "version installed here (a replayed or older model)"
            )

    def _begin(self, manifest: ArtifactManifest) -> _Transfer:
        """Start (or restart) a transfer; other transfers of the same kind are dropped."""
        kind = manifest.artifact_meta.kind
        for other in [t for t in self._transfers.values() if t.manifest.artifact_meta.kind == kind]:
            self._abandon(other.manifest.artifact_id)
        folder = self.store.incoming_dir / manifest.artifact_id
        shutil.rmtree(folder, ignore_errors=True)
        atomic_write_bytes(folder / "manifest.msg", manifest.to_bytes())
        transfer = self._transfers[manifest.artifact_id] = _Transfer(manifest, folder, set())
        return transfer

    def _transfer(self, artifact_id: str) -> Optional[_Transfer]:
        """The transfer in memory, or one resumed from disk after a restart (chunks re-verified)."""
        if artifact_id in self._transfers:
            return self._transfers[artifact_id]
        folder = self.store.incoming_dir / artifact_id
        try:
            manifest = ArtifactManifest.from_bytes((folder / "manifest.msg").read_bytes(), str(folder))
            self._admit(manifest)
        except (OSError, EcosError) as exc:
            LOG.debug("no resumable transfer %s: %s", clean(artifact_id), clean(str(exc), 500))
            return None
        have = {
            i for i, digest in enumerate(manifest.chunk_sha256) if _file_sha256(folder / f"chunk-{i:06d}") == digest
        }
        LOG.info("resuming %s from disk: %d of %d chunks already here", artifact_id, len(have), manifest.n_chunks)
        transfer = self._transfers[artifact_id] = _Transfer(manifest, folder, have)
        return transfer

    def _progress(self, transfer: _Transfer) -> List[Message]:
        manifest = transfer.manifest
        next_chunk = transfer.advance()
        if next_chunk < manifest.n_chunks:
            return [Ack(self.device_id, manifest.artifact_id, next_chunk)]
        try:
            installed = self._install(transfer)
        except EcosError as err:
            self._abandon(manifest.artifact_id)
            return [self._failed(manifest.artifact_id, err)]
        self._abandon(manifest.artifact_id)
        return [Ack(self.device_id, manifest.artifact_id, next_chunk), self._installed_reply(installed)]

    def _install(self, transfer: _Transfer) -> InstalledModel:
        manifest = transfer.manifest
        staged = transfer.folder / f"artifact{EXTENSIONS[manifest.format]}"
        digest, size = hashlib.sha256(), 0
        with open(staged, "wb") as out:
            for i in range(manifest.n_chunks):
                data = (transfer.folder / f"chunk-{i:06d}").read_bytes()
                digest.update(data)
                size += len(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if size != manifest.size or digest.hexdigest() != manifest.sha256:
            raise HashMismatch(
                f"reassembled {size} bytes with sha256 {digest.hexdigest()[:12]}..., "
                f"manifest says {manifest.size} bytes, {manifest.sha256[:12]}..."
            )
        if self.validate is not None:
            self.validate(str(staged), manifest)
        self._admit(manifest)  # again: a key revoked, or a newer model installed, since the transfer began
        installed = self.store.install(manifest, staged)
        LOG.info("installed %s %s v%d (%s)", installed.kind, manifest.name, manifest.version, manifest.artifact_id)
        return installed

    def _abandon(self, artifact_id: str) -> None:
        self._transfers.pop(artifact_id, None)
        shutil.rmtree(self.store.incoming_dir / artifact_id, ignore_errors=True)

    def _installed_as_current(self, manifest: ArtifactManifest) -> Optional[InstalledModel]:
        current = self.store.current(manifest.artifact_meta.kind)
        same = current is not None and current.artifact_id == manifest.artifact_id and current.sha256 == manifest.sha256
        return current if same else None

    def _installed_reply(self, installed: InstalledModel) -> Installed:
        accuracy, n_eval = self.evaluate(installed) if self.evaluate is not None else (None, 0)
        return Installed(self.device_id, installed.artifact_id, installed.version, installed.sha256, accuracy, n_eval)

    def _failed(self, artifact_id: str, err: EcosError) -> InstallFailed:
        LOG.warning("refused artifact %s: %s", clean(artifact_id), clean(str(err), 500))
        return InstallFailed(self.device_id, artifact_id, err.code, clip_reason(str(err)))


def _file_sha256(path: Path) -> Optional[str]:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
