import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmc_connector import config as config_module
from lmc_connector.config import KEYS, CacheConfig, ConfigError, load_config
from lmc_connector.config_lmcache import LMCACHE_KEYS

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


#: An LMCache configuration with a dozen keys this connector does not implement.
LMCACHE_YAML = (
    SEED_YAML
    + """
save_decode_cache: false
use_layerwise: true
enable_blending: false
cache_policy: LRU
local_device: cpu
extra_config: {enable_nixl_storage: false}
blend_special_str: " # # "
pre_caching_hash_algorithm: builtin
save_unfull_chunk: true
p2p_lookup_ports: 8201
remote_serde: naive
lmcache_worker_heartbeat_time: 10
"""
)


@pytest.fixture(autouse=True)
def fresh_warnings() -> Iterator[None]:
    """The ignored-keys warning is logged once per process; each test starts afresh."""
    config_module._warn_once.cache_clear()
    yield
    config_module._warn_once.cache_clear()


def ignored_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "not implemented here, ignored" in r.getMessage()
    ]


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
    with pytest.raises(ConfigError, match=r"LMCACHE_CHUNK_SIZ\b.*rename or unset the variable"):
        load_config(env={"LMCACHE_CHUNK_SIZ": "64"})


def test_lmcache_yaml_loads_with_one_warning_listing_every_ignored_setting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = write_yaml(tmp_path, LMCACHE_YAML)
    env |= {"LMCACHE_USE_EXPERIMENTAL": "True", "LMCACHE_TRACK_USAGE": "false"}
    with caplog.at_level(logging.WARNING):
        extra = {"use_native": True, "lmcache.transfer_channel": "nixl"}
        config = load_config(extra, env=env)
        load_config(extra, env=env)  # vLLM builds the config once per role: still one warning
    assert config.chunk_size == 256 and config.lmcache_worker_ports == [8001]
    (warning,) = ignored_warnings(caplog)
    for name in (
        "save_decode_cache",
        "use_layerwise",
        "enable_blending",
        "cache_policy",
        "local_device",
        "extra_config",
        "p2p_lookup_ports",
        "LMCACHE_USE_EXPERIMENTAL",
        "LMCACHE_TRACK_USAGE",
        "kv_connector_extra_config: use_native, lmcache.transfer_channel",  # as written
    ):
        assert name in warning, name
    assert "chunk_size" not in warning and "lmcache_worker_ports" not in warning


def test_a_true_typo_still_fails_with_the_suggestion(tmp_path: Path) -> None:
    env = write_yaml(tmp_path, LMCACHE_YAML + "max_local_cpu_sise: 5\n")
    with pytest.raises(
        ConfigError, match="max_local_cpu_sise: unknown key: did you mean max_local_cpu_size"
    ):
        load_config(env=env)


def test_every_unknown_key_is_reported_at_once(tmp_path: Path) -> None:
    env = write_yaml(tmp_path, "chunk_sise: 64\nlocal_cpus: true\n")
    env["LMCACHE_MAX_LOCAL_CPU_SIZ"] = "1"
    with pytest.raises(ConfigError) as raised:
        load_config({"lmcache.lookup_timeout": 100, "codec_device": "tpu"}, env=env)
    message = str(raised.value)
    assert message.startswith("5 problems in the configuration:")
    for expected in (
        "chunk_sise: unknown key: did you mean chunk_size?",
        "local_cpus: unknown key: did you mean local_cpu?",
        "LMCACHE_MAX_LOCAL_CPU_SIZ: unknown key: did you mean max_local_cpu_size?",
        "lookup_timeout: unknown key: did you mean lookup_timeout_ms?",
        "codec_device='tpu' is not valid",
    ):
        assert expected in message, expected


def test_a_misspelled_lmcache_key_is_suggested_and_marked_ignored() -> None:
    with pytest.raises(ConfigError, match=r"did you mean save_decode_cache\? \(an LMCache key"):
        load_config({"save_decode_cach": False}, env={})


def test_a_key_of_nobody_says_so_without_dumping_every_key() -> None:
    with pytest.raises(ConfigError, match="not a key of lmc_connector nor of LMCache") as raised:
        load_config({"zzz_frobnicate": 1}, env={})
    assert "chunk_size" not in str(raised.value)


def test_lmcache_comma_form_of_a_list_from_the_environment_and_yaml(tmp_path: Path) -> None:
    env = {"LMCACHE_LMCACHE_WORKER_PORTS": "8001,8002"}
    assert load_config(env=env).lmcache_worker_ports == [8001, 8002]
    env = write_yaml(tmp_path, 'p2p_init_ports: "8200, 8201"\n')
    assert load_config(env=env).p2p_init_ports == [8200, 8201]
    with pytest.raises(
        ConfigError, match=r"LMCACHE_LMCACHE_WORKER_PORTS='8001,x'.*comma-separated"
    ):
        load_config(env={"LMCACHE_LMCACHE_WORKER_PORTS": "8001,x"})


