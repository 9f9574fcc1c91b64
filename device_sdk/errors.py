"""Typed errors with stable codes, shared by the device SDK and the cloud.

Every error the user can cause (bad input, bad files, exhausted budget) is an ``EcosError``
subclass carrying a stable string ``code`` and a process ``exit_code``; the command-line tools
print ``error[<code>]: <message>`` on one line and exit with that code. The errors only the cloud
raises (budget, transport, quality_gate, store, implausible_scores) are in ``cloud/errors.py``;
the table of all of them is in docs/offline.md ("Checks and errors").
"""

from __future__ import annotations


class EcosError(Exception):
    """Base of every error the project raises on purpose."""

    code = "ecos_error"
    exit_code = 1


class UsageError(EcosError):
    """A command-line argument or configuration value is invalid."""

    code = "usage"
    exit_code = 2


class InputError(EcosError):
    """Input data (an image folder, an image, a CSV) is missing or unreadable."""

    code = "input"
    exit_code = 3


class MessageError(EcosError):
    """A wire message or file is truncated, corrupt, of the wrong kind or version."""

    code = "message"
    exit_code = 4


class MismatchError(EcosError):
    """Two artifacts that must agree do not (encoder hash, feature dimension, ...)."""

    code = "mismatch"
    exit_code = 5


class PrivacyBudgetExceeded(EcosError):
    """A release would take the device past its total privacy budget."""

    code = "privacy_budget"
    exit_code = 6


class ArtifactError(EcosError):
    """A model/encoder artifact is missing metadata, has a wrong hash or cannot be loaded."""

    code = "artifact"
    exit_code = 7


class RuntimeUnavailable(EcosError):
    """The requested inference runtime is not installed on this machine."""

    code = "runtime_unavailable"
    exit_code = 8


class DeliveryError(EcosError):
    """A delivered artifact failed verification; the device keeps its installed model."""

    code = "delivery"
    exit_code = 10


class SignatureError(DeliveryError):
    """An artifact manifest is not signed by the cloud key the device was provisioned with."""

    code = "bad_signature"


class HashMismatch(DeliveryError):
    """The reassembled artifact's size or sha256 differs from its (signed) manifest."""

    code = "bad_hash"


class ChunkError(DeliveryError):
    """A chunk's bytes do not match the sha256 the signed manifest lists for it."""

    code = "bad_chunk"


class ArtifactRejected(DeliveryError):
    """The device's policy refuses an artifact: too large, unsupported format, or a downgrade."""

    code = "rejected"


class DeadlinePassed(EcosError):
    """A probe arrived after its deadline: answering would spend privacy budget for nothing."""

    code = "deadline"
    exit_code = 12


class LedgerUnavailable(EcosError):
    """The privacy ledger cannot be read or written (disk full, read-only, missing); nothing was charged.

    ``public`` says the same without local paths (what a refusal sent to the cloud carries);
    ``errno_name`` is the OS error (``ENOSPC``, ``EROFS``, ``EACCES``, ``ENOENT``, ...).
    """

    code = "ledger_unavailable"
    exit_code = 17

    def __init__(self, message: str, public: str = "", errno_name: str = ""):
        super().__init__(message)
        self.public, self.errno_name = public or message, errno_name


class LedgerCorrupt(MessageError):
    """The privacy ledger is not a valid ledger; left untouched, never reset; ``public`` has no local path."""

    code = "ledger_corrupt"

    def __init__(self, message: str, public: str = ""):
        super().__init__(message)
        self.public = public or message


class UnknownKey(SignatureError):
    """A signature names a key this device does not trust (or names none)."""

    code = "unknown_key"


class RevokedKey(SignatureError):
    """A signature was made with a key this device has revoked."""

    code = "revoked_key"


class Unsigned(SignatureError):
    """A message that must be signed (a probe, a manifest, a key update) carries no signature."""

    code = "unsigned"


class WrongTarget(ArtifactRejected):
    """A signed manifest is for another device (or a fleet this device is not in)."""

    code = "wrong_target"


class StaleVersion(ArtifactRejected):
    """A signed manifest's version is not above the highest one installed in its slot (a replay or a downgrade)."""

    code = "stale_version"


class ProbeConflict(EcosError):
    """A probe reuses the id of an answered probe with other content: refused, nothing charged."""

    code = "probe_conflict"
    exit_code = 15


class TrustError(EcosError):
    """A key update cannot be applied (it would leave no trusted key) or the trust state is unusable."""

    code = "trust"
    exit_code = 16
