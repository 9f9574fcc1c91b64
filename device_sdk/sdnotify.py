"""systemd's readiness and watchdog protocol (``sd_notify``) in the standard library, no libsystemd.

    notify("READY=1")                  # Type=notify: the unit is started once this arrives
    interval = watchdog_interval()     # WatchdogSec=, in seconds, or None when not asked for
    notify("WATCHDOG=1")               # at least every interval (systemd restarts the unit otherwise)

systemd gives a service a Unix datagram socket in ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the
abstract namespace) and, with ``WatchdogSec=``, the period in ``$WATCHDOG_USEC`` (and the process
it is meant for in ``$WATCHDOG_PID``). Outside systemd these variables are unset and every call
here does nothing. A failed notification is logged and returns False; it never raises, so a
missing or broken socket cannot stop the agent.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping, Optional

LOG = logging.getLogger("ecos.sdnotify")


def notify(state: str, env: Optional[Mapping[str, str]] = None) -> bool:
    """Send ``state`` (``"READY=1"``, ``"WATCHDOG=1"``, ``"STOPPING=1"``, ``"STATUS=..."``; several
    separated by newlines) to ``$NOTIFY_SOCKET``. True if it was sent, False when there is no socket
    to send to or sending failed."""
    address = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # Linux abstract namespace
    elif not address.startswith("/"):  # e.g. systemd's "vsock:" addresses, not supported here
        LOG.debug("NOTIFY_SOCKET %r is not a Unix socket address; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode("utf-8"), address)
        return True
    except OSError as exc:
        LOG.warning("could not notify systemd (%s): %s", state.split("\n", 1)[0], exc)
        return False


def watchdog_interval(env: Optional[Mapping[str, str]] = None) -> Optional[float]:
    """The watchdog period systemd asks this process for, in seconds, or None when there is none
    (``$WATCHDOG_USEC`` unset, not a positive integer, or ``$WATCHDOG_PID`` names another process)."""
    env = os.environ if env is None else env
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None
