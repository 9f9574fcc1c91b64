"""The cloud daemon's configuration: typed sections read from TOML, then the environment.

    ecos-cloud serve --config cloud.toml

Each TOML table is one dataclass below (``[broker]``, ``[store]``, ``[rounds]``, ...). Any
scalar key can be overridden by an environment variable ``ECOS_CLOUD_<TABLE>_<KEY>`` (for
example ``ECOS_CLOUD_BROKER_PORT=1884``; ``ECOS_CLOUD_LOG_FORMAT`` at the top level), which is
how containers and systemd units usually set secrets and ports; an ``ECOS_CLOUD_*`` variable that
names no key is an error. Everything is checked once, at load, and a bad value is a
``UsageError`` that names the key, the value and what would be accepted. Relative paths in a
file are taken relative to that file's folder, so a config works from any working directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from device_sdk.config import apply_env, check_broker_login, from_mapping, read_toml
from device_sdk.errors import UsageError
from device_sdk.protocol import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from device_sdk.protocol.labels import MAX_VOTES_PER_SAMPLE
from device_sdk.protocol.round import CENTROID_CODECS
from device_sdk.transport import PROTOCOLS

ENV_PREFIX = "ECOS_CLOUD_"
LOG_FORMATS = ("kv", "json")
LABEL_FEATURE_SPACES = ("thumb16", "encoder")  # a client-labelling query: thumbnails, or the pool encoder's features


@dataclass(frozen=True)
class BrokerConfig:
    """Where the MQTT broker is, and how the daemon connects to it."""

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "5"
    client_id: str = "ecos-cloud"
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)  # better: password_file or ECOS_CLOUD_BROKER_PASSWORD
    password_file: Optional[str] = None  # its first line is the password
    keepalive: int = 30
    max_message_bytes: int = 1 << 20  # device -> cloud messages above this are dropped unread
    tls: bool = False  # TLS with the system's CAs; setting ca_file turns TLS on too
    ca_file: Optional[str] = None  # the CA that signed the broker's certificate
    cert_file: Optional[str] = None  # client certificate (and key_file) when the broker requires one
    key_file: Optional[str] = None
    tls_version: str = "1.2"  # the lowest TLS version accepted: "1.2" or "1.3"
    tls_insecure: bool = False  # tests only: no host name check (the certificate chain is still verified)


@dataclass(frozen=True)
class StoreConfig:
    """Where state lives: the job store's database, artifacts and per-round work folders."""

    state_dir: str = "ecos-state"
    backend: str = "sqlite"  # the job store (cloud/serve/store/): "sqlite" (<state_dir>/ecos.db) or "memory" (tests)
    index: str = ""  # pool index (.npz) from 'ecos-cloud index'; required
    keys_dir: str = ""  # Ed25519 key pair (cloud_ed25519.pem + .pub.pem); default <state_dir>/keys, made on first start

    @property
    def database(self) -> str:
        return os.path.join(self.state_dir, "ecos.db")

    @property
    def key_dir(self) -> str:
        return self.keys_dir or os.path.join(self.state_dir, "keys")


