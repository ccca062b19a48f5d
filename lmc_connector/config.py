"""One validated configuration, built once at the boundary.

Sources, in rising priority: defaults, the YAML file named by
`LMCACHE_CONFIG_FILE`, `LMCACHE_<KEY>` environment variables, and vLLM's
`kv_connector_extra_config` (keys with or without an `lmcache.` prefix).
Every mistake raises `ConfigError` with a message that says how to fix it;
all the mistakes of one configuration are reported together. Keys (and
`LMCACHE_*` variables) that LMCache knows and this connector does not
implement are ignored with one warning that lists them (`config_lmcache.py`).
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import msgspec
import yaml

from lmc_connector.config_lmcache import LMCACHE_ALIASES, LMCACHE_KEYS, is_lmcache_variable
from lmc_connector.control.wire.types import MAX_INSTANCE_ID_LENGTH
from lmc_connector.remote_url import RemoteUrlError, parse_remote_url

logger = logging.getLogger(__name__)

CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
ENV_PREFIX = "LMCACHE_"
EXTRA_CONFIG_PREFIX = "lmcache."


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
    #: File holding the secret shared with the controller (its --secret-file): CURVE
    #: authenticates and encrypts the monitor, command and peer channels. None: plaintext,
    #: and this worker listens on loopback only (unless control_insecure).
    control_secret_file: str | None = None
    #: Allow listening beyond loopback (lmcache_worker_host) without a secret (warned at start).
    control_insecure: bool = False
    #: Address the peer server of each worker binds and other instances dial (None: 127.0.0.1).
    p2p_host: str | None = None
    #: Peer server port of each worker, indexed by tensor-parallel rank; one port P means P + rank.
    p2p_init_ports: list[int] = msgspec.field(default_factory=list)
    #: Where compression runs: "auto" (the serving device), "cpu" or "cuda".
    codec_device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Milliseconds the scheduler waits for a worker's lookup answer before treating it as a miss.
    lookup_timeout_ms: int = 2000
    #: When the CPU tier is full, compress its least recently used plain chunks with this codec
    #: before evicting anything (None: plain LRU eviction). A calibrated codec (kvtc)
    #: compresses nothing until the worker has a calibration (POST /calibrate).
    compress_before_evict: str | None = None
    #: The shared store (RemoteBackend): redis://, rediss://, valkey://, redis-cluster://; or off.
    remote_url: str | None = None
    #: How chunks are stored there: "naive" (lossless tensor bytes) or a codec (cachegen, fp8,
    #: kvtc: plain until the worker has a calibration).
    remote_serde: str = "naive"
    #: Milliseconds a store lookup (and a connection attempt) may take; slower is a miss.
    remote_timeout_ms: int = 200
    #: vLLM's `/reset_prefix_cache?reset_external=true` also empties tiers shared with other
    #: instances (a shared store); by default it clears only this instance's own tiers.
    reset_shared_store: bool = False
    #: Serve this worker's chunks to other instances and fetch missing prefixes from them
    #: (needs enable_controller, controller_reply_url and p2p_init_ports).
    enable_p2p: bool = False
    #: Milliseconds one peer round trip (a batch of chunks) may take before it counts as a miss.
    p2p_timeout_ms: int = 2000
    #: host:port of the controller's request/reply socket (its --reply-port), asked which peer
    #: instance holds a prefix.
    controller_reply_url: str | None = None
    #: Address each worker's lookup server also binds on TCP (a free port, announced to the
    #: scheduler), for ranks on another host than the scheduler; None: node-local IPC only, and
    #: ranks on other hosts are not asked. Beyond loopback only with control_secret_file.
    lookup_host: str | None = None
    #: Chunks a worker may have waiting to be copied into the cache in the background; a save
    #: beyond it is dropped and counted (a future miss), never waited for.
    save_queue_chunks: int = 256

    @property
    def max_local_cpu_bytes(self) -> int:
        return int(self.max_local_cpu_size * 1e9)

    @property
    def max_local_disk_bytes(self) -> int:
        return int(self.max_local_disk_size * 1e9)

    @property
    def peer_host(self) -> str:
        """The address the peer server binds (`p2p_host`, loopback when unset)."""
        return self.p2p_host or "127.0.0.1"

    def worker_port(self, rank: int) -> int:
        """The command port of tensor-parallel `rank`."""
        return _rank_port("lmcache_worker_ports", self.lmcache_worker_ports, rank)

    def peer_port(self, rank: int) -> int:
        """The peer server port of tensor-parallel `rank`."""
        return _rank_port("p2p_init_ports", self.p2p_init_ports, rank)


def _rank_port(key: str, ports: list[int], rank: int) -> int:
    if len(ports) == 1:
        return ports[0] + rank
    if rank >= len(ports):
        raise ConfigError(
            f"{key} lists {len(ports)} ports but rank {rank} needs one: "
            "give one port per tensor-parallel rank, or a single base port"
        )
    return ports[rank]


KEYS: tuple[str, ...] = CacheConfig.__struct_fields__
#: Keys whose ports are checked to be TCP ports.
_LIST_KEYS = {"lmcache_worker_ports", "p2p_init_ports"}
ENV_SOURCE = "environment"
EXTRA_SOURCE = "kv_connector_extra_config"


def _is_list(info: msgspec.inspect.Type) -> bool:
    if isinstance(info, msgspec.inspect.UnionType):
        return any(_is_list(t) for t in info.types)
    return isinstance(info, msgspec.inspect.ListType)


def _is_text(info: msgspec.inspect.Type) -> bool:
    """A string, or an optional one (no other kind of value)."""
    kinds = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    return any(isinstance(t, msgspec.inspect.StrType) for t in kinds) and all(
        isinstance(t, msgspec.inspect.StrType | msgspec.inspect.NoneType) for t in kinds
    )


def _field_types() -> dict[str, msgspec.inspect.Type]:
    struct = msgspec.inspect.type_info(CacheConfig)
    assert isinstance(struct, msgspec.inspect.StructType)
    return {f.name: f.type for f in struct.fields}


_TYPES = _field_types()
#: Keys holding lists: a single value or LMCache's comma form ("8001,8002") is accepted.
LIST_VALUED = frozenset(key for key, info in _TYPES.items() if _is_list(info))
#: Keys holding text: an environment variable's value is taken as written, not as YAML.
TEXT_VALUED = frozenset(key for key, info in _TYPES.items() if _is_text(info))


def _likeness(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def _suggest(key: str) -> str:
    """A hint for an unknown key: the closest of ours or LMCache's, else where keys are listed."""
    ours = difflib.get_close_matches(key, list(KEYS), n=1, cutoff=0.6)
    theirs = difflib.get_close_matches(key, sorted(LMCACHE_KEYS), n=1, cutoff=0.75)
    if theirs and (not ours or _likeness(key, theirs[0]) > _likeness(key, ours[0])):
        return f"did you mean {theirs[0]}? (an LMCache key lmc_connector ignores)"
    if ours:
        return f"did you mean {ours[0]}?"
    return "not a key of lmc_connector nor of LMCache (the README's Configuration lists the keys)"


