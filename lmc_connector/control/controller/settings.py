"""The controller's settings: defaults, `--config FILE`, the environment, the command line.

In rising priority: defaults, `--config FILE` (YAML with the long option
names as keys, e.g. `monitor_port: 9001`), the environment
(`LMC_CONTROLLER_API_KEY`), and the command line. Every mistake is a
`SettingsError` whose message says how to fix it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import yaml

from lmc_connector.control import API_KEY_ENV
from lmc_connector.control.controller.index import DEFAULT_CAPACITY
from lmc_connector.control.wire.security import FIX_INSECURE, SecretError, is_local, read_secret
from lmc_connector.control.wire.sockets import resolve_host, tcp_url
from lmc_connector.control.wire.types import MAX_WIRE_TOKENS


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How one controller runs, built once at start-up."""

    host: str = "127.0.0.1"
    port: int = 9000
    monitor_port: int = 9001
    #: Port of the request/reply socket vLLM schedulers ask which peer holds a prefix
    #: (their `controller_reply_url`); None: no peer lookups.
    reply_port: int | None = None
    #: Bearer token the HTTP API requires; None leaves the API open.
    api_key: str | None = None
    #: Seconds without a heartbeat before a worker and its chunks are dropped.
    worker_timeout: float = 10.0
    #: Seconds each worker has to answer one command phase.
    command_timeout: float = 5.0
    log_level: str = "info"
    #: File holding the secret shared with the workers (their `control_secret_file`): CURVE
    #: authenticates and encrypts the monitor and command channels. None: loopback only.
    secret_file: str | None = None
    #: Allow a --host beyond loopback without a secret (warned at every start).
    insecure: bool = False
    #: PEM certificate (chain) and private key: the HTTP API speaks HTTPS. Both or neither.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    #: Largest HTTP request body accepted; larger ones get 413.
    max_body_bytes: int = 16 * 1024 * 1024
    #: Most token ids one HTTP request may carry; more get 413.
    max_tokens: int = 1 << 20
    #: Chunk hashes indexed over all instances (about 100 bytes each); past it, new chunks are
    #: not indexed (lookups miss them) until evictions make room, with a warning.
    max_indexed_chunks: int = DEFAULT_CAPACITY


class SettingsError(ValueError):
    """The controller's settings are wrong; the message says how to fix them."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmc-controller",
        description="The lmc_connector cache controller: tracks instances and cached chunks "
        "and serves the HTTP API (OpenAPI at /docs).",
    )
    p.add_argument(
        "--host",
        help="address to bind both sockets (default 127.0.0.1); beyond loopback it needs "
        "--secret-file (or --insecure)",
    )
    p.add_argument("--port", type=int, help="HTTP API port (default 9000)")
    p.add_argument("--monitor-port", type=int, help="port workers push to (default 9001)")
    p.add_argument(
        "--reply-port",
        type=int,
        help="port vLLM schedulers ask which peer instance holds a prompt (their "
        "controller_reply_url; default: off, no peer fetches)",
    )
    p.add_argument("--config", type=Path, help="YAML file of settings (keys as the long options)")
    p.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' on every route (or set {API_KEY_ENV}); "
        "/docs and /openapi.json stay open: they show only the API schema",
    )
    p.add_argument(
        "--worker-timeout", type=float, help="seconds without heartbeat before a worker is dropped"
    )
    p.add_argument(
        "--command-timeout", type=float, help="seconds a worker has to answer a command (5)"
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--secret-file",
        help="file holding the secret shared with the workers (their control_secret_file): "
        "authenticates and encrypts the monitor and command channels",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow --host beyond loopback without --secret-file: anyone who reaches the "
        "monitor port can pose as a worker (trusted networks only)",
    )
    p.add_argument("--ssl-certfile", help="PEM certificate: serve the HTTP API over HTTPS")
    p.add_argument("--ssl-keyfile", help="PEM private key of --ssl-certfile")
    p.add_argument(
        "--max-body-bytes", type=int, help="largest request body accepted (default 16 MiB)"
    )
    p.add_argument("--max-tokens", type=int, help="most token ids in one request (default 1048576)")
    p.add_argument(
        "--max-indexed-chunks",
        type=int,
        help="chunk hashes indexed over all instances, about 100 bytes each "
        f"(default {DEFAULT_CAPACITY})",
    )
    lmcache = p.add_argument_group(
        "LMCache's flags", "accepted so that LMCache's controller command lines run unchanged"
    )
    lmcache.add_argument(
        "--monitor-ports",
        metavar="JSON",
        help='\'{"pull": 9001, "reply": 9002}\': "pull" is --monitor-port, "reply" is --reply-port',
    )
    lmcache.add_argument(
        "--lmcache-worker-timeout", type=float, dest="worker_timeout_alias", help="--worker-timeout"
    )
    lmcache.add_argument(
        "--health-check-interval",
        type=float,
        help="ignored: workers are checked on every heartbeat (LMCache's -1 turns its check off)",
    )
    return p


def _file_settings(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SettingsError(f"--config {path}: cannot read: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise SettingsError(f"--config {path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"--config {path}: expected a mapping of setting: value")
    names = list(Settings.__struct_fields__)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(names)}"
            raise SettingsError(f"--config {path}: unknown setting '{key}': {hint}")
        out[name] = value
    return out


def _monitor_ports(text: str) -> dict[str, Any]:
    """LMCache's `--monitor-ports '{"pull": P, "reply": R}'` as --monitor-port, --reply-port."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SettingsError(f'--monitor-ports: not JSON ({e}); e.g. {{"pull": 9001}}') from e
    ports_ok = isinstance(data, dict) and all(
        isinstance(data.get(k, 0), int) for k in ("pull", "reply")
    )
    if not ports_ok or "pull" not in data or not set(data) <= {"pull", "reply"}:
        raise SettingsError(
            f'--monitor-ports {text!r}: expected a JSON object with an integer "pull" port '
            'and optionally a "reply" port'
        )
    out = {"monitor_port": data["pull"]}
    if data.get("reply") is not None:
        out["reply_port"] = data["reply"]
    return out


