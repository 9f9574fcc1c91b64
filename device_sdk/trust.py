"""What a device trusts: provisioned keys, keys learned from signed key updates, revocations.

``DeviceTrust`` joins three sources into the ``TrustStore`` every signature is checked with:

* the keys provisioned in the config (``[models] cloud_public_key`` and ``trusted_keys``) and
  the key ids it revokes (``[models] revoked_keys``): the operator's word, which no message can
  undo;
* a trust state file (``<model store>/trust.json``): keys added and ids revoked by key updates
  (``device_sdk.protocol.control.KeyUpdate``) the device verified with a key it already trusted, and the
  serial of the last update applied.

Rules of a key update (docs/security.md): it must be signed by a trusted, unrevoked key; its
serial must be above the last applied (an older or repeated one changes nothing); revocations
are permanent and win over any key, so a revoked key never comes back; an update that would
leave the device without a usable key is refused (``TrustError``), so no update can brick it.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_sdk.errors import MessageError, TrustError, UsageError
from device_sdk.fsutil import PathLike, atomic_write_text
from device_sdk.protocol import MAX_REVOKED, MAX_TRUST_KEYS, KeyUpdate
from device_sdk.protocol.envelope import read_json_file
from device_sdk.protocol.labels import LabelQuery
from device_sdk.protocol.round import Probe
from device_sdk.signing import (
    TrustStore,
    is_key_id,
    is_public_hex,
    key_id,
    key_id_of_raw,
    load_public_key,
    public_key_from_hex,
    public_raw,
)

LOG = logging.getLogger("ecos.trust")
STATE_NAME = "trust.json"
STATE_KIND = "ecos.trust_state"


@dataclass(frozen=True)
class UpdateResult:
    """What applying a key update changed (nothing when ``applied`` is False: an old or repeated one)."""

    applied: bool
    serial: int
    added: List[str]
    revoked: List[str]


class DeviceTrust:
    """The device's trust store, kept up to date by key updates; thread-safe.

    ``verify`` has the ``TrustStore.verify`` signature, so a ``DeliveryReceiver`` can be given a
    ``DeviceTrust`` and always checks against the latest keys.
    """

    def __init__(
        self,
        provisioned: Sequence[Ed25519PublicKey],
        revoked: Iterable[str] = (),
        state_path: Optional[PathLike] = None,
    ):
        self._provisioned = {key_id(k): k for k in provisioned}
        self._configured_revoked = frozenset(revoked)
        self.state_path = None if state_path is None else Path(state_path)
        self._lock = threading.Lock()
        self._serial, self._learned, self._learned_revoked = self._read_state()
        self._store = self._build()
        if not self._store.key_ids:
            raise UsageError(
                f"no usable signing key: every trusted key is revoked ({sorted(self._store.revoked)}); "
                "provision a current key ([models] trusted_keys)"
            )

    @classmethod
    def from_files(
        cls, paths: Sequence[PathLike], revoked: Iterable[str] = (), state_path: Optional[PathLike] = None
    ) -> "DeviceTrust":
        return cls([load_public_key(p) for p in paths], revoked, state_path)

    # ---- reading -----------------------------------------------------------------------------

    @property
    def store(self) -> TrustStore:
        return self._store

    @property
    def key_ids(self) -> List[str]:
        return self._store.key_ids

    @property
    def revoked(self) -> FrozenSet[str]:
        return self._store.revoked

    @property
    def serial(self) -> int:
        return self._serial

    def verify(self, data: bytes, key_id_: Optional[str], signature: Optional[str], what: str = "message") -> str:
        return self._store.verify(data, key_id_, signature, what)

    def _build(self) -> TrustStore:
        keys = {**self._learned, **self._provisioned}
        return TrustStore(keys, self._configured_revoked | self._learned_revoked)

    # ---- key updates -------------------------------------------------------------------------

    def apply(self, update: KeyUpdate) -> UpdateResult:
        """Verify and apply one key update (see the module docstring); persisted before it counts."""
        with self._lock:
            self._store.verify(update.signed_bytes(), update.key_id, update.signature, "key update")
            if update.serial <= self._serial:
                return UpdateResult(False, self._serial, [], [])
            revoked = self._learned_revoked | frozenset(update.revoked)
            learned = dict(self._learned)
            for entry in update.keys:
                if entry["key_id"] not in self._provisioned:
                    learned[entry["key_id"]] = public_key_from_hex(entry["public_key"])
            all_revoked = self._configured_revoked | revoked
            usable = [k for k in {**learned, **self._provisioned} if k not in all_revoked]
            if not usable:
                raise TrustError(
                    f"key update {update.serial} would leave no trusted key (revokes {sorted(update.revoked)}); refused"
                )
            if len(learned) > MAX_TRUST_KEYS or len(revoked) > MAX_REVOKED:
                raise TrustError(
                    f"key update {update.serial} would grow the trust state past {MAX_TRUST_KEYS} keys "
                    f"or {MAX_REVOKED} revocations; refused"
                )
            before = set(self._store.key_ids)
            old = (self._serial, self._learned, self._learned_revoked)
            self._serial, self._learned, self._learned_revoked = update.serial, learned, revoked
            try:
                self._write_state()
            except OSError as exc:
                self._serial, self._learned, self._learned_revoked = old
                raise TrustError(
                    f"key update {update.serial} could not be saved ({exc.strerror}); not applied"
                ) from None
            self._store = self._build()
            after = set(self._store.key_ids)
            return UpdateResult(True, update.serial, sorted(after - before), sorted(before - after))

    # ---- the state file ----------------------------------------------------------------------

    def _read_state(self):
        if self.state_path is None or not self.state_path.exists():
            return 0, {}, frozenset()
        source = f"trust state {self.state_path}"
        doc = read_json_file(self.state_path, source)
        if not isinstance(doc, dict) or doc.get("kind") != STATE_KIND:
            raise MessageError(f"{source} is not a trust state file; fix or restore it (never reset automatically)")
        serial, keys, revoked = doc.get("serial"), doc.get("keys"), doc.get("revoked")
        ok = (
            isinstance(serial, int)
            and not isinstance(serial, bool)
            and serial >= 0
            and isinstance(keys, dict)
            and isinstance(revoked, list)
            and all(is_key_id(r) for r in revoked)
            and all(is_public_hex(v) and key_id_of_raw(bytes.fromhex(v)) == k for k, v in keys.items())
        )
        if not ok:
            raise MessageError(
                f"{source} is corrupt (serial, keys by id, revoked ids); fix or restore it "
                "(it is never reset automatically: that could bring back a revoked key)"
            )
        return serial, {k: public_key_from_hex(v) for k, v in keys.items()}, frozenset(revoked)

    def _write_state(self) -> None:
        if self.state_path is None:
            return
        doc = {
            "kind": STATE_KIND,
            "version": 1,
            "serial": self._serial,
            "keys": {k: public_raw(v).hex() for k, v in sorted(self._learned.items())},
            "revoked": sorted(self._learned_revoked),
        }
        atomic_write_text(self.state_path, json.dumps(doc, indent=1) + "\n")

    def describe(self) -> Dict[str, Any]:
        return {
            "trusted": self.key_ids,
            "revoked": sorted(self.revoked),
            "serial": self._serial,
            "provisioned": sorted(self._provisioned),
            "learned": sorted(self._learned),
            "state": None if self.state_path is None else str(self.state_path),
        }


def verify_probe(probe: Probe, trust: Any, accept_unsigned: bool = False) -> Optional[str]:
    """The key id that signed ``probe``; raises before anything is computed or charged.

    ``trust`` None means no trust store is configured (offline use without ``--trusted-key``):
    the probe is not verified and None is returned. With a trust store an unsigned probe is
    refused (``Unsigned``) unless ``accept_unsigned`` (a dev/offline option, off by default);
    a signed one must verify with a trusted, unrevoked key, whatever ``accept_unsigned`` says.
    """
    if trust is None or (accept_unsigned and not probe.signed):
        return None
    return trust.verify(probe.signed_bytes(), probe.key_id, probe.signature, f"probe {probe.probe_id[:40]}")


def verify_label_query(query: LabelQuery, trust: Any, accept_unsigned: bool = False) -> Optional[str]:
    """The key id that signed ``query``; the rules of :func:`verify_probe` (a label query spends budget too)."""
    if trust is None or (accept_unsigned and not query.signed):
        return None
    return trust.verify(query.signed_bytes(), query.key_id, query.signature, f"label query {query.id[:40]}")


def read_key_update(path: PathLike) -> KeyUpdate:
    """A key update message from a file (``ecos-cloud keys update --out FILE``)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    return KeyUpdate.from_bytes(data, str(path))


def trust_from_settings(models: Any) -> DeviceTrust:
    """The trust of a device configured by ``[models]`` (``device_sdk.config.ModelSettings``)."""
    return DeviceTrust.from_files(models.key_files, models.revoked_keys, Path(models.store) / STATE_NAME)
