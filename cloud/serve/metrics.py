"""Prometheus metrics of the daemon, in the text exposition format, over plain ``http.server``.

No client library is needed: counters and gauges with labels are a few dictionaries, and the
format (``# HELP``, ``# TYPE``, ``name{label="v"} value``) is simple. Gauges whose truth lives
in the store (rounds by state, devices online) are read at scrape time through a callback, so
they are right even after a restart; counters count what this process saw since it started,
which is what ``rate()`` expects.
"""

from __future__ import annotations

import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Optional, Tuple

LabelKey = Tuple[Tuple[str, str], ...]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _key(labels: Dict[str, str]) -> LabelKey:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, doc: str):
        self.name, self.doc = name, doc
        self._values: Dict[LabelKey, float] = {}
        self._lock = threading.Lock()

    def samples(self) -> List[Tuple[LabelKey, float]]:
        with self._lock:
            return sorted(self._values.items())

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(_key(labels), 0.0)

    def render(self) -> List[str]:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} {self.kind}"]
        for key, value in self.samples():
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
            lines.append(f"{self.name}{{{label_text}}} {_number(value)}" if key else f"{self.name} {_number(value)}")
        return lines


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up")
        with self._lock:
            key = _key(labels)
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Metric):
    """A value that goes up and down; with ``source`` it is computed at each scrape."""

    kind = "gauge"

    def __init__(self, name: str, doc: str, source: Optional[Callable[[], Dict[LabelKey, float]]] = None):
        super().__init__(name, doc)
        self._source = source

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[_key(labels)] = float(value)

    def samples(self) -> List[Tuple[LabelKey, float]]:
        if self._source is None:
            return super().samples()
        return sorted(self._source().items())


class Registry:
    """Named metrics, rendered together."""

    def __init__(self) -> None:
        self._metrics: Dict[str, _Metric] = {}

    def counter(self, name: str, doc: str) -> Counter:
        return self._add(Counter(name, doc))

    def gauge(self, name: str, doc: str, source: Optional[Callable[[], Dict[LabelKey, float]]] = None) -> Gauge:
        return self._add(Gauge(name, doc, source))

    def _add(self, metric):
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is registered twice")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        return "\n".join(line for m in self._metrics.values() for line in m.render()) + "\n"


class DaemonMetrics:
    """The daemon's metrics, by name; rounds and devices are read from the store at each scrape."""

    def __init__(self, rounds_by_state: Callable[[], Dict[str, int]], devices_by_state: Callable[[], Dict[str, int]]):
        r = self.registry = Registry()
        r.gauge(
            "ecos_rounds",
            "Rounds by state (from the store).",
            lambda: {_key({"state": s}): float(n) for s, n in rounds_by_state().items()},
        )
        r.gauge(
            "ecos_devices",
            "Known devices by last reported state (from the store).",
            lambda: {_key({"state": s}): float(n) for s, n in devices_by_state().items()},
        )
        self.messages = r.counter("ecos_messages_total", "MQTT messages by direction (in/out) and message type.")
        self.bytes = r.counter("ecos_bytes_total", "MQTT payload bytes by direction (in/out) and message type.")
        self.responses = r.counter(
            "ecos_responses_total", "Device responses to probes by kind and outcome (new/duplicate/late)."
        )
        self.chunks = r.counter("ecos_delivery_chunks_total", "Artifact chunks published (first sends and resends).")
        self.deliveries = r.counter("ecos_deliveries_total", "Finished deliveries by outcome (installed/failed).")
        self.errors = r.counter("ecos_errors_total", "Messages dropped and stages failed, by reason.")
        self.dropped = r.counter(
            "ecos_messages_dropped_total",
            "Incoming messages dropped unhandled, by reason (malformed, oversized, an error code, "
            "internal_error, queue_full).",
        )
        self.scores_refused = r.counter(
            "ecos_scores_refused_total", "Scores refused as implausible, by the check that failed (docs/security.md)."
        )
        self.probes_resent = r.counter(
            "ecos_probes_resent_total",
            "Probes sent again to devices that had not answered, by reason (timer/reconnect).",
        )
        self.store_errors = r.counter(
            "ecos_store_errors_total",
            "Writes the state database refused (disk_full, read_only, io_error, busy); the daemon goes on and retries.",
        )
        self.store_writable = r.gauge(
            "ecos_store_writable",
            "1 while the state database takes writes, 0 after a refused one until writes succeed again.",
        )
        self.store_writable.set(1.0)
        self.stage_seconds = r.counter("ecos_stage_seconds_total", "Seconds spent in each round stage.")
        self.transitions = r.counter("ecos_round_transitions_total", "Round state changes, by target state.")
        self.training_progress = r.gauge("ecos_training_progress_ratio", "Progress of the current training job (0..1).")

    def render(self) -> str:
        return self.registry.render()


class MetricsServer:
    """``GET /metrics`` on ``host:port`` from a daemon thread (``port=0``: pick a free port)."""

    def __init__(self, render: Callable[[], str], host: str = "127.0.0.1", port: int = 0):
        handler = _handler(render)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ecos-metrics", daemon=True)

    @property
    def address(self) -> Tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(render: Callable[[], str]):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404, "try /metrics")
                return
            body = render().encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes every few seconds would flood the log
            pass

    return Handler
