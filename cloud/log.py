"""The cloud's logger and a throttled progress reporter for long loops."""

from __future__ import annotations

import logging
import time
from typing import Optional

from device_sdk.clikit import setup_logging  # noqa: F401  (one logging set-up for every command)

LOG = logging.getLogger("ecos")


class Progress:
    """Logs ``what: done/total (rate/s, eta)`` at most every ``interval`` seconds, and at the end."""

    def __init__(self, what: str, total: int, interval: float = 5.0, logger: Optional[logging.Logger] = None):
        self.what, self.total, self.interval = what, max(int(total), 1), interval
        self.log = logger or LOG
        self.start = self._last = time.monotonic()
        self.done = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval or self.done >= self.total:
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            self.log.info("%s: %d/%d (%.0f/s, eta %.0fs)", self.what, self.done, self.total, rate, eta)
