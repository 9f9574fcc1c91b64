"""The store contract: one suite, run against every backend (SQLite on a file, and in memory).

A new backend (PostgreSQL, say) is added to ``BACKENDS`` below and must pass every test here.
Tests of one backend only (SQLite's durability, locking, full disks) are in their own files
(test_store_sqlite.py).
"""

from __future__ import annotations

import threading

import pytest

from cloud.errors import StoreError
from cloud.serve.store import (
    TRANSITIONS,
    ArtifactRecord,
    DeliveryState,
    DeviceState,
    JobState,
    MemoryStore,
    NewRound,
    ResponseRecord,
    RoundState,
    SqliteStore,
    Store,
    open_store,
)
from device_sdk.errors import UsageError

BACKENDS = {
    "sqlite": lambda tmp_path: open_store(str(tmp_path / "state.db")),
    "memory": lambda tmp_path: open_store("memory:"),
}


@pytest.fixture(params=sorted(BACKENDS))
def store(request, tmp_path) -> Store:
    s = BACKENDS[request.param](tmp_path)
    yield s
    s.close()


def new_round(store: Store, round_id: str = "r1", devices=("dev-a",), kind: str = "device"):
    return store.create_round(NewRound(round_id, kind, devices, {"budget": 10}))


def response(round_id: str, device_id: str, message_id: str = "m1", kind: str = "scores") -> ResponseRecord:
    return ResponseRecord(round_id, device_id, kind, message_id, f"{device_id}:{message_id}".encode(), 1.0)


# ---- rounds ------------------------------------------------------------------------------------


def test_a_round_walks_the_state_machine_to_done(store):
    r = new_round(store, devices=("a", "b"), kind="fleet")
    assert (r.state, r.devices, r.params, r.result) == (RoundState.PROBING, ("a", "b"), {"budget": 10}, {})
    path = [
        RoundState.PROBING,
        RoundState.COLLECTING,
        RoundState.SAMPLING,
        RoundState.TRAINING,
        RoundState.SIGNING,
        RoundState.DELIVERING,
        RoundState.DONE,
    ]
    for i, (a, b) in enumerate(zip(path, path[1:])):
        assert store.transition("r1", a, b, result={f"stage{i}": i})
    final = store.get_round("r1")
    assert final.state is RoundState.DONE and final.state.terminal
    assert final.result == {f"stage{i}": i for i in range(6)}


def test_transition_is_compare_and_set(store):
    new_round(store)
    assert store.transition("r1", RoundState.PROBING, RoundState.COLLECTING, deadline=123.0)
    # A retried stage (e.g. after a crash) that still believes the round is probing does nothing.
    assert not store.transition("r1", RoundState.PROBING, RoundState.COLLECTING, deadline=999.0)
    assert store.get_round("r1").deadline == 123.0
    assert not store.transition("missing", RoundState.PROBING, RoundState.COLLECTING)


def test_deadline_and_result_survive_later_transitions(store):
    new_round(store)
    store.transition("r1", RoundState.PROBING, RoundState.COLLECTING, deadline=50.0, result={"a": 1})
    store.transition("r1", RoundState.COLLECTING, RoundState.SAMPLING, result={"b": 2, "a": 3})
    r = store.get_round("r1")
    assert r.deadline == 50.0 and r.result == {"a": 3, "b": 2}


@pytest.mark.parametrize(
    "a,b",
    [
        (RoundState.PROBING, RoundState.SAMPLING),
        (RoundState.DONE, RoundState.PROBING),
        (RoundState.FAILED, RoundState.DONE),
        (RoundState.TRAINING, RoundState.COLLECTING),
    ],
)
def test_illegal_transitions_are_store_errors(store, a, b):
    new_round(store)
    with pytest.raises(StoreError, match="illegal transition"):
        store.transition("r1", a, b)


def test_every_working_state_can_fail_and_final_states_are_final(store):
    for state, targets in TRANSITIONS.items():
        assert RoundState.FAILED in targets and not state.terminal
    assert RoundState.DONE not in TRANSITIONS and RoundState.FAILED not in TRANSITIONS
    new_round(store)
    assert store.transition("r1", RoundState.PROBING, RoundState.FAILED, error="no devices")
    assert store.get_round("r1").error == "no devices"


def test_duplicate_or_empty_rounds_are_refused(store):
    new_round(store)
    with pytest.raises(StoreError, match="already exists"):
        new_round(store)
    with pytest.raises(StoreError, match="at least one device"):
        new_round(store, "r2", devices=())
    with pytest.raises(StoreError, match="kind"):
        new_round(store, "r3", kind="galaxy")


def test_list_rounds_filters_by_state_in_creation_order(store):
    for rid in ("r3", "r1", "r2"):
        new_round(store, rid)
    store.transition("r1", RoundState.PROBING, RoundState.FAILED)
    assert [r.round_id for r in store.list_rounds()] == ["r3", "r1", "r2"]
    assert [r.round_id for r in store.list_rounds([RoundState.PROBING])] == ["r3", "r2"]
    counts = store.round_counts()
    assert counts["probing"] == 2 and counts["failed"] == 1 and counts["done"] == 0 and len(counts) == len(RoundState)