def build_settings(
    argv: Sequence[str] | None = None, env: dict[str, str] | None = None
) -> Settings:
    """Merge defaults, --config, environment and flags; SettingsError on a mistake."""
    env = dict(os.environ) if env is None else env
    args = _parser().parse_args(argv)
    merged: dict[str, Any] = {}
    if args.config is not None:
        merged.update(_file_settings(args.config))
    if API_KEY_ENV in env:
        merged["api_key"] = env[API_KEY_ENV]
    if args.monitor_ports is not None:
        merged.update(_monitor_ports(args.monitor_ports))
    if args.worker_timeout_alias is not None:
        merged["worker_timeout"] = args.worker_timeout_alias
    for name in Settings.__struct_fields__:
        value = getattr(args, name, None)
        if value is not None:
            merged[name] = value
    if merged.get("api_key") is not None and not str(merged["api_key"]).strip():
        where = (
            "--api-key"
            if args.api_key is not None
            else (API_KEY_ENV if API_KEY_ENV in env else f"api_key in {args.config}")
        )
        raise SettingsError(
            f"{where} is empty: give a key (e.g. `openssl rand -hex 16`), or leave it out to "
            "run without one"
        )
    try:
        settings = msgspec.convert(merged, Settings)
    except msgspec.ValidationError as e:
        raise SettingsError(f"invalid setting: {e}") from e
    _check(settings)
    return settings


def _check(settings: Settings) -> None:
    ports = {"port": settings.port, "monitor_port": settings.monitor_port}
    if settings.reply_port is not None:
        ports["reply_port"] = settings.reply_port
    for name, value in ports.items():
        if not 0 < value < 65536:
            raise SettingsError(f"{name}={value} must be in 1..65535")
    if len(set(ports.values())) < len(ports):
        raise SettingsError(f"{', '.join(ports)} must all differ (got {ports})")
    try:
        resolve_host(settings.host)
    except ValueError as e:
        raise SettingsError(f"--host: {e}") from e
    for name in ("worker_timeout", "command_timeout"):
        if getattr(settings, name) <= 0:
            raise SettingsError(f"{name} must be > 0")
    if settings.max_body_bytes < 1024:
        raise SettingsError(f"max_body_bytes={settings.max_body_bytes} must be at least 1024")
    if not 0 < settings.max_tokens <= MAX_WIRE_TOKENS:
        raise SettingsError(f"max_tokens={settings.max_tokens} must be in 1..{MAX_WIRE_TOKENS}")
    if settings.max_indexed_chunks <= 0:
        raise SettingsError(
            f"max_indexed_chunks={settings.max_indexed_chunks} must be positive "
            f"(default {DEFAULT_CAPACITY})"
        )
    _check_security(settings)


def _check_security(settings: Settings) -> None:
    if settings.secret_file is not None:
        try:
            read_secret(settings.secret_file)
        except SecretError as e:
            raise SettingsError(f"--secret-file: {e}") from e
    elif not settings.insecure and not is_local(tcp_url(settings.host, settings.monitor_port)):
        raise SettingsError(
            f"--host {settings.host} would expose the monitor port without authentication: "
            f"{FIX_INSECURE}"
        )
    cert, key = settings.ssl_certfile, settings.ssl_keyfile
    if (cert is None) != (key is None):
        raise SettingsError("give both --ssl-certfile and --ssl-keyfile, or neither")
    if cert is not None and key is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as e:
            raise SettingsError(
                f"--ssl-certfile/--ssl-keyfile: cannot load {cert} and {key} ({e}); "
                "give a PEM certificate and its private key"
            ) from e
