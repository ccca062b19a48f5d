from pathlib import Path

import pytest

from lmc_connector.config import CacheConfig, ConfigError, load_config

SEED_YAML = """\
chunk_size: 256
local_cpu: True
max_local_cpu_size: 5

# cache controller configurations
enable_controller: True
lmcache_instance_id: "lmcache_default_instance"
controller_pull_url: "localhost:9001"
lmcache_worker_ports: 8001

# Peer identifiers
p2p_host: "localhost"
p2p_init_ports: 8200
"""


def write_yaml(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return {"LMCACHE_CONFIG_FILE": str(path)}


def test_defaults_need_no_file() -> None:
    assert load_config(env={}) == CacheConfig()


def test_seed_yaml_loads(tmp_path: Path) -> None:
    config = load_config(env=write_yaml(tmp_path, SEED_YAML))
    assert config.chunk_size == 256
    assert config.max_local_cpu_bytes == 5 * 10**9
    assert config.enable_controller
    assert config.controller_pull_url == "localhost:9001"
    assert config.lmcache_worker_ports == [8001]
    assert config.p2p_init_ports == [8200]


def test_misspelled_key_names_the_close_match(tmp_path: Path) -> None:
    env = write_yaml(tmp_path, "lcache_worker_ports: 8001\n")
    with pytest.raises(ConfigError, match="did you mean lmcache_worker_ports"):
        load_config(env=env)


def test_misspelled_environment_variable_names_the_close_match() -> None:
    with pytest.raises(ConfigError, match=r"LMCACHE_CHUNKSIZE.*did you mean chunk_size"):
        load_config(env={"LMCACHE_CHUNKSIZE": "128"})


def test_wrong_type_names_key_value_and_what_is_allowed() -> None:
    with pytest.raises(ConfigError, match=r"max_local_cpu_size='lots'.*expected a number"):
        load_config({"max_local_cpu_size": "lots"}, env={})


def test_wrong_choice_lists_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match="'auto', 'cpu', 'cuda'"):
        load_config({"codec_device": "tpu"}, env={})


def test_enable_controller_without_url_says_what_is_missing() -> None:
    with pytest.raises(ConfigError, match="requires controller_pull_url and lmcache_worker_ports"):
        load_config({"enable_controller": True}, env={})


def test_priority_is_yaml_then_environment_then_extra_config(tmp_path: Path) -> None:
    env = write_yaml(tmp_path, "chunk_size: 64\nmax_local_cpu_size: 1\nlocal_disk: /tmp/a\n")
    env["LMCACHE_CHUNK_SIZE"] = "128"
    env["LMCACHE_MAX_LOCAL_CPU_SIZE"] = "2"
    config = load_config({"lmcache.chunk_size": 32}, env=env)
    assert (config.chunk_size, config.max_local_cpu_size, config.local_disk) == (32, 2.0, "/tmp/a")


def test_worker_ports_accept_a_list_or_a_base_port() -> None:
    assert load_config({"lmcache_worker_ports": [8001, 8005]}, env={}).worker_port(1) == 8005
    assert load_config({"lmcache_worker_ports": 8001}, env={}).worker_port(1) == 8002


def test_missing_config_file_is_reported() -> None:
    with pytest.raises(ConfigError, match="does not name a readable file"):
        load_config(env={"LMCACHE_CONFIG_FILE": "/nonexistent/lmc.yaml"})


def test_invalid_yaml_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(env=write_yaml(tmp_path, "chunk_size: [1,\n"))


def test_file_url_for_disk_tier_is_a_path() -> None:
    assert load_config({"local_disk": "file:///var/cache/kv"}, env={}).local_disk == "/var/cache/kv"


def test_no_location_at_all_is_rejected() -> None:
    with pytest.raises(ConfigError, match="no cache location"):
        load_config({"local_cpu": False}, env={})


def test_unknown_environment_variable_says_how_to_fix_it() -> None:
    with pytest.raises(ConfigError, match="rename it, or unset it"):
        load_config(env={"LMCACHE_TRACK_USAGE": "false"})


def test_ports_out_of_range_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"lmcache_worker_ports: \[70000\] are not TCP ports"):
        load_config({"lmcache_worker_ports": 70000}, env={})


def test_non_positive_heartbeat_interval_is_rejected() -> None:
    with pytest.raises(ConfigError, match="controller_heartbeat_interval=0"):
        load_config({"controller_heartbeat_interval": 0}, env={})