# ---- responses ---------------------------------------------------------------------------------


def test_a_repeated_response_counts_once_and_the_first_is_kept(store):
    new_round(store, devices=("a", "b"), kind="fleet")
    assert store.add_response(response("r1", "a", "m1"))
    assert not store.add_response(response("r1", "a", "m2"))
    assert store.add_response(response("r1", "b", "m3", kind="refusal"))
    got = {(r.device_id, r.message_id, r.kind, r.payload) for r in store.responses("r1")}
    assert got == {("a", "m1", "scores", b"a:m1"), ("b", "m3", "refusal", b"b:m3")}
    assert store.responses("other") == []


def test_concurrent_duplicates_are_recorded_exactly_once(store):
    new_round(store)
    wins = []
    barrier = threading.Barrier(8)

    def add(i: int) -> None:
        barrier.wait()
        wins.append(store.add_response(response("r1", "a", f"m{i}")))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]
    assert len(store.responses("r1")) == 1


def test_unknown_response_kind_is_refused(store):
    with pytest.raises(StoreError, match="kind"):
        store.add_response(response("r1", "a", kind="gossip"))


# ---- artifacts, deliveries, jobs, devices, traffic ---------------------------------------------


def artifact(round_id: str, artifact_id: str, version: int, name: str = "student") -> ArtifactRecord:
    return ArtifactRecord(artifact_id, round_id, name, version, "ab" * 32, 1234, f"/x/{artifact_id}.onnx", b"manifest")


def test_one_artifact_per_round_and_versions_count_up_per_name(store):
    assert store.next_version("student") == 1
    first = store.add_artifact(artifact("r1", "art-1", 1))
    assert store.next_version("student") == 2 and store.next_version("other") == 1
    again = store.add_artifact(artifact("r1", "art-1b", 2))  # a retried signing stage
    assert again == first and store.get_artifact("art-1b") is None
    assert store.get_artifact("art-1").manifest == b"manifest"
    assert store.artifact_of_round("r1").artifact_id == "art-1" and store.artifact_of_round("r2") is None


def test_delivery_progress_and_final_states_are_sticky(store):
    d = store.add_delivery("art-1", "a", "r1", total_chunks=5)
    assert (d.state, d.next_chunk, d.total_chunks) == ("sending", 0, 5)
    assert store.add_delivery("art-1", "a", "r1", total_chunks=5) == d  # idempotent
    assert store.update_delivery("art-1", "a", next_chunk=3)
    assert store.update_delivery("art-1", "a", next_chunk=1)  # the device lost chunks and said so
    assert store.update_delivery("art-1", "a", state="installed", result={"accuracy": 0.9})
    assert not store.update_delivery("art-1", "a", state="failed", result={"code": "late"})
    final = store.get_delivery("art-1", "a")
    assert (final.state, final.next_chunk, final.result) == ("installed", 1, {"accuracy": 0.9})
    assert not store.update_delivery("art-1", "nobody", next_chunk=1)
    store.add_delivery("art-1", "b", "r1", total_chunks=5)
    assert [x.device_id for x in store.deliveries("r1")] == ["a", "b"]


def test_jobs_record_progress_and_count_restarts(store):
    job = store.start_job("r1:train", "r1", "train")
    assert (job.state, job.attempt) == ("running", 1)
    store.job_progress("r1:train", 3, 10, "epoch 3")
    assert (store.get_job("r1:train").done, store.get_job("r1:train").note) == (3, "epoch 3")
    assert store.start_job("r1:train", "r1", "train").attempt == 2  # resumed after a crash
    store.finish_job("r1:train", "done", result={"artifact": "/x.onnx"})
    job = store.get_job("r1:train")
    assert (job.state, job.result, job.done) == ("done", {"artifact": "/x.onnx"}, 0)
    with pytest.raises(StoreError):
        store.finish_job("r1:train", "paused")
    assert store.get_job("nope") is None


def test_device_status_keeps_the_last_known_model(store):
    store.record_status("a", "online", {"artifact_id": "x", "version": 1}, at=10.0)
    store.record_status("a", "offline", None, at=20.0)
    d = store.get_device("a")
    assert (d.state, d.model, d.first_seen, d.last_seen) == ("offline", {"artifact_id": "x", "version": 1}, 10.0, 20.0)
    store.set_device_model("b", {"artifact_id": "y", "version": 2}, at=5.0)
    assert store.get_device("b").state == "unknown"
    assert [x.device_id for x in store.list_devices()] == ["a", "b"] and store.get_device("c") is None


def test_traffic_accumulates_per_device_round_direction_and_type(store):
    for n in (100, 50):
        store.add_traffic("a", "r1", "down", "probe", n)
    store.add_traffic("a", "r1", "up", "scores", 70)
    store.add_traffic("b", "r2", "down", "probe", 10)
    rows = {(t.device_id, t.round_id, t.direction, t.msg_type): (t.messages, t.bytes) for t in store.traffic()}
    assert rows == {
        ("a", "r1", "down", "probe"): (2, 150),
        ("a", "r1", "up", "scores"): (1, 70),
        ("b", "r2", "down", "probe"): (1, 10),
    }
    assert len(store.traffic(round_id="r1")) == 2 and len(store.traffic(device_id="b")) == 1


