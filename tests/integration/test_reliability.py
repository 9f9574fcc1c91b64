"""Reliability against a real Mosquitto (issue 8, item 8): a probe lost with a killed broker, a full disk.

* The broker is killed (SIGKILL) while a round's probe sits queued for an offline device: the
  probe is gone. Before, the daemon never sent it again and the round failed at its deadline.
  Now the device's retained ``online`` status, when it comes back, makes the daemon re-send it;
  the round completes and the device was charged once.
* The real ``ecos-cloud serve`` process keeps its state on a small tmpfs that fills up while a
  round is collecting: the device's answer cannot be recorded. Before, SQLITE_FULL killed the
  daemon. Now it lives on, says so (``store_unavailable`` in its log, ``ecos_store_writable 0``,
  ``ecos_store_errors_total{reason="disk_full"}``), keeps re-sending the probe, and once the disk
  has room the device's free replay is recorded and the round completes.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from broker import private_broker, requires_broker, shared_broker, unique_id, wait_until  # noqa: F401 - fixtures
from fullfs import fill, requires_mount, small_tmpfs
from test_daemon import _serve, _up, _write_toml, cloud_config, metric, scrape, start_agent

from cloud.errors import StoreUnavailable
from cloud.serve.daemon import build_daemon
from cloud.serve.store import ResponseRecord, RoundState, SqliteStore
from cloud.tools.broker import free_port

pytestmark = [pytest.mark.integration, requires_broker]


def public_key_of(state: Path) -> Path:
    """The cloud's public key, written by the daemon on its first start."""
    assert wait_until(lambda: list((state / "keys").glob("cloud_*.pub.pem")), 30)
    return sorted((state / "keys").glob("cloud_*.pub.pem"))[0]


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teacher-cache")


def test_a_probe_lost_with_a_killed_broker_is_sent_again_when_the_device_comes_back(
    tmp_path, private_broker, pool_index, encoder_path, digits_root, teacher_cache
):
    broker = private_broker
    _, index_path = pool_index
    # the timer is far beyond the deadline: only the reconnect can bring the probe back
    cfg = cloud_config(tmp_path, broker, index_path, teacher_cache, collect_seconds=45.0, probe_resend_seconds=600.0)
    daemon = build_daemon(cfg).start()
    dev = unique_id("lost")
    agent = None
    try:
        assert daemon.transport.wait_connected(10)
        agent = start_agent(dev, "street", tmp_path, broker, daemon.public_key_path, encoder_path, digits_root)
        agent.stop()  # offline; its persistent session makes the broker queue what comes for it
        assert wait_until(lambda: getattr(daemon.store.get_device(dev), "state", "") == "offline", 10)
        r = daemon.submit_round([dev])
        assert wait_until(lambda: daemon.metrics.messages.value(direction="out", type="probe") >= 1, 10)
        time.sleep(1.0)  # the probe is at the broker, queued for the offline device
        broker.kill()  # SIGKILL: the in-memory queue, and the probe in it, are lost
        broker.start()
        assert daemon.transport.wait_connected(30)
        agent = start_agent(dev, "street", tmp_path, broker, daemon.public_key_path, encoder_path, digits_root)
        done = daemon.wait_round(r.round_id, 150)
        assert done.state is RoundState.DONE, done.error
        assert done.result["timings"]["collecting"] < 40  # answered well before the deadline, not rescued by luck
        assert daemon.metrics.probes_resent.value(reason="reconnect") >= 1
        assert len(agent.ledger.releases()) == 1  # the re-sent probe was charged once
        assert agent.store.current("classifier").sha256 == done.result["sha256"]
        print(
            f"broker SIGKILL with a queued probe: re-sent on reconnect "
            f"{daemon.metrics.probes_resent.value(reason='reconnect'):.0f}x, collecting took "
            f"{done.result['timings']['collecting']:.1f}s of a 45s deadline, round done",
            file=sys.stderr,
        )
    finally:
        if agent is not None:
            agent.stop()
        daemon.stop()


