"""cloud.toml: defaults, paths relative to the file, environment overrides, messages that say what to fix."""

from __future__ import annotations

import pytest

from cloud.serve.config import CloudConfig, load_config, require_index
from device_sdk.errors import UsageError


def write(tmp_path, text: str):
    path = tmp_path / "conf" / "cloud.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(path)


def test_defaults_need_no_file():
    cfg = load_config(env={})
    assert cfg == CloudConfig()
    assert (
        cfg.delivery.chunk_size == 64 * 1024 and cfg.broker.protocol == "5" and cfg.store.database.endswith("ecos.db")
    )


def test_file_values_nested_options_and_paths_relative_to_the_file(tmp_path):
    path = write(
        tmp_path,
        """
log_format = "json"
[store]
state_dir = "state"
index = "../pool.index.npz"
[rounds]
budget = 250
collect_seconds = 30
[trainer.options.student]
epochs = 3
""",
    )
    cfg = load_config(path, env={})
    assert cfg.store.state_dir == str(tmp_path / "conf" / "state")
    assert cfg.store.index == str(tmp_path / "pool.index.npz")
    assert cfg.store.key_dir == str(tmp_path / "conf" / "state" / "keys")
    assert (cfg.rounds.budget, cfg.rounds.collect_seconds, cfg.log_format) == (250, 30.0, "json")
    assert cfg.trainer.options == {"student": {"epochs": 3}}


def test_environment_overrides_the_file(tmp_path):
    path = write(tmp_path, "[broker]\nport = 1884\n[rounds]\nmax_distance = 0.4\n")
    env = {
        "ECOS_CLOUD_BROKER_PORT": "1999",
        "ECOS_CLOUD_BROKER_USERNAME": "ecos",
        "ECOS_CLOUD_BROKER_PASSWORD": "s3cret",
        "ECOS_CLOUD_ROUNDS_MAX_DISTANCE": "none",
        "ECOS_CLOUD_LOG_FORMAT": "json",
    }
    cfg = load_config(path, env=env)
    assert (cfg.broker.port, cfg.broker.password, cfg.rounds.max_distance, cfg.log_format) == (
        1999,
        "s3cret",
        None,
        "json",
    )


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[broker]\nport = 0\n", "[broker] port must be 1..65535, got 0"),
        ("[broker]\nprotocol = 5\n", "[broker] protocol must be str"),
        ('[broker]\nprotocol = "4"\n', "protocol must be one of 3.1.1, 5"),
        ("[delivery]\nchunk_size = 300000\n", "[delivery] chunk_size must be 1024..196608"),
        ("[delivery]\nack_timeout = 50\ndeadline_seconds = 10\n", "ack_timeout < deadline_seconds"),
        ("[rounds]\nbudget = 0\n", "[rounds] budget must be >= 1"),
        ('[rounds]\ncodec = "jpeg"\n', "codec must be one of"),
        ("[rounds]\nmisfit_diversity = 1.5\n", "[rounds] misfit_diversity must lie in [0, 1]"),
        ("[rounds]\nbudjet = 10\n", "unknown key(s) budjet at [rounds]; valid: method, budget"),
        ("[brokers]\n", "unknown key(s) brokers at top level"),
        ('log_format = "xml"\n', "log_format must be one of kv, json"),
        ("[metrics]\nport = -1\n", "[metrics] port must be 0 (off) or 1..65535"),
        ('[store]\nbackend = "postgres"\n', "[store] backend must be one of memory, sqlite, got 'postgres'"),
        ("[broker\n", "not valid TOML"),
    ],
)
def test_bad_values_name_the_key_and_what_is_accepted(tmp_path, text, needle):
    with pytest.raises(UsageError) as err:
        load_config(write(tmp_path, text), env={})
    assert needle in str(err.value)


def test_the_store_backend_comes_from_the_file_or_the_environment(tmp_path):
    from cloud.serve.store import MemoryStore, SqliteStore, open_store

    assert CloudConfig().store.backend == "sqlite"
    cfg = load_config(write(tmp_path, '[store]\nbackend = "memory"\n'), env={})
    assert cfg.store.backend == "memory" and isinstance(open_store(cfg.store), MemoryStore)
    cfg = load_config(env={"ECOS_CLOUD_STORE_BACKEND": "sqlite", "ECOS_CLOUD_STORE_STATE_DIR": str(tmp_path)})
    store = open_store(cfg.store)
    assert isinstance(store, SqliteStore) and store.path == str(tmp_path / "ecos.db")
    store.close()


def test_bad_environment_values_are_usage_errors():
    with pytest.raises(UsageError, match="ECOS_CLOUD_BROKER_PORT='many': expected int"):
        load_config(env={"ECOS_CLOUD_BROKER_PORT": "many"})


def test_a_missing_file_or_index_says_what_to_do(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        load_config(str(tmp_path / "nope.toml"), env={})
    with pytest.raises(UsageError, match="ecos-cloud index"):
        require_index(load_config(env={}))
