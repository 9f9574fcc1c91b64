"""Typed errors only the cloud raises (sampling, the broker it starts, the quality gate, the store).

They are :class:`~device_sdk.errors.EcosError` subclasses like the device's, with stable codes and
exit codes in the same table (docs/offline.md, "Checks and errors"; tests/test_error_table.py
keeps the two in step), so the command-line tools of both sides print and exit the same way. They
live here rather than in ``device_sdk.errors`` because a device never raises them.
"""

from __future__ import annotations

from device_sdk.errors import EcosError, MessageError

__all__ = ["BudgetError", "ImplausibleScores", "QualityGateError", "StoreError", "StoreUnavailable", "TransportError"]


class BudgetError(EcosError):
    """A sampling budget that cannot be met (larger than the pool, not positive)."""

    code = "budget"
    exit_code = 9


class TransportError(EcosError):
    """The MQTT broker cannot be reached or refused the connection."""

    code = "transport"
    exit_code = 11


class QualityGateError(EcosError):
    """A compressed model failed its acceptance gate (agreement or accuracy vs fp32); not shipped."""

    code = "quality_gate"
    exit_code = 13


class StoreError(EcosError):
    """The cloud's state database cannot be opened or was asked for something inconsistent."""

    code = "store"
    exit_code = 14


class StoreUnavailable(StoreError):
    """The cloud's state database cannot be written now (disk full, read-only, I/O error, busy): retry later.

    ``reason`` is one of ``disk_full``, ``read_only``, ``io_error``, ``busy``, ``cant_open``.
    """

    code = "store_unavailable"

    def __init__(self, message: str, reason: str = "io_error"):
        super().__init__(message)
        self.reason = reason


class ImplausibleScores(MessageError):
    """Scores no honest device could have sent (too little noise, counts no sample count explains); never summed.

    ``check`` names the check that failed (``not_finite``, ``sensitivity``, ``noise_too_low``,
    ``noise_too_high``, ``count_range``, ``total``; cloud/sampling/selection.py ``check_plausible``).
    """

    code = "implausible_scores"

    def __init__(self, message: str, check: str = ""):
        super().__init__(message)
        self.check = check


class ImplausibleVotes(MessageError):
    """Label votes no honest device could have sent for this query (too little noise, counts out of range,
    another sensitivity); refused on arrival, never summed.

    ``check`` names the check that failed (``sensitivity``, ``noise_too_low``, ``count_range``, ``total``;
    cloud/labelling/client.py ``check_votes``).
    """

    code = "implausible_votes"

    def __init__(self, message: str, check: str = ""):
        super().__init__(message)
        self.check = check