def _type_text(info: msgspec.inspect.Type) -> str:
    if isinstance(info, msgspec.inspect.UnionType):
        return " or ".join(_type_text(t) for t in info.types)
    if isinstance(info, msgspec.inspect.NoneType):
        return "null"
    if isinstance(info, msgspec.inspect.LiteralType):
        return "one of " + ", ".join(repr(v) for v in info.values)
    if isinstance(info, msgspec.inspect.ListType):
        item = _type_text(info.item_type)
        return f"a list, comma-separated values or a single value, each {item}"
    if isinstance(info, msgspec.inspect.IntType):
        return "an integer"
    if isinstance(info, msgspec.inspect.FloatType):
        return "a number"
    if isinstance(info, msgspec.inspect.BoolType):
        return "true or false"
    return "a string"


def _split_list(text: str) -> list[Any]:
    """LMCache's comma form of a list: "8001, 8002" -> [8001, 8002]; a list written as YAML
    inside a string ("[8001, 8002]") is read as such."""
    if text.lstrip().startswith("["):
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            parsed = None
        if isinstance(parsed, list):
            return parsed
    items: list[Any] = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            try:
                items.append(yaml.safe_load(part))
            except yaml.YAMLError:
                items.append(part)
    return items


def _normalise(key: str, given: Any, where: str) -> Any:
    value = given
    if key in TEXT_VALUED and isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)  # `lmcache_instance_id: 42` names instance "42"
    if key in LIST_VALUED and isinstance(value, str):
        value = _split_list(value)
    elif key in LIST_VALUED and value is not None and not isinstance(value, list):
        value = [value]
    if key == "local_disk" and isinstance(value, str) and value.startswith("file://"):
        value = value[len("file://") :]
    try:
        return getattr(msgspec.convert({key: value}, CacheConfig, strict=False), key)
    except msgspec.ValidationError as e:
        quote = " (quote it to give it as text)" if key in TEXT_VALUED else ""
        raise ConfigError(
            f"{where}={given!r} is not valid: expected {_type_text(_TYPES[key])}{quote}"
        ) from e


