"""The daemon's SQLite store on a full disk (issue 8, item 8): typed errors, a daemon that lives on.

Before: SQLITE_FULL came out of the store as a bare ``sqlite3.OperationalError``; in a round's
stage the daemon tried to mark the round failed, that write failed too, and the exception left
the loop: the daemon died. Now the store raises ``StoreUnavailable`` (a ``StoreError`` with a
``reason``: disk_full, read_only, io_error, busy), the daemon logs ``store_unavailable`` (once,
then every 30 s), counts ``ecos_store_errors_total{reason}``, shows ``ecos_store_writable 0``,
leaves the round where it was and retries on the next tick; when the disk has room again the
round goes on (``store_recovered``).

Real full filesystems (a small tmpfs, tests/fullfs.py), skipped with the reason where mounting
is impossible; one monkeypatched test runs everywhere.
"""

from __future__ import annotations

import logging
import sqlite3
import time

import numpy as np
import pytest

from cloud.serve.config import BrokerConfig, CloudConfig, MetricsConfig, RoundConfig, StoreConfig, TrainerConfig
from cloud.serve.daemon import build_daemon
from cloud.serve.store import NewRound, ResponseRecord, RoundState, SqliteStore
from device_sdk.errors import StoreError, StoreUnavailable
from device_sdk.protocol.round import Scores
from device_sdk.protocol.messages import inbox, outbox
from fullfs import fill, requires_mount, small_tmpfs
from test_daemon_rounds import TINY_TRAINER, RecordingTransport, cache, tick_until  # noqa: F401 - cache: a fixture


def exhaust(store: SqliteStore, limit: int = 5000) -> StoreUnavailable:
    """Write until the store says it cannot (the WAL may hold a few pages of room first)."""
    for i in range(limit):
        try:
            store.add_response(ResponseRecord("fill", f"dev-{i}", "scores", f"m{i}", b"x" * 8192, time.time()))
        except StoreUnavailable as err:
            return err
    raise AssertionError(f"{limit} writes of 8 KiB succeeded on a full disk")


@requires_mount
def test_the_store_on_a_full_disk_raises_a_typed_error_reads_still_work_and_it_recovers():
    with small_tmpfs(1024) as fs:
        store = SqliteStore(str(fs / "ecos.db"))
        store.create_round(NewRound("r1", "device", ["a"], {}))
        filler = fill(fs)
        err = exhaust(store)
        assert isinstance(err, StoreError) and err.reason == "disk_full" and err.code == "store_unavailable"
        with pytest.raises(StoreUnavailable):
            store.transition("r1", RoundState.PROBING, RoundState.COLLECTING)
        assert store.get_round("r1").state is RoundState.PROBING  # reads work, nothing half-written
        assert not store.writable()
        filler.unlink()
        assert store.transition("r1", RoundState.PROBING, RoundState.COLLECTING) and store.writable()
        store.close()


def test_an_sqlite_full_error_is_typed_without_a_real_disk(tmp_path, monkeypatch):
    store = SqliteStore(str(tmp_path / "ecos.db"))
    real = store._db

    class Full:
        in_transaction = False

        def execute(self, sql, *args):
            if sql.startswith(("INSERT", "UPDATE")):
                exc = sqlite3.OperationalError("database or disk is full")
                exc.sqlite_errorcode, exc.sqlite_errorname = 13, "SQLITE_FULL"
                raise exc
            out = real.execute(sql, *args)
            self.in_transaction = real.in_transaction
            return out

    monkeypatch.setattr(store, "_db", Full())
    with pytest.raises(StoreUnavailable) as info:
        store.record_status("a", "online", None, 1.0)
    assert info.value.reason == "disk_full" and not real.in_transaction


# ---- the daemon lives on, says so, and carries on when there is room again ----------------------------

def make_daemon(fs, tmp_path, pool_index, cache):
    _, index_path = pool_index
    cfg = CloudConfig(broker=BrokerConfig(), store=StoreConfig(state_dir=str(fs / "cloud"), index=str(index_path),
                                                               keys_dir=str(tmp_path / "keys")),
                      rounds=RoundConfig(budget=40, collect_seconds=60.0), metrics=MetricsConfig(port=0),
                      trainer=TrainerConfig(threads=1, cache_dir=str(cache), options=TINY_TRAINER))
    return build_daemon(cfg, transport_factory=RecordingTransport)


def honest_scores(daemon, round_id: str, device: str) -> bytes:
    k = daemon.index.k
    rng = np.random.default_rng(3)
    return Scores(round_id, device, daemon.index.encoder_sha256,
                  np.bincount(rng.integers(0, k, 40), minlength=k) + rng.normal(0, 4, k), 4.0).to_bytes()


@requires_mount
def test_the_daemon_survives_a_full_disk_says_so_and_finishes_the_round_when_freed(tmp_path, pool_index, cache, caplog):
    with small_tmpfs(2048) as fs:
        daemon = make_daemon(fs, tmp_path, pool_index, cache)
        first = daemon.submit_round(["a"])
        tick_until(daemon, first.round_id, RoundState.COLLECTING)
        second = daemon.submit_round(["b"])  # still PROBING: its next stage needs a write
        filler = fill(fs)
        exhaust(daemon.store)
        with caplog.at_level(logging.INFO, logger="ecos.daemon"):
            daemon.handle_message(outbox("a"), honest_scores(daemon, first.round_id, "a"))  # cannot be recorded
            for _ in range(20):
                daemon.step(0.01)  # must not raise: before the fix the loop died here
        assert daemon.store.get_round(second.round_id).state is RoundState.PROBING  # left as it was, not failed
        assert daemon.store.responses(first.round_id) == []
        assert daemon.metrics.store_errors.value(reason="disk_full") >= 2
        assert "ecos_store_writable 0" in daemon.metrics.render()
        assert caplog.text.count("event=store_unavailable") == 1  # said once, not at every tick
        assert daemon.metrics.dropped.value(reason="store_unavailable") == 1

        filler.unlink()
        with caplog.at_level(logging.INFO, logger="ecos.daemon"):
            assert tick_until(daemon, second.round_id, RoundState.COLLECTING).state is RoundState.COLLECTING
        assert "store_recovered" in caplog.text and "ecos_store_writable 1" in daemon.metrics.render()
        # the device answers the re-sent probe with its stored answer: recorded now
        daemon.handle_message(outbox("a"), honest_scores(daemon, first.round_id, "a"))
        assert [x.device_id for x in daemon.store.responses(first.round_id)] == ["a"]
        reached = tick_until(daemon, first.round_id, RoundState.TRAINING)
        assert reached.state is RoundState.TRAINING, reached.error
        tick_until(daemon, first.round_id, RoundState.DELIVERING)
        assert daemon.transport.of_type("probe", inbox("b"))
        daemon.store.close()
