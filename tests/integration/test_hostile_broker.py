"""A daemon no message can kill (issue 8), live: the real ``ecos-cloud serve`` process and a real
device agent on the Mosquitto at 127.0.0.1:1883, fed every killer message found by the attacker
test and a few hundred random and mutated payloads on every topic they subscribe to.

Before the fix, each killer ended the daemon process within 1-2 s, and the one left *retained*
on a status topic ended it again at every start. Now every one of them is dropped and counted
(``ecos_messages_dropped_total``), the daemon process lives on, the agent's worker too, and a real
round (probe, scores, training, signing, delivery) still completes afterwards.
"""

from __future__ import annotations

import random
import signal
import sys
import time
from pathlib import Path
from typing import List, Tuple

import pytest
from broker import requires_broker, shared_broker, unique_id, wait_until  # noqa: F401 - shared_broker is a fixture
from test_daemon import _serve, _up, _write_toml, metric, scrape, start_agent
from test_fuzz_properties import CORPUS, header_sweep
from test_hostile_input import KILLERS, nested, raw_envelope, status_header

import device_sdk.protocol as P
from cloud.security.keys import PUBLIC_NAME
from cloud.serve.store import RoundState, SqliteStore
from cloud.tools.broker import Broker, free_port

pytestmark = [pytest.mark.integration, requires_broker]

FUZZ_PER_TOPIC = 300
SEED = 8


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teacher-cache")


def fuzz_payloads(n: int, rng: random.Random) -> List[bytes]:
    """``n`` hostile payloads: two thirds header rewrites (the sweep of tests/test_fuzz_properties.py),
    the rest valid messages with flipped bits, truncated, or random bytes."""
    sweep = [data for _, data in header_sweep()]
    out = rng.sample(sweep, 2 * n // 3)
    while len(out) < n:
        data = bytearray(rng.choice(CORPUS))
        kind = rng.randrange(3)
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data = data[: rng.randrange(len(data))]
        else:
            data = bytearray(rng.randbytes(rng.randrange(1, 600)))
        out.append(bytes(data))
    return out


def publisher(broker: Broker):
    from device_sdk.transport import MqttTransport

    t = MqttTransport(unique_id("hostile"), broker.host, broker.port).start()
    assert t.wait_connected(10)
    return t


def publish_all(transport, messages: List[Tuple[str, bytes]]) -> None:
    infos = [transport.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(10)


def test_no_message_kills_the_daemon_or_the_agent_and_a_round_completes_afterwards(
    tmp_path, shared_broker, pool_index, encoder_path, digits_root, teacher_cache
):
    started = time.monotonic()
    broker = shared_broker
    _, index_path = pool_index
    state, config, log, port = tmp_path / "cloud", tmp_path / "cloud.toml", tmp_path / "daemon.log", free_port()
    _write_toml(config, broker, index_path, teacher_cache, state, port)
    device, victim = unique_id("hostile-dev"), unique_id("hostile-victim")
    rng = random.Random(SEED)
    raw = publisher(broker)
    retained_topic = P.device_status(victim)
    proc = agent = None
    try:
        # the retained killer is waiting on a status topic before the daemon starts (it used to die at every start)
        raw.publish(
            retained_topic, raw_envelope(status_header(x=nested(100_000))), qos=1, retain=True
        ).wait_for_publish(10)
        proc = _serve(config, log)
        assert wait_until(lambda: _up(port), 60), log.read_text()
        time.sleep(2)  # it used to exit within 1-2 s of the retained message
        assert proc.poll() is None, log.read_text()[-3000:]

        # the six killers, on the topics they were found on (re-addressed to a device of this test)
        killers = [(topic.replace("/pi-1/", f"/{victim}/"), payload) for topic, payload in KILLERS.values()]
        # a few hundred random and mutated payloads on every topic the daemon and the agent subscribe to
        odd_ids = ["a b", "x" * 200, "..", "\u00fc" * 70, "d\u00e9v", "a%2Fb"]
        to_daemon = (
            killers
            + [(P.outbox(victim), p) for p in fuzz_payloads(FUZZ_PER_TOPIC, rng)]
            + [(P.device_status(victim), p) for p in fuzz_payloads(FUZZ_PER_TOPIC, rng)]
            + [(f"ecos/v1/dev/{odd}/out", p) for odd, p in zip(odd_ids, fuzz_payloads(len(odd_ids), rng))]
            + [(P.outbox(victim), b"\0" * ((1 << 20) + 1))]
        )  # over max_message_bytes
        publish_all(raw, to_daemon)
        assert wait_until(lambda: sum(_dropped(scrape(port)).values()) >= len(to_daemon) + 1, 30), (
            _dropped(scrape(port)),
            len(to_daemon),
            log.read_text()[-3000:],
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        dropped = _dropped(scrape(port))
        assert dropped.get("internal_error", 0) == 0 and dropped["malformed"] >= len(killers) + 1
        assert dropped["oversized"] == 1

        public_key = state / "keys" / PUBLIC_NAME
        agent = start_agent(device, "handwritten", tmp_path, broker, public_key, encoder_path, digits_root)
        to_agent = [(P.inbox(device), p) for p in fuzz_payloads(FUZZ_PER_TOPIC, rng)]
        to_agent += [(P.inbox(device), payload) for _, payload in killers]
        to_agent += [(P.inbox(device), b"\xff" * ((4 << 20) + 1))]  # over the protocol's payload limit
        publish_all(raw, to_agent)
        assert wait_until(lambda: agent.stats.messages_in >= len(to_agent), 30), agent.stats
        # every message the agent did not handle was rejected by a check: none failed unexpectedly
        assert agent.stats.dropped == agent.stats.rejected >= len(to_agent) // 2, agent.stats
        assert agent._worker is not None and agent._worker.is_alive()
        assert len(agent.ledger.releases()) == 0  # nothing in the junk made it spend privacy budget

        # and a real round still completes
        from cloud.pool.index import PoolIndex
        from cloud.serve.config import load_config
        from cloud.serve.daemon import create_round

        store = SqliteStore(str(state / "ecos.db"))
        r = create_round(store, load_config(str(config)), PoolIndex.load(str(index_path)), [device])
        assert wait_until(lambda: store.get_round(r.round_id).state.terminal, 120, interval=0.2), log.read_text()[
            -3000:
        ]
        done = store.get_round(r.round_id)
        assert done.state is RoundState.DONE, done.error
        assert agent.store.current("classifier").sha256 == done.result["sha256"]
        assert proc.poll() is None
        text = scrape(port)
        assert metric(text, "ecos_messages_dropped_total", reason="internal_error") == 0
        store.close()
        print(
            f"live hostile run: {len(to_daemon) + 1} messages to the daemon, {len(to_agent)} to the agent, "
            f"dropped {_dropped(text)}, {time.monotonic() - started:.1f}s in all",
            file=sys.stderr,
        )

        proc.send_signal(signal.SIGTERM)  # and it still stops cleanly
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        raw.publish(retained_topic, b"", qos=1, retain=True).wait_for_publish(10)  # clear the retained killer
        raw.stop()
        if agent is not None:
            agent.stop()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _dropped(text: str) -> dict:
    import re

    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^ecos_messages_dropped_total\{reason="([^"]*)"\} (\S+)$', text, re.MULTILINE)
    }
