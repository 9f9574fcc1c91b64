"""SQLite-only properties of the store: durability across a killed process, schema checks, a
corrupt file, and a full disk (typed errors, a daemon that lives on).

On a full disk: before, SQLITE_FULL came out of the store as a bare ``sqlite3.OperationalError``;
in a round's stage the daemon tried to mark the round failed, that write failed too, and the
exception left the loop: the daemon died. Now the store raises ``StoreUnavailable`` (a
``StoreError`` with a ``reason``: disk_full, read_only, io_error, busy), the daemon logs
``store_unavailable`` (once, then every 30 s), counts ``ecos_store_errors_total{reason}``, shows
``ecos_store_writable 0``, leaves the round where it was and retries on the next tick; when the
disk has room again the round goes on (``store_recovered``).

Real full filesystems (a small tmpfs, tests/fullfs.py), skipped with the reason where mounting
is impossible; one monkeypatched test runs everywhere. The generic behaviour of every backend is
in test_store_contract.py.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from fullfs import fill, requires_mount, small_tmpfs
from test_daemon_rounds import TINY_TRAINER, RecordingTransport, cache, tick_until  # noqa: F401 - cache: a fixture

from cloud.errors import StoreError, StoreUnavailable
from cloud.serve.config import BrokerConfig, CloudConfig, MetricsConfig, RoundConfig, StoreConfig, TrainerConfig
from cloud.serve.daemon import build_daemon
from cloud.serve.store import DeliveryState, NewRound, ResponseRecord, RoundState, SqliteStore
from device_sdk.protocol import inbox, outbox
from device_sdk.protocol.round import Scores

# ---- durability ---------------------------------------------------------------------------------


def test_committed_writes_survive_a_killed_process(tmp_path):
    """A process that commits and dies without closing (like kill -9) loses nothing."""
    db = tmp_path / "state.db"
    code = (
        "import os; from cloud.serve.store import *; s = SqliteStore(%r); "
        "s.create_round(NewRound('r1', 'device', ['a'])); "
        "s.add_response(ResponseRecord('r1', 'a', 'scores', 'm', b'x', 1.0)); os._exit(9)"
    ) % str(db)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    s = SqliteStore(str(db))
    assert s.get_round("r1").state is RoundState.PROBING and len(s.responses("r1")) == 1
    s.close()


def test_a_database_from_a_newer_schema_is_refused(tmp_path):
    db = tmp_path / "state.db"
    SqliteStore(str(db)).close()
    con = sqlite3.connect(db)
    con.execute("PRAGMA user_version=99")
    con.close()
    with pytest.raises(StoreError, match="newer"):
        SqliteStore(str(db))


def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path):
    bad = tmp_path / "state.db"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        SqliteStore(str(bad))


def test_rows_on_disk_are_the_strings_and_json_of_schema_1(tmp_path):
    """The enums and records change nothing in the file: an older ecos reads it, and it reads older files."""
    db = tmp_path / "state.db"
    s = SqliteStore(str(db))
    s.create_round(NewRound("r1", "fleet", ["b", "a"], {"budget": 10, "method": "ecos"}))
    s.transition("r1", RoundState.PROBING, RoundState.COLLECTING, result={"z": 1, "a": [1, 2]}, deadline=5.0)
    s.add_delivery("art-1", "a", "r1", 4)
    s.update_delivery("art-1", "a", state="installed", result={"accuracy": 0.5})
    s.start_job("r1:train", "r1", "train")
    s.record_status("a", "online", {"version": 1}, 2.0)
    s.close()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 1
    assert con.execute("SELECT kind, devices, state, params, result, deadline FROM rounds").fetchall() == [
        ("fleet", '["b","a"]', "collecting", '{"budget":10,"method":"ecos"}', '{"a":[1,2],"z":1}', 5.0)
    ]
    assert con.execute("SELECT state, next_chunk, result FROM deliveries").fetchall() == [
        ("installed", 0, '{"accuracy":0.5}')
    ]
    assert con.execute("SELECT state, attempt FROM jobs").fetchall() == [("running", 1)]
    assert con.execute("SELECT state, model FROM devices").fetchall() == [("online", '{"version":1}')]
    assert [type(v) for v in con.execute("SELECT state FROM rounds").fetchone()] == [str]
    # a row as an older ecos wrote it reads back as a typed record
    con.execute("INSERT INTO deliveries VALUES ('art-2', 'b', 'r1', 'sending', 2, 4, '{}', 1.0)")
    con.commit()
    con.close()
    s = SqliteStore(str(db))
    assert s.get_delivery("art-2", "b").state is DeliveryState.SENDING and s.update_delivery("art-2", "b", next_chunk=3)
    s.close()


def test_two_processes_share_one_file_and_a_transition_happens_once(tmp_path):
    """The daemon and 'ecos-cloud round' open the same file: writes are seen, compare-and-set holds across them."""
    db = str(tmp_path / "state.db")
    daemon_side, cli_side = SqliteStore(db), SqliteStore(db)
    cli_side.create_round(NewRound("r1", "device", ["a"]))
    assert daemon_side.get_round("r1").state is RoundState.PROBING
    assert daemon_side.transition("r1", RoundState.PROBING, RoundState.COLLECTING)
    assert not cli_side.transition("r1", RoundState.PROBING, RoundState.COLLECTING)
    code = (
        "from cloud.serve.store import *; s = SqliteStore(%r); "
        "print(s.transition('r1', RoundState.COLLECTING, RoundState.SAMPLING))"
    ) % db
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True" and daemon_side.get_round("r1").state is RoundState.SAMPLING
    daemon_side.close()
    cli_side.close()


# ---- a full disk --------------------------------------------------------------------------------


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


def make_daemon(fs, tmp_path, pool_index, cache):  # noqa: F811 - the fixture
    _, index_path = pool_index
    cfg = CloudConfig(
        broker=BrokerConfig(),
        store=StoreConfig(state_dir=str(fs / "cloud"), index=str(index_path), keys_dir=str(tmp_path / "keys")),
        rounds=RoundConfig(budget=40, collect_seconds=60.0),
        metrics=MetricsConfig(port=0),
        trainer=TrainerConfig(threads=1, cache_dir=str(cache), options=TINY_TRAINER),
    )
    return build_daemon(cfg, transport_factory=RecordingTransport)


def honest_scores(daemon, round_id: str, device: str) -> bytes:
    k = daemon.index.k
    rng = np.random.default_rng(3)
    return Scores(
        round_id,
        device,
        daemon.index.encoder_sha256,
        np.bincount(rng.integers(0, k, 40), minlength=k) + rng.normal(0, 4, k),
        4.0,
    ).to_bytes()


@requires_mount
def test_the_daemon_survives_a_full_disk_says_so_and_finishes_the_round_when_freed(tmp_path, pool_index, cache, caplog):  # noqa: F811
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
