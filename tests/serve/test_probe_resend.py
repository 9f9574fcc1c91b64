"""Probes are re-sent until answered or the round's deadline (issue 8, item 8).

Before: each daemon sent a round's probe once. A probe lost on the way (a broker killed while it
sat queued for an offline device) was never sent again and the round failed at its deadline.
Now the daemon re-sends the probe to every device that has not answered: at once when the device
comes back (its retained status goes ``online``), and every ``[rounds] probe_resend_seconds``
while the device is not known to be offline, until the deadline. A repeated probe costs the
device nothing: its ledger replays the stored answer (tests/integration/test_reliability.py runs
it against a real broker restart).
"""

from __future__ import annotations

import time

import numpy as np
from test_daemon_rounds import cache, make_daemon, tick_until  # noqa: F401 - cache is a fixture

from cloud.serve.store import RoundState
from device_sdk.protocol import Status, device_status, inbox, outbox
from device_sdk.protocol.round import Probe, Scores


def probes_to(daemon, device: str) -> list:
    return [Probe.from_bytes(p) for p in daemon.transport.of_type("probe", inbox(device))]


def status(daemon, device: str, state: str) -> None:
    daemon.handle_message(device_status(device), Status(device, state).to_bytes())


def ticks(daemon, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        daemon.tick()
        time.sleep(0.02)


def answer(daemon, round_id: str, device: str) -> None:
    k = daemon.index.k
    rng = np.random.default_rng(5)
    daemon.handle_message(
        outbox(device),
        Scores(
            round_id,
            device,
            daemon.index.encoder_sha256,
            np.bincount(rng.integers(0, k, 40), minlength=k) + rng.normal(0, 4, k),
            4.0,
        ).to_bytes(),
    )


def test_the_probe_is_resent_to_an_online_device_until_it_answers(tmp_path, pool_index, cache):
    daemon = make_daemon(tmp_path, pool_index, cache, probe_resend_seconds=0.2)
    status(daemon, "dev", "online")
    r = daemon.submit_round(["dev", "other"], fleet=True)
    tick_until(daemon, r.round_id, RoundState.COLLECTING)
    ticks(daemon, 1.0)
    sent = probes_to(daemon, "dev")
    assert len(sent) >= 3 and {p.probe_id for p in sent} == {r.round_id}
    assert len({(p.probe_id, p.deadline, p.centroids.tobytes()) for p in sent}) == 1  # the same probe each time
    assert daemon.metrics.probes_resent.value(reason="timer") >= 2
    answer(daemon, r.round_id, "dev")
    before = len(probes_to(daemon, "dev"))
    ticks(daemon, 0.6)
    assert len(probes_to(daemon, "dev")) == before  # answered: no more probes for it
    assert len(probes_to(daemon, "other")) >= 3 + 2  # the one that has not answered still gets them


def test_an_offline_device_gets_the_probe_again_when_it_comes_back(tmp_path, pool_index, cache):
    daemon = make_daemon(tmp_path, pool_index, cache, probe_resend_seconds=0.2)
    status(daemon, "dev", "offline")
    r = daemon.submit_round(["dev"])
    tick_until(daemon, r.round_id, RoundState.COLLECTING)
    ticks(daemon, 1.2)
    assert len(probes_to(daemon, "dev")) == 1  # sent once (the broker queues it); not piled up while offline
    status(daemon, "dev", "online")  # its retained status, on reconnect
    assert len(probes_to(daemon, "dev")) == 2  # at once, not at the next timer
    assert daemon.metrics.probes_resent.value(reason="reconnect") == 1
    status(daemon, "dev", "online")  # the same status twice within a second: one re-send
    assert len(probes_to(daemon, "dev")) == 2
    answer(daemon, r.round_id, "dev")
    status(daemon, "dev", "offline")
    status(daemon, "dev", "online")
    assert len(probes_to(daemon, "dev")) == 2  # answered: a reconnect sends nothing
    tick_until(daemon, r.round_id, RoundState.DELIVERING)  # let the training thread finish


def test_no_probe_after_the_deadline(tmp_path, pool_index, cache):
    daemon = make_daemon(tmp_path, pool_index, cache, probe_resend_seconds=0.1, collect_seconds=0.5)
    status(daemon, "dev", "online")
    r = daemon.submit_round(["dev"])
    failed = tick_until(daemon, r.round_id, RoundState.FAILED, timeout=10)
    assert failed.state is RoundState.FAILED
    n = len(probes_to(daemon, "dev"))
    assert 2 <= n <= 7
    status(daemon, "dev", "offline")
    status(daemon, "dev", "online")
    ticks(daemon, 0.3)
    assert len(probes_to(daemon, "dev")) == n