class _Layer(NamedTuple):
    """One source of settings: where it came from, and its key -> value pairs."""

    source: str
    values: Mapping[str, Any]

    def where(self, key: str) -> str:
        """How a message names `key` of this source (a variable name for the environment)."""
        if self.source == ENV_SOURCE:
            return f"environment variable {ENV_PREFIX}{key.upper()}"
        return f"{self.source}: {key}"


class _Merged(NamedTuple):
    values: dict[str, Any]
    #: source -> the LMCache settings of it that this connector does not implement
    ignored: dict[str, list[str]]


def _merge(layers: list[_Layer]) -> _Merged:
    """Apply the layers in order; every mistake of every layer is reported in one ConfigError."""
    merged: dict[str, Any] = {}
    ignored: dict[str, list[str]] = {}
    problems: list[str] = []
    for layer in layers:
        seen: dict[str, str] = {}
        for raw_key, value in layer.values.items():
            given = str(raw_key)
            bare = given
            if layer.source == EXTRA_SOURCE and given.startswith(EXTRA_CONFIG_PREFIX):
                bare = given[len(EXTRA_CONFIG_PREFIX) :]
            key = LMCACHE_ALIASES.get(bare, bare)
            if key in KEYS:
                if key in seen:
                    problems.append(
                        f"{layer.source}: {seen[key]} and {given} set the same key: keep one"
                    )
                    continue
                seen[key] = given
                try:
                    merged[key] = _normalise(key, value, layer.where(given))
                except ConfigError as e:
                    problems.append(str(e))
            elif bare in LMCACHE_KEYS:
                name = f"{ENV_PREFIX}{given.upper()}" if layer.source == ENV_SOURCE else given
                ignored.setdefault(layer.source, []).append(name)
            else:
                fix = " (rename or unset the variable)" if layer.source == ENV_SOURCE else ""
                problems.append(f"{layer.where(given)}: unknown key: {_suggest(bare)}{fix}")
    _raise_all(problems)
    return _Merged(merged, ignored)


def _yaml_layer(env: Mapping[str, str]) -> list[_Layer]:
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
    return [_Layer(str(path), data)]


def _env_layer(env: Mapping[str, str]) -> tuple[list[_Layer], list[str]]:
    """The `LMCACHE_<KEY>` layer, and the names of LMCache's own non-key variables (ignored)."""
    values: dict[str, Any] = {}
    ignored: list[str] = []
    for name, text in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_FILE_ENV:
            continue
        if is_lmcache_variable(name):
            ignored.append(name)
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if LMCACHE_ALIASES.get(key, key) in TEXT_VALUED:
            values[key] = text
            continue
        try:
            values[key] = yaml.safe_load(text)
        except yaml.YAMLError:
            values[key] = text
    return ([_Layer(ENV_SOURCE, values)] if values else []), ignored


def _extra_layer(extra: Mapping[str, Any] | None) -> list[_Layer]:
    if not extra:
        return []
    return [_Layer(EXTRA_SOURCE, extra)]


@functools.cache
def _warn_once(message: str) -> None:
    """Log `message` once per process (vLLM builds the config in several roles per process)."""
    logger.warning(message)


def _check_requirements(config: CacheConfig) -> None:
    """ConfigError listing every requirement the merged values miss."""
    problems = [str(problem) for problem in _requirement_problems(config)]
    _raise_all(problems)