# ---- states, values and concurrency: what every backend must give back the same way --------------


def test_states_are_enums_equal_to_the_stored_strings(store):
    new_round(store)
    d = store.add_delivery("art-1", "a", "r1", total_chunks=2)
    job = store.start_job("r1:train", "r1", "train")
    store.record_status("a", "online", None, at=1.0)
    dev = store.get_device("a")
    assert d.state is DeliveryState.SENDING and job.state is JobState.RUNNING and dev.state is DeviceState.ONLINE
    assert (d.state, job.state, dev.state, store.get_round("r1").state) == ("sending", "running", "online", "probing")
    assert f"{d.state}|{job.state:<8}|{dev.state}" == "sending|running |online"  # logs and metrics print the value
    store.update_delivery("art-1", "a", state=DeliveryState.INSTALLED)
    assert store.get_delivery("art-1", "a").state is DeliveryState.INSTALLED


def test_an_unknown_state_is_a_store_error(store):
    store.add_delivery("art-1", "a", "r1", total_chunks=2)
    with pytest.raises(StoreError, match="state"):
        store.update_delivery("art-1", "a", state="lost")
    with pytest.raises(StoreError, match="state"):
        store.record_status("a", "sleeping", None, at=1.0)
    assert store.get_delivery("art-1", "a").state == "sending" and store.get_device("a") is None


def test_values_come_back_as_stored_json_and_as_copies(store):
    store.create_round(NewRound("r1", "device", ["a"], {"sizes": (1, 2), "by": {3: "x"}, "nested": {"k": [1.5, None]}}))
    r = store.get_round("r1")
    assert r.params == {"sizes": [1, 2], "by": {"3": "x"}, "nested": {"k": [1.5, None]}} and r.devices == ("a",)
    r.params["sizes"].append(99)  # changing what came back does not change the store
    assert store.get_round("r1").params["sizes"] == [1, 2]
    with pytest.raises(StoreError, match="JSON"):
        store.create_round(NewRound("r2", "device", ["a"], {"bad": object()}))
    assert store.get_round("r2") is None


def test_values_no_database_can_hold_are_store_errors(store):
    store.add_delivery("art-1", "a", "r1", 3)
    for bad in (2**70, -1, True, 1.5):
        with pytest.raises(StoreError):
            store.update_delivery("art-1", "a", next_chunk=bad)
    with pytest.raises(StoreError):
        store.add_traffic("a", "r1", "up", "ack", 2**64)
    for text in ("\ud800", 7):
        with pytest.raises(StoreError):
            store.record_status(text, "online", None, 0.0)
    with pytest.raises(StoreError):
        store.create_round(NewRound("r-\udfff", "device", ["a"]))
    assert store.get_delivery("art-1", "a").next_chunk == 0 and store.list_devices() == [] and store.list_rounds() == []


def test_an_artifact_id_of_another_round_is_refused(store):
    store.add_artifact(artifact("r1", "art-1", 1))
    with pytest.raises(StoreError):
        store.add_artifact(artifact("r2", "art-1", 1))
    assert store.artifact_of_round("r2") is None and store.get_artifact("art-1").round_id == "r1"


def test_concurrent_transitions_move_a_round_exactly_once(store):
    new_round(store)
    wins = []
    barrier = threading.Barrier(8)

    def move() -> None:
        barrier.wait()
        wins.append(store.transition("r1", RoundState.PROBING, RoundState.COLLECTING, result={"by": len(wins)}))

    threads = [threading.Thread(target=move) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True] and store.get_round("r1").state is RoundState.COLLECTING


def test_concurrent_traffic_counts_every_message(store):
    def count() -> None:
        for _ in range(25):
            store.add_traffic("a", "r1", "up", "ack", 10)

    threads = [threading.Thread(target=count) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [(t.messages, t.bytes) for t in store.traffic()] == [(100, 1000)]


# ---- choosing a backend -------------------------------------------------------------------------


class _Config:
    def __init__(self, backend: str, database: str):
        self.backend, self.database = backend, database


def test_open_store_picks_the_backend_by_config_url_or_path(tmp_path):
    db = str(tmp_path / "ecos.db")
    cases = [
        (_Config("sqlite", db), SqliteStore),
        (_Config("memory", db), MemoryStore),
        ("memory:", MemoryStore),
        ("memory://", MemoryStore),
        (f"sqlite://{db}", SqliteStore),
        (db, SqliteStore),
        (":memory:", SqliteStore),
    ]
    for where, kind in cases:
        s = open_store(where)
        assert type(s) is kind, where
        s.close()
    assert (tmp_path / "ecos.db").exists()


def test_an_unknown_backend_names_the_known_ones():
    with pytest.raises(UsageError, match="memory, sqlite"):
        open_store(_Config("postgres", "x"))