@dataclass(frozen=True)
class RoundConfig:
    """Defaults of a round (probe -> scores -> sampling -> training -> delivery)."""

    method: str = "ecos"
    budget: int = 1000
    collect_seconds: float = 120.0  # deadline for the devices' answers, from the probe
    min_responses: int = 1  # scores needed to go on at the deadline
    codec: str = "float16"
    max_distance: Optional[float] = None
    radius_quantile: float = 0.95  # coverage (docs/sampling.md): probes carry radii, devices a far count; 0 = off
    threshold_sigmas: float = 2.0
    # ECOS on a pool with domain folders: draw from the devices' domains where the votes fit them (docs/sampling.md);
    # false for pools whose folder levels above the label are not domains (batches, dates, sources)
    use_domains: bool = True
    # ... and where the votes fit none of its domains (the devices' domain most likely absent), up to this share
    # of the budget goes to a uniform draw (docs/sampling.md, "Votes that fit no domain"); 0 = off
    misfit_diversity: float = 0.5
    seed: int = 0
    # Plausibility of answers (docs/security.md): scores noisier than (max_epsilon, delta)-DP needs, from at most
    # max_samples samples per device; anything else is refused on arrival, and one device moves a sum by <= max_samples
    max_epsilon: float = 5.0
    delta: float = 1e-5
    max_samples: int = 100_000
    # the probe again to devices that have not answered, until the deadline (not frozen in a round: how this daemon
    # works); also at once when such a device comes back online. A repeated probe costs a device nothing.
    probe_resend_seconds: float = 30.0
    # Automated client labelling (a round with task "client"; docs/tasks.md): after sampling, the proxy set in
    # label_groups cosine groups goes to the devices as a signed label query in label_feature_space ("thumb16" or
    # "encoder"); each device sample votes for its votes_per_sample nearest groups (L2 sensitivity sqrt(m)); the
    # daemon waits label_seconds for the votes (resent like probes), and keeps a group's top label where it leads
    # the runner-up by min_margin noise sigmas
    label_groups: int = 50
    votes_per_sample: int = 2
    label_max_distance: Optional[float] = None
    label_feature_space: str = "thumb16"
    label_seconds: float = 120.0
    min_margin: float = 2.0


@dataclass(frozen=True)
class DeliveryConfig:
    """How artifacts travel: chunk size, send window, resend timeout, overall deadline."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    window: int = 8
    ack_timeout: float = 10.0
    deadline_seconds: float = 1800.0


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint (``port = 0`` turns it off)."""

    host: str = "127.0.0.1"
    port: int = 9108


