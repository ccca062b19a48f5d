"""One validated configuration, built once at the boundary.

Sources, in rising priority: defaults, the YAML file named by
`LMCACHE_CONFIG_FILE`, `LMCACHE_<KEY>` environment variables, and vLLM's
`kv_connector_extra_config` (keys with or without an `lmcache.` prefix).
Every mistake raises `ConfigError` with a message that says how to fix it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
ENV_PREFIX = "LMCACHE_"
EXTRA_CONFIG_PREFIX = "lmcache."
#: LMCACHE_* variables that are not configuration keys.
NON_KEY_ENV = frozenset({CONFIG_FILE_ENV, "LMCACHE_LOG_LEVEL"})


class ConfigError(ValueError):
    """The configuration is wrong; the message names the key and the fix."""


class CacheConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: Tokens per cached chunk; prompts are cached in whole chunks plus a trailing partial one.
    chunk_size: int = 256
    #: Keep chunks in CPU memory (the LocalCPUBackend location).
    local_cpu: bool = True
    #: Capacity of the CPU tier in GB (10**9 bytes), counted in real tensor/blob bytes.
    max_local_cpu_size: float = 5.0
    #: Directory of the disk tier (LocalDiskBackend); None turns the tier off.
    local_disk: str | None = None
    #: Capacity of the disk tier in GB.
    max_local_disk_size: float = 20.0
    #: Start the in-worker control agent and register with the controller.
    enable_controller: bool = False
    #: Name of this serving instance as the controller and HTTP API know it.
    lmcache_instance_id: str = "lmcache_default_instance"
    #: host:port of the controller's monitor (PULL) socket.
    controller_pull_url: str | None = None
    #: Command port of each worker, indexed by tensor-parallel rank; one port P means P + rank.
    lmcache_worker_ports: list[int] = msgspec.field(default_factory=list)
    #: Address the worker command socket binds and advertises.
    lmcache_worker_host: str = "127.0.0.1"
    #: Seconds between agent heartbeats.
    controller_heartbeat_interval: float = 2.0
    #: Peer-to-peer host (accepted for LMCache compatibility; peer transfer is not used yet).
    p2p_host: str | None = None
    #: Peer-to-peer ports (accepted for LMCache compatibility).
    p2p_init_ports: list[int] = msgspec.field(default_factory=list)
    #: Where compression runs: "auto" (the serving device), "cpu" or "cuda".
    codec_device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Milliseconds the scheduler waits for a worker's lookup answer before treating it as a miss.
    lookup_timeout_ms: int = 2000
    #: When the CPU tier is full, compress its least recently used plain chunks with this codec
    #: before evicting anything (None: plain LRU eviction).
    compress_before_evict: str | None = None

    @property
    def max_local_cpu_bytes(self) -> int:
        return int(self.max_local_cpu_size * 1e9)

    @property
    def max_local_disk_bytes(self) -> int:
        return int(self.max_local_disk_size * 1e9)

    def worker_port(self, rank: int) -> int:
        """The command port of tensor-parallel `rank`."""
        ports = self.lmcache_worker_ports
        if len(ports) == 1:
            return ports[0] + rank
        if rank >= len(ports):
            raise ConfigError(
                f"lmcache_worker_ports lists {len(ports)} ports but rank {rank} needs one: "
                "give one port per tensor-parallel rank, or a single base port"
            )
        return ports[rank]


KEYS: tuple[str, ...] = CacheConfig.__struct_fields__
_LIST_KEYS = {"lmcache_worker_ports", "p2p_init_ports"}


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(KEYS), n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else f"known keys: {', '.join(sorted(KEYS))}"


def _describe(key: str) -> str:
    struct = msgspec.inspect.type_info(CacheConfig)
    assert isinstance(struct, msgspec.inspect.StructType)
    return _type_text(next(f for f in struct.fields if f.name == key).type)


def _type_text(info: msgspec.inspect.Type) -> str:
    if isinstance(info, msgspec.inspect.UnionType):
        return " or ".join(_type_text(t) for t in info.types)
    if isinstance(info, msgspec.inspect.NoneType):
        return "null"
    if isinstance(info, msgspec.inspect.LiteralType):
        return "one of " + ", ".join(repr(v) for v in info.values)
    if isinstance(info, msgspec.inspect.ListType):
        return f"a list of {_type_text(info.item_type)}s or a single value"
    if isinstance(info, msgspec.inspect.IntType):
        return "an integer"
    if isinstance(info, msgspec.inspect.FloatType):
        return "a number"
    if isinstance(info, msgspec.inspect.BoolType):
        return "true or false"
    return "a string"


def _normalise(key: str, value: Any, source: str) -> Any:
    if key in _LIST_KEYS and value is not None and not isinstance(value, list):
        value = [value]
    if key == "local_disk" and isinstance(value, str) and value.startswith("file://"):
        value = value[len("file://") :]
    try:
        return getattr(msgspec.convert({key: value}, CacheConfig, strict=False), key)
    except msgspec.ValidationError as e:
        raise ConfigError(
            f"{source}: {key}={value!r} is not valid: expected {_describe(key)}"
        ) from e


def _merge(layers: list[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for source, mapping in layers:
        for raw_key, value in mapping.items():
            key = str(raw_key)
            if key not in KEYS:
                raise ConfigError(f"{source}: unknown key '{key}': {_suggest(key)}")
            merged[key] = _normalise(key, value, source)
    return merged


def _yaml_layer(env: Mapping[str, str]) -> list[tuple[str, Mapping[str, Any]]]:
    path_text = env.get(CONFIG_FILE_ENV)
    if not path_text:
        return []
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(
            f"{CONFIG_FILE_ENV}={path_text} does not name a readable file: "
            "point it at your YAML config, or unset it"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return [(str(path), data)]


def _env_layer(env: Mapping[str, str]) -> list[tuple[str, Mapping[str, Any]]]:
    values: dict[str, Any] = {}
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or name in NON_KEY_ENV:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in KEYS:
            raise ConfigError(
                f"environment variable {name}: unknown key '{key}': {_suggest(key)} "
                "(LMCACHE_* variables configure lmc_connector: rename it, or unset it)"
            )
        try:
            values[key] = yaml.safe_load(text)
        except yaml.YAMLError:
            values[key] = text
    return [("environment", values)] if values else []


def _extra_layer(extra: Mapping[str, Any] | None) -> list[tuple[str, Mapping[str, Any]]]:
    if not extra:
        return []
    stripped = {
        (k[len(EXTRA_CONFIG_PREFIX) :] if k.startswith(EXTRA_CONFIG_PREFIX) else k): v
        for k, v in extra.items()
    }
    return [("kv_connector_extra_config", stripped)]


def _check_requirements(config: CacheConfig) -> None:
    if config.chunk_size <= 0:
        raise ConfigError(f"chunk_size={config.chunk_size} must be a positive integer")
    if config.local_cpu and config.max_local_cpu_size <= 0:
        raise ConfigError(
            f"max_local_cpu_size={config.max_local_cpu_size} must be > 0 when local_cpu is true"
        )
    if config.local_disk is not None and config.max_local_disk_size <= 0:
        raise ConfigError(
            f"max_local_disk_size={config.max_local_disk_size} must be > 0 when local_disk is set"
        )
    if not config.local_cpu and config.local_disk is None:
        raise ConfigError("no cache location: set local_cpu: true, or local_disk to a directory")
    if config.enable_controller:
        missing = [
            key
            for key, present in (
                ("controller_pull_url", config.controller_pull_url),
                ("lmcache_worker_ports", config.lmcache_worker_ports),
            )
            if not present
        ]
        if missing:
            raise ConfigError(
                f"enable_controller: true requires {' and '.join(missing)} "
                '(e.g. controller_pull_url: "localhost:9001", lmcache_worker_ports: 8001)'
            )
    if config.lookup_timeout_ms <= 0:
        raise ConfigError(f"lookup_timeout_ms={config.lookup_timeout_ms} must be > 0")
    if config.controller_heartbeat_interval <= 0:
        raise ConfigError(
            f"controller_heartbeat_interval={config.controller_heartbeat_interval} must be "
            "> 0 seconds (2 is a good value)"
        )
    for key in _LIST_KEYS:
        bad = [p for p in getattr(config, key) if not 0 < p < 65536]
        if bad:
            raise ConfigError(f"{key}: {bad} are not TCP ports; use numbers in 1..65535")


def load_config(
    extra_config: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> CacheConfig:
    """Build the validated config; `env` defaults to `os.environ`."""
    env = os.environ if env is None else env
    layers = _yaml_layer(env) + _env_layer(env) + _extra_layer(extra_config)
    config = CacheConfig(**_merge(layers))
    _check_requirements(config)
    return config