def test_lmcache_aliases_set_the_current_keys() -> None:
    config = load_config({"controller_url": "localhost:9001", "lmcache_worker_port": 8001}, env={})
    assert (config.controller_pull_url, config.lmcache_worker_ports) == ("localhost:9001", [8001])
    with pytest.raises(
        ConfigError, match="controller_url and controller_pull_url set the same key"
    ):
        load_config({"controller_url": "a:1", "controller_pull_url": "a:1"}, env={})


def test_ignored_keys_are_lmcaches_keys_that_cacheconfig_lacks() -> None:
    """Implementing an LMCache key is adding the field to CacheConfig: nothing else lists it."""
    ours_and_theirs = set(KEYS) & LMCACHE_KEYS
    assert {"chunk_size", "local_disk", "lmcache_worker_ports"} <= ours_and_theirs
    values = {key: CacheConfig().__getattribute__(key) for key in ours_and_theirs}
    assert load_config(values, env={}) == CacheConfig()


def test_ports_out_of_range_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"lmcache_worker_ports: \[70000\] are not TCP ports"):
        load_config({"lmcache_worker_ports": 70000}, env={})


def test_non_positive_heartbeat_interval_is_rejected() -> None:
    with pytest.raises(ConfigError, match="controller_heartbeat_interval=0"):
        load_config({"controller_heartbeat_interval": 0}, env={})


def test_shared_store_keys_have_lmcache_defaults() -> None:
    config = load_config(env={})
    assert config.remote_url is None
    assert (config.remote_serde, config.remote_timeout_ms) == ("naive", 200)


def test_shared_store_keys_come_from_yaml_and_environment(tmp_path: Path) -> None:
    env = write_yaml(tmp_path, 'remote_url: "redis://localhost:6379"\nremote_serde: cachegen\n')
    env["LMCACHE_REMOTE_TIMEOUT_MS"] = "50"
    config = load_config(env=env)
    assert config.remote_url == "redis://localhost:6379"
    assert config.remote_serde == "cachegen"
    assert config.remote_timeout_ms == 50


def test_a_bad_remote_url_fails_with_the_accepted_forms() -> None:
    with pytest.raises(ConfigError, match=r"unknown scheme 'redi'.*accepted forms: redis://"):
        load_config({"remote_url": "redi://localhost:6379"}, env={})


def test_an_unknown_remote_serde_names_the_close_match_and_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"did you mean cachegen\?.*naive, cachegen, fp8"):
        load_config({"remote_url": "redis://localhost", "remote_serde": "cachgen"}, env={})


def test_compress_before_evict_takes_any_codec_a_calibrated_one_included() -> None:
    assert load_config({"compress_before_evict": "kvtc"}, env={}).compress_before_evict == "kvtc"
    with pytest.raises(ConfigError, match=r"compress_before_evict='kvt'.*did you mean kvtc\?"):
        load_config({"compress_before_evict": "kvt"}, env={})


def test_remote_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="remote_timeout_ms=0 must be > 0"):
        load_config({"remote_url": "redis://localhost", "remote_timeout_ms": 0}, env={})


def test_reset_shared_store_is_off_by_default_and_takes_a_boolean() -> None:
    assert load_config(env={}).reset_shared_store is False
    assert load_config({"reset_shared_store": True}, env={}).reset_shared_store is True
    assert load_config(env={"LMCACHE_RESET_SHARED_STORE": "true"}).reset_shared_store is True
    with pytest.raises(ConfigError, match=r"reset_shared_store='sometimes'.*true or false"):
        load_config({"reset_shared_store": "sometimes"}, env={})


P2P = {
    "enable_controller": True,
    "controller_pull_url": "localhost:9001",
    "lmcache_worker_ports": 8001,
    "enable_p2p": True,
    "controller_reply_url": "localhost:9002",
    "p2p_init_ports": 8200,
}


def test_seed_peer_keys_give_one_port_per_rank() -> None:
    config = load_config(P2P, env={})
    assert config.enable_p2p and config.peer_host == "127.0.0.1"
    assert [config.peer_port(r) for r in range(3)] == [8200, 8201, 8202]
    listed = load_config({**P2P, "p2p_init_ports": [8200, 8300]}, env={})
    assert listed.peer_port(1) == 8300
    with pytest.raises(ConfigError, match="p2p_init_ports lists 2 ports but rank 2"):
        listed.peer_port(2)


@pytest.mark.parametrize("missing", ["enable_controller", "controller_reply_url", "p2p_init_ports"])
def test_enable_p2p_names_each_missing_key(missing: str) -> None:
    values = {k: v for k, v in P2P.items() if k != missing}
    with pytest.raises(ConfigError, match=f"enable_p2p: true requires {missing}"):
        load_config(values, env={})


def test_p2p_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="p2p_timeout_ms=0 must be > 0"):
        load_config({"p2p_timeout_ms": 0}, env={})


def test_lookup_host_beyond_loopback_needs_the_secret(tmp_path: Path) -> None:
    assert load_config({"lookup_host": "127.0.0.1"}, env={}).lookup_host == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"not a loopback address.*set control_secret_file"):
        load_config({"lookup_host": "192.0.2.7"}, env={})
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    with_secret = {"lookup_host": "192.0.2.7", "control_secret_file": str(secret)}
    assert load_config(with_secret, env={}).lookup_host == "192.0.2.7"