def _requirement_problems(config: CacheConfig) -> Iterator[str | ConfigError]:
    if not 0 < len(config.lmcache_instance_id) <= MAX_INSTANCE_ID_LENGTH:
        yield (
            f"lmcache_instance_id has {len(config.lmcache_instance_id)} characters: give it 1 "
            f"to {MAX_INSTANCE_ID_LENGTH} (it names this vLLM instance to the controller)"
        )
    if config.chunk_size <= 0:
        yield f"chunk_size={config.chunk_size} must be a positive integer"
    if config.local_cpu and config.max_local_cpu_size <= 0:
        yield f"max_local_cpu_size={config.max_local_cpu_size} must be > 0 when local_cpu is true"
    if config.local_disk is not None and config.max_local_disk_size <= 0:
        yield (
            f"max_local_disk_size={config.max_local_disk_size} must be > 0 when local_disk is set"
        )
    if not config.local_cpu and config.local_disk is None:
        yield "no cache location: set local_cpu: true, or local_disk to a directory"
    if config.compress_before_evict is not None and not config.local_cpu:
        yield (
            f"compress_before_evict={config.compress_before_evict} compresses the CPU tier's "
            "chunks before it evicts them: set local_cpu: true, or unset compress_before_evict"
        )
    if config.enable_controller:
        yield from _missing(
            config,
            "enable_controller",
            ("controller_pull_url", "lmcache_worker_ports"),
            'controller_pull_url: "localhost:9001", lmcache_worker_ports: 8001',
        )
    if config.enable_p2p:
        yield from _missing(
            config,
            "enable_p2p",
            ("enable_controller", "controller_reply_url", "p2p_init_ports"),
            'enable_controller: true, controller_reply_url: "localhost:9002", p2p_init_ports: 8200',
        )
    yield from _address_problems(config)
    if config.p2p_timeout_ms <= 0:
        yield f"p2p_timeout_ms={config.p2p_timeout_ms} must be > 0 (e.g. 2000)"
    if config.control_secret_file is not None and not Path(config.control_secret_file).is_file():
        yield (
            f"control_secret_file={config.control_secret_file!r} is not a readable file: point "
            "it at the file holding the secret the controller reads with --secret-file"
        )
    if config.save_queue_chunks <= 0:
        yield f"save_queue_chunks={config.save_queue_chunks} must be a positive number of chunks"
    if config.lookup_timeout_ms <= 0:
        yield f"lookup_timeout_ms={config.lookup_timeout_ms} must be > 0"
    if config.controller_heartbeat_interval <= 0:
        yield (
            f"controller_heartbeat_interval={config.controller_heartbeat_interval} must be "
            "> 0 seconds (2 is a good value)"
        )
    for key in _LIST_KEYS:
        bad = [p for p in getattr(config, key) if not 0 < p < 65536]
        if bad:
            yield f"{key}: {bad} are not TCP ports; use numbers in 1..65535"
    for check in (
        _check_lookup_host,
        _check_remote_url,
        _check_remote_settings,
        _check_evict_codec,
    ):
        try:
            check(config)
        except ConfigError as e:
            yield e


def _raise_all(problems: list[str]) -> None:
    """One ConfigError naming every problem (none: nothing raised)."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{len(problems)} problems in the configuration:\n{listed}")


def _address_problems(config: CacheConfig) -> Iterator[str]:
    """The controller's addresses, checked now rather than when a worker first dials them."""
    given = [(key, getattr(config, key)) for key in ("controller_pull_url", "controller_reply_url")]
    if all(value is None for _, value in given):
        return
    from lmc_connector.control.wire.sockets import parse_host_port  # zmq: only when needed

    for key, value in given:
        if value is not None:
            try:
                parse_host_port(value, key)
            except ValueError as e:
                yield str(e)


def _check_evict_codec(config: CacheConfig) -> None:
    if config.compress_before_evict is not None:
        _check_codec("compress_before_evict", config.compress_before_evict, "is no codec", [])


