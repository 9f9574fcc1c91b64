"""Prometheus exposition and the structured log lines of the daemon."""

from __future__ import annotations

import io
import json
import logging
import re
import urllib.error
import urllib.request

import pytest

from cloud.serve.eventlog import StructuredFormatter, log_event
from cloud.serve.metrics import DaemonMetrics, MetricsServer, Registry

LINE = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)*\})? (-?[0-9.e+]+|NaN|[+-]Inf)$')


def test_counters_and_gauges_render_in_the_text_format():
    reg = Registry()
    c = reg.counter("ecos_things_total", "Things.")
    c.inc(direction="in", type="scores")
    c.inc(2.5, direction="in", type="scores")
    c.inc(type='a"b\\c\nd')
    g = reg.gauge("ecos_level", "A level.")
    g.set(3)
    text = reg.render()
    assert text.startswith("# HELP ecos_things_total Things.\n# TYPE ecos_things_total counter\n")
    assert 'ecos_things_total{direction="in",type="scores"} 3.5' in text
    assert 'ecos_things_total{type="a\\"b\\\\c\\nd"} 1' in text
    assert "# TYPE ecos_level gauge\necos_level 3\n" in text
    for line in text.splitlines():
        assert line.startswith("# ") or LINE.match(line), line
    with pytest.raises(ValueError, match="only goes up"):
        c.inc(-1)
    with pytest.raises(ValueError, match="twice"):
        reg.counter("ecos_level", "again")


def test_store_backed_gauges_are_read_at_each_scrape():
    rounds = {"done": 1, "failed": 0}
    m = DaemonMetrics(lambda: rounds, lambda: {"online": 2})
    assert 'ecos_rounds{state="done"} 1' in m.render()
    rounds["done"] = 4
    assert 'ecos_rounds{state="done"} 4' in m.render() and 'ecos_devices{state="online"} 2' in m.render()


def test_the_endpoint_serves_metrics_and_nothing_else():
    server = MetricsServer(lambda: "ecos_up 1\n", port=0).start()
    try:
        host, port = server.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
            assert resp.read() == b"ecos_up 1\n" and resp.headers["Content-Type"].startswith(
                "text/plain; version=0.0.4"
            )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{host}:{port}/admin", timeout=5)
        assert err.value.code == 404
    finally:
        server.stop()


def _capture(style: str):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(StructuredFormatter(style))
    logger = logging.getLogger(f"test.eventlog.{style}")
    logger.handlers, logger.propagate, logger.level = [handler], False, logging.DEBUG
    return logger, stream


def test_events_as_key_value_lines():
    logger, stream = _capture("kv")
    log_event(logger, "round_state", round="abc", state="collecting", devices=["a", "b"], note="two words", empty="")
    line = stream.getvalue().strip()
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO test\.eventlog\.kv ", line)
    assert line.endswith(
        'event=round_state round=abc state=collecting devices="[\\"a\\", \\"b\\"]" note="two words" empty=""'
    )


def test_events_as_json_lines_with_exceptions():
    logger, stream = _capture("json")
    log_event(logger, "response", logging.WARNING, round="r1", bytes=677)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("plain message")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())  # one line per record
    assert (first["event"], first["round"], first["bytes"], first["level"]) == ("response", "r1", 677, "WARNING")
    assert second["msg"] == "plain message" and "RuntimeError: boom" in second["exc"]