def test_save_queue_must_hold_at_least_one_chunk() -> None:
    assert load_config(env={}).save_queue_chunks == 256
    assert load_config({"save_queue_chunks": 8}, env={}).save_queue_chunks == 8
    with pytest.raises(ConfigError, match="save_queue_chunks=0 must be a positive"):
        load_config({"save_queue_chunks": 0}, env={})


def test_a_list_written_as_yaml_inside_a_string_is_a_list(tmp_path: Path) -> None:
    assert load_config({"lmcache_worker_ports": "[8001, 8002]"}, env={}).lmcache_worker_ports == [
        8001,
        8002,
    ]
    env = write_yaml(tmp_path, "p2p_init_ports: '[8200, 8201]'\n")
    assert load_config(env=env).p2p_init_ports == [8200, 8201]


def test_text_keys_take_an_environment_value_as_written() -> None:
    for text in ("007", "yes", "1e3", "null"):
        env = {"LMCACHE_LMCACHE_INSTANCE_ID": text}
        assert load_config(env=env).lmcache_instance_id == text


def test_a_number_given_for_a_text_key_is_its_text_and_a_boolean_says_to_quote_it() -> None:
    assert load_config({"lmcache_instance_id": 42}, env={}).lmcache_instance_id == "42"
    with pytest.raises(ConfigError, match=r"lmcache_instance_id=True .*quote it"):
        load_config({"lmcache_instance_id": True}, env={})


def test_an_instance_id_the_controller_would_refuse_fails_at_start_up() -> None:
    with pytest.raises(ConfigError, match="lmcache_instance_id has 0 characters: give it 1 to 256"):
        load_config({"lmcache_instance_id": ""}, env={})
    with pytest.raises(ConfigError, match="has 257 characters"):
        load_config({"lmcache_instance_id": "x" * 257}, env={})
    assert load_config({"lmcache_instance_id": "x" * 256}, env={}).lmcache_instance_id


def test_extra_config_with_and_without_the_lmcache_prefix_for_one_key_is_a_conflict() -> None:
    extra = {"lmcache.lmcache_instance_id": "a", "lmcache_instance_id": "b"}
    with pytest.raises(ConfigError, match=r"lmcache\.lmcache_instance_id and lmcache_instance_id"):
        load_config(extra, env={})
    assert load_config({"lmcache.chunk_size": 512}, env={}).chunk_size == 512
    with pytest.raises(ConfigError, match=r"lmcache\.chunksize: unknown key: did you mean"):
        load_config({"lmcache.chunksize": 512}, env={})


def test_every_unmet_requirement_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config({"chunk_size": 0, "max_local_cpu_size": 0, "p2p_timeout_ms": 0}, env={})
    message = str(raised.value)
    assert message.startswith("3 problems in the configuration:")
    for part in ("chunk_size=0", "max_local_cpu_size=0", "p2p_timeout_ms=0"):
        assert part in message


def test_a_controller_address_that_is_not_host_port_fails_at_start_up() -> None:
    extra = {"enable_controller": True, "lmcache_worker_ports": 8001}
    with pytest.raises(ConfigError, match=r"controller_pull_url='localhost' is not host:port"):
        load_config({**extra, "controller_pull_url": "localhost"}, env={})
    with pytest.raises(ConfigError, match=r"controller_reply_url='x:99999' is not host:port"):
        load_config({"controller_reply_url": "x:99999"}, env={})
    assert load_config({**extra, "controller_pull_url": "tcp://h:9001"}, env={}).enable_controller


def test_a_store_beyond_this_host_needs_a_password_or_control_insecure() -> None:
    with pytest.raises(ConfigError, match=r"reaches 10\.0\.0\.5 beyond this host with no pass"):
        load_config({"remote_url": "redis://10.0.0.5:6379"}, env={})
    with pytest.raises(ConfigError, match=r"reaches 10\.0\.0\.6 beyond"):
        load_config({"remote_url": "redis-cluster://127.0.0.1:7000,10.0.0.6:7001"}, env={})
    for allowed in (
        {"remote_url": "redis://:s3cret@10.0.0.5:6379"},
        {"remote_url": "rediss://alice:s3cret@10.0.0.5:6380/1"},
        {"remote_url": "redis://10.0.0.5:6379", "control_insecure": True},
        {"remote_url": "redis://localhost:6379"},
        {"remote_url": "redis-cluster://127.0.0.1:7000,[::1]:7001"},
    ):
        assert load_config(allowed, env={}).remote_url == allowed["remote_url"]


def test_compress_before_evict_needs_the_cpu_tier(tmp_path: Path) -> None:
    values = {"compress_before_evict": "fp8", "local_cpu": False, "local_disk": str(tmp_path)}
    with pytest.raises(ConfigError, match="compress_before_evict=fp8 compresses the CPU tier"):
        load_config(values, env={})