def _missing(
    config: CacheConfig, switch: str, keys: tuple[str, ...], example: str
) -> Iterator[str]:
    """What `switch: true` needs of `keys` and was left unset, with an example."""
    missing = [key for key in keys if not getattr(config, key)]
    if missing:
        yield f"{switch}: true requires {' and '.join(missing)} (e.g. {example})"


def _check_remote_url(config: CacheConfig) -> None:
    if config.remote_url is not None:
        try:
            address = parse_remote_url(config.remote_url)
        except RemoteUrlError as e:
            raise ConfigError(str(e)) from e
        beyond = [host for host, _ in address.nodes if _loopback(host) is not True]
        if beyond and address.password is None and config.control_insecure:
            _warn_once(
                f"remote_url={address.redacted()} reaches {', '.join(beyond)} with no password "
                "(control_insecure: true): whoever reaches that store can read and write the "
                "KV every instance loads"
            )
        elif beyond and address.password is None:
            raise ConfigError(
                f"remote_url={address.redacted()} reaches {', '.join(beyond)} beyond this host "
                "with no password: whoever reaches that store could read the cached KV and "
                "write KV every instance would load. Give the store a password "
                "(redis://:PASSWORD@host:port with requirepass or an ACL user on the server; "
                "rediss:// for TLS across untrusted networks), or set control_insecure: true "
                "on a network you trust"
            )


def _check_remote_settings(config: CacheConfig) -> None:
    if config.remote_timeout_ms <= 0:
        raise ConfigError(
            f"remote_timeout_ms={config.remote_timeout_ms} must be > 0 (200 suits a store on "
            "the same network)"
        )
    if config.remote_serde != "naive":
        _check_codec("remote_serde", config.remote_serde, "is not a serde", ["naive"])


def _check_codec(key: str, value: str, what: str, extra: list[str]) -> None:
    """ConfigError unless `value` names a codec (or one of `extra`)."""
    # Codec names live with the codecs (torch); only vLLM processes set these keys.
    from lmc_connector.ops.codecs import codec_names

    valid = [*extra, *codec_names()]
    if value not in valid:
        close = difflib.get_close_matches(value, valid, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{key}={value!r} {what}{hint}; use one of {', '.join(valid)}")


def _check_lookup_host(config: CacheConfig) -> None:
    """A lookup_host beyond loopback needs the channel authenticated (or an explicit
    control_insecure)."""
    host = config.lookup_host
    if host is None or config.control_secret_file is not None or config.control_insecure:
        return
    loopback = _loopback(host)
    if loopback is None:
        raise ConfigError(f"lookup_host={host!r} does not resolve to an address")
    if not loopback:
        raise ConfigError(
            f"lookup_host={host!r} is not a loopback address and no control_secret_file is "
            "set: anyone on the network could pin chunks and read prompts' chunk keys; set "
            "control_secret_file (the lookup channel is then authenticated and encrypted), "
            "use 127.0.0.1, or leave it unset (ranks on other hosts are then not asked, and "
            "their misses are recomputed)"
        )


def load_config(
    extra_config: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    warn_ignored: bool = True,
) -> CacheConfig:
    """Build the validated config; `env` defaults to `os.environ`.

    With `warn_ignored`, LMCache settings this connector does not implement are
    named in one warning (once per process); vLLM's worker processes build the
    same config as its scheduler, which alone warns.
    """
    env = os.environ if env is None else env
    env_layers, ignored_variables = _env_layer(env)
    merged = _merge(_yaml_layer(env) + env_layers + _extra_layer(extra_config))
    config = CacheConfig(**merged.values)
    _check_requirements(config)
    ignored = merged.ignored
    if ignored_variables:
        ignored[ENV_SOURCE] = sorted(ignored.get(ENV_SOURCE, []) + ignored_variables)
    if ignored and warn_ignored:
        listed = "; ".join(f"{source}: {', '.join(names)}" for source, names in ignored.items())
        _warn_once(
            f"LMCache settings not implemented here, ignored: {listed} "
            "(see the README's 'Coming from LMCache')"
        )
    return config


@functools.cache
def _loopback(host: str) -> bool | None:
    """Whether `host` (a name or an address) is this host's loopback; None: it does not
    resolve. Resolved once per process (vLLM builds the config once per role)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return None