@requires_mount
def test_the_real_daemon_survives_a_full_disk_says_so_and_completes_the_round_when_freed(
    tmp_path, shared_broker, pool_index, encoder_path, digits_root, teacher_cache
):
    broker = shared_broker
    _, index_path = pool_index
    config, log, port = tmp_path / "cloud.toml", tmp_path / "daemon.log", free_port()
    with small_tmpfs(16 * 1024) as fs:
        state = fs / "cloud"
        _write_toml(config, broker, index_path, teacher_cache, state, port)
        config.write_text(config.read_text().replace("[rounds]\n", "[rounds]\nprobe_resend_seconds = 2\n"))
        proc = _serve(config, log)
        agent = None
        dev = unique_id("full")
        try:
            assert wait_until(lambda: _up(port), 60), log.read_text()
            submitted = subprocess.run(
                [sys.executable, "-m", "cloud.cli", "round", "--config", str(config), dev],
                capture_output=True,
                text=True,
                check=True,
            )
            round_id = re.search(r"round (\w+)", submitted.stdout).group(1)
            store = SqliteStore(str(state / "ecos.db"))
            assert wait_until(lambda: store.get_round(round_id).state is RoundState.COLLECTING, 20), log.read_text()
            filler = fill(fs)
            with pytest.raises(StoreUnavailable):  # the WAL's last pages of room, taken: the disk is really full
                for i in range(5000):
                    store.add_response(ResponseRecord("fill", f"d{i}", "scores", "m", b"x" * 8192, time.time()))
            refused = subprocess.run(
                [sys.executable, "-m", "cloud.cli", "round", "--config", str(config), dev],
                capture_output=True,
                text=True,
            )
            assert refused.returncode == 14 and "error[store_unavailable]" in refused.stderr, refused.stderr

            agent = start_agent(dev, "printed", tmp_path, broker, public_key_of(state), encoder_path, digits_root)
            assert wait_until(lambda: metric(scrape(port), "ecos_store_errors_total", reason="disk_full") >= 1, 30), (
                log.read_text()
            )
            answers_in = lambda: metric(scrape(port), "ecos_messages_total", direction="in", type="scores")  # noqa: E731
            assert wait_until(lambda: answers_in() >= 1, 30)
            assert metric(scrape(port), "ecos_messages_dropped_total", reason="store_unavailable") >= 1  # not recorded
            text = scrape(port)
            assert metric(text, "ecos_store_writable") == 0 and proc.poll() is None
            assert store.responses(round_id) == [] and store.get_round(round_id).state is RoundState.COLLECTING
            assert "event=store_unavailable" in log.read_text()

            filler.unlink()
            freed = time.monotonic()
            assert wait_until(lambda: store.get_round(round_id).state.terminal, 150), log.read_text()
            r = store.get_round(round_id)
            assert r.state is RoundState.DONE, r.error
            assert metric(scrape(port), "ecos_store_writable") == 1 and "event=store_recovered" in log.read_text()
            assert len(agent.ledger.releases()) == 1  # every re-sent probe after the first answer cost nothing
            assert proc.poll() is None
            text = scrape(port)
            errors = metric(text, "ecos_store_errors_total", reason="disk_full")
            lost = metric(text, "ecos_messages_dropped_total", reason="store_unavailable")
            print(
                f"full disk: daemon alive, store errors {errors:.0f}, messages not recorded {lost:.0f}, "
                f"probes re-sent {metric(text, 'ecos_probes_resent_total', reason='timer'):.0f}, round done after "
                f"{time.monotonic() - freed:.1f}s once freed",
                file=sys.stderr,
            )
            store.close()
        finally:
            if agent is not None:
                agent.stop()
            if proc.poll() is None:
                proc.terminate()
                proc.wait(20)
