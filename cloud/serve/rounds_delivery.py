"""The last two stages of a round: signing the trained model and delivering it in chunks.

Part of ``Daemon`` like the other stages (cloud/serve/rounds.py): signing makes one artifact per
round (a retried stage finds the first), delivering keeps each device's acknowledged chunk in the
store, so a restarted daemon re-sends the manifest and the device says where to resume.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud.serve.delivery import ArtifactSender, build_manifest
from cloud.serve.eventlog import log_event
from cloud.serve.round_types import DeliverResult, SignResult, TrainOutcome
from cloud.serve.store import ArtifactRecord, DeliveryRecord, DeliveryState, RoundRecord, RoundState
from device_sdk.fsutil import atomic_write_bytes
from device_sdk.protocol import ArtifactManifest
from device_sdk.protocol.envelope import decode

if TYPE_CHECKING:
    from cloud.serve.daemon import Daemon

LOG = logging.getLogger("ecos.daemon")


class _CountingPublisher:
    """What an ArtifactSender publishes through: counts every manifest and chunk per device and round."""

    def __init__(self, daemon: "Daemon", round_id: str, device_id: str):
        self.daemon, self.round_id, self.device_id = daemon, round_id, device_id

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Any:
        return self.daemon.publish(topic, payload, self.device_id, self.round_id, decode(payload).type)


class DeliveryStages:
    """The signing and delivering stages; mixed into ``Daemon`` through ``RoundStages``."""

    def _stage_signing(self: "Daemon", r: RoundRecord) -> None:
        art = self.store.artifact_of_round(r.round_id)
        if art is None:
            art = self._sign(r)
        manifest = ArtifactManifest.from_bytes(art.manifest)
        for device in r.devices:
            self.store.add_delivery(art.artifact_id, device, r.round_id, manifest.n_chunks)
        signed = SignResult(art.artifact_id, art.version, art.sha256, art.size, manifest.n_chunks)
        self._transition(r, RoundState.DELIVERING, result=signed.to_json())

    def _sign(self: "Daemon", r: RoundRecord) -> ArtifactRecord:
        """Copy the trained file into the artifact store and sign its manifest."""
        source = TrainOutcome.from_json(r.result).model_path
        name = f"classifier-{r.devices[0] if r.kind == 'device' else 'fleet'}"
        # devices refuse a version not above the highest they installed: above their own models' and the fleet's
        version = max(self.store.next_version(n) for n in ["classifier-fleet"] + [f"classifier-{d}" for d in r.devices])
        manifest = build_manifest(
            source,
            self.keyring.current,
            name=name,
            version=version,
            targets=list(r.devices),
            chunk_size=self.cfg.delivery.chunk_size,
        )
        dest = self.state_dir / "artifacts" / f"{manifest.artifact_id}{Path(source).suffix}"
        atomic_write_bytes(dest, Path(source).read_bytes())
        log_event(
            LOG,
            "artifact_signed",
            round=r.round_id,
            artifact=manifest.artifact_id,
            size=manifest.size,
            chunks=manifest.n_chunks,
            precision=manifest.precision,
        )
        return self.store.add_artifact(
            ArtifactRecord(
                manifest.artifact_id,
                r.round_id,
                name,
                version,
                manifest.sha256,
                manifest.size,
                str(dest),
                manifest.to_bytes(),
            )
        )

    def _stage_delivering(self: "Daemon", r: RoundRecord) -> None:
        art = self.store.artifact_of_round(r.round_id)
        pending = [d for d in self.store.deliveries(r.round_id) if d.state is DeliveryState.SENDING]
        expired = time.time() - r.updated > self.cfg.delivery.deadline_seconds
        for d in pending:
            if expired:
                self.store.update_delivery(
                    art.artifact_id, d.device_id, state=DeliveryState.FAILED, result={"code": "timeout"}
                )
            else:
                self._pump(r, art, d)
        if pending and not expired:
            return
        final = DeliverResult(
            {d.device_id: {"state": d.state.value, **d.result} for d in self.store.deliveries(r.round_id)}
        )
        for device in final.deliveries:
            self._senders.pop((art.artifact_id, device), None)
        if final.installed_anywhere:
            self._transition(r, RoundState.DONE, result=final.to_json())
        else:
            self._fail(r, f"no device installed the model: {final.deliveries}", result=final.to_json())

    def _pump(self: "Daemon", r: RoundRecord, art: ArtifactRecord, d: DeliveryRecord) -> None:
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
            _CountingPublisher(self, r.round_id, d.device_id),
            d.device_id,
            art.path,
            ArtifactManifest.from_bytes(art.manifest),
            window=self.cfg.delivery.window,
            timeout=self.cfg.delivery.ack_timeout,
            max_attempts=None,
            acked=d.next_chunk,
        )
        sender.start()