@dataclass(frozen=True)
class TrainerConfig:
    """Which trainer runs a round's training stage, and its options (see cloud/training/trainers.py)."""

    name: str = "distill"
    threads: int = 2
    cache_dir: str = ""  # trained teachers etc.; default <state_dir>/cache (share it between daemons of one pool)
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CloudConfig:
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    rounds: RoundConfig = field(default_factory=RoundConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    log_format: str = "kv"


_PATH_KEYS = {
    ("store", "state_dir"),
    ("store", "index"),
    ("store", "keys_dir"),
    ("trainer", "cache_dir"),
    ("broker", "ca_file"),
    ("broker", "cert_file"),
    ("broker", "key_file"),
    ("broker", "password_file"),
}


def load_config(path: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> CloudConfig:
    """Read ``path`` (optional: defaults only), apply ``ECOS_CLOUD_*`` variables, validate."""
    raw: Dict[str, Any] = read_toml(path) if path else {}
    source = path or "defaults"
    base = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    for section, key in _PATH_KEYS:
        table = raw.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str) and table[key]:
            table[key] = os.path.normpath(os.path.join(base, os.path.expanduser(table[key])))
    apply_env(raw, CloudConfig, ENV_PREFIX, os.environ if env is None else env, source)
    cfg = from_mapping(CloudConfig, raw, source)
    validate(cfg)
    check_broker_login(cfg.broker, source)
    return cfg


def validate(cfg: CloudConfig) -> None:
    """Range checks; each message says which key to change and to what."""
    b, s, r, d, m = cfg.broker, cfg.store, cfg.rounds, cfg.delivery, cfg.metrics
    _need(1 <= b.port <= 65535, f"[broker] port must be 1..65535, got {b.port}")
    _need(
        b.protocol in PROTOCOLS,
        f"[broker] protocol must be one of {', '.join(sorted(PROTOCOLS))} (a string), got {b.protocol!r}",
    )
    _need(b.keepalive >= 5, f"[broker] keepalive must be >= 5 seconds, got {b.keepalive}")
    _need(b.max_message_bytes >= 4096, f"[broker] max_message_bytes must be >= 4096, got {b.max_message_bytes}")
    _need(bool(s.state_dir), "[store] state_dir must name a folder for the database and artifacts")
    from cloud.serve.store import BACKENDS  # here: the store's modules need not load with the config

    _need(s.backend in BACKENDS, f"[store] backend must be one of {', '.join(BACKENDS.names())}, got {s.backend!r}")
    _need(r.budget >= 1, f"[rounds] budget must be >= 1 images, got {r.budget}")
    _need(r.collect_seconds > 0, f"[rounds] collect_seconds must be > 0, got {r.collect_seconds}")
    _need(r.min_responses >= 1, f"[rounds] min_responses must be >= 1, got {r.min_responses}")
    _need(
        r.max_epsilon > 0 and 0 < r.delta < 1 and r.max_samples >= 1,
        f"[rounds] need max_epsilon > 0 (inf: any noise), 0 < delta < 1 and max_samples >= 1, got {r.max_epsilon}, "
        f"{r.delta}, {r.max_samples}",
    )
    _need(
        0.0 <= r.radius_quantile <= 1.0,
        f"[rounds] radius_quantile must lie in [0, 1] (0 = no coverage), got {r.radius_quantile!r}",
    )
    _need(
        0.0 <= r.misfit_diversity <= 1.0,
        f"[rounds] misfit_diversity must lie in [0, 1] (0 = off), got {r.misfit_diversity!r}",
    )
    _need(r.probe_resend_seconds > 0, f"[rounds] probe_resend_seconds must be > 0, got {r.probe_resend_seconds}")
    _need(r.label_groups >= 0, f"[rounds] label_groups must be >= 0 (0: one group per image), got {r.label_groups}")
    _need(
        1 <= r.votes_per_sample <= MAX_VOTES_PER_SAMPLE,
        f"[rounds] votes_per_sample must be 1..{MAX_VOTES_PER_SAMPLE}, got {r.votes_per_sample}",
    )
    _need(
        r.label_max_distance is None or 0 <= r.label_max_distance <= 2,
        f"[rounds] label_max_distance must be a cosine distance in [0, 2], got {r.label_max_distance}",
    )
    _need(
        r.label_feature_space in LABEL_FEATURE_SPACES,
        f"[rounds] label_feature_space must be one of {', '.join(LABEL_FEATURE_SPACES)}, got {r.label_feature_space!r}",
    )
    _need(r.label_seconds > 0 and r.min_margin >= 0, "[rounds] need label_seconds > 0 and min_margin >= 0")
    _need(r.codec in CENTROID_CODECS, f"[rounds] codec must be one of {', '.join(CENTROID_CODECS)}, got {r.codec!r}")
    _need(
        MIN_CHUNK_SIZE <= d.chunk_size <= MAX_CHUNK_SIZE,
        f"[delivery] chunk_size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes (under a 256 KB broker packet limit), "
        f"got {d.chunk_size}",
    )
    _need(d.window >= 1, f"[delivery] window must be >= 1 chunks, got {d.window}")
    _need(
        d.ack_timeout > 0 and d.deadline_seconds > d.ack_timeout,
        f"[delivery] need 0 < ack_timeout < deadline_seconds, got {d.ack_timeout} and {d.deadline_seconds}",
    )
    _need(0 <= m.port <= 65535, f"[metrics] port must be 0 (off) or 1..65535, got {m.port}")
    _need(cfg.trainer.threads >= 1, f"[trainer] threads must be >= 1, got {cfg.trainer.threads}")
    _need(cfg.log_format in LOG_FORMATS, f"log_format must be one of {', '.join(LOG_FORMATS)}, got {cfg.log_format!r}")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def require_index(cfg: CloudConfig) -> str:
    """The daemon cannot run rounds without a pool index; say how to make one."""
    if not cfg.store.index or not os.path.isfile(cfg.store.index):
        raise UsageError(
            f"[store] index must point to a pool index file (got {cfg.store.index!r}); "
            "build one with 'ecos-cloud index POOL --encoder ENCODER --out pool.index.npz --probe round.probe'"
        )
    return cfg.store.index
