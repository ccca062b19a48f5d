"""`lmc-controller`: start the controller (HTTP API on --port, worker monitor on --monitor-port).

    lmc-controller --host localhost --port 9000 --monitor-port 9001

Settings come from, in rising priority: defaults, `--config FILE` (YAML with
the long option names as keys, e.g. `monitor_port: 9001`), the environment
(`LMC_CONTROLLER_API_KEY`), and the command line. Never imports torch or vllm.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import yaml

from lmc_connector.control import API_KEY_ENV
from lmc_connector.control.service import ControllerService, Settings
from lmc_connector.control.transport import resolve_host

logger = logging.getLogger("lmc_connector.control")


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
        help="address to bind both sockets (default 127.0.0.1); workers pushing to the monitor "
        "port are not authenticated: expose it only on trusted networks",
    )
    p.add_argument("--port", type=int, help="HTTP API port (default 9000)")
    p.add_argument("--monitor-port", type=int, help="port workers push to (default 9001)")
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
    names = [f.name for f in dataclasses.fields(Settings)]
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(names)}"
            raise SettingsError(f"--config {path}: unknown setting '{key}': {hint}")
        out[name] = value
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
    if env.get(API_KEY_ENV):
        merged["api_key"] = env[API_KEY_ENV]
    for name in ("host", "port", "monitor_port", "api_key", "worker_timeout", "command_timeout"):
        value = getattr(args, name)
        if value is not None:
            merged[name] = value
    if args.log_level is not None:
        merged["log_level"] = args.log_level
    try:
        settings = msgspec.convert(merged, Settings)
    except msgspec.ValidationError as e:
        raise SettingsError(f"invalid setting: {e}") from e
    for name in ("port", "monitor_port"):
        if not 0 < getattr(settings, name) < 65536:
            raise SettingsError(f"{name}={getattr(settings, name)} must be in 1..65535")
    if settings.port == settings.monitor_port:
        raise SettingsError("port and monitor_port must differ")
    try:
        resolve_host(settings.host)
    except ValueError as e:
        raise SettingsError(f"--host: {e}") from e
    for name in ("worker_timeout", "command_timeout"):
        if getattr(settings, name) <= 0:
            raise SettingsError(f"{name} must be > 0")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    try:
        settings = build_settings(argv)
    except SettingsError as e:
        print(f"lmc-controller: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import uvicorn
    import zmq

    from lmc_connector.control.server import create_app

    try:
        service = ControllerService(settings)
    except ValueError as e:  # the host stopped resolving since the settings were checked
        print(f"lmc-controller: --host: {e}", file=sys.stderr)
        return 2
    try:
        service.start()
    except zmq.ZMQError as e:
        print(
            f"lmc-controller: cannot listen for workers on {settings.host}:"
            f"{settings.monitor_port} (--monitor-port): {e}",
            file=sys.stderr,
        )
        service.close()
        return 1
    try:
        config = uvicorn.Config(
            create_app(service),
            host=resolve_host(settings.host),
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
        )
        server = uvicorn.Server(config)
        logger.info(
            "controller starting: http://%s:%d (monitor %s:%d, auth %s), %.0f ms since launch",
            settings.host,
            settings.port,
            settings.host,
            settings.monitor_port,
            "on" if settings.api_key else "off",
            (time.perf_counter() - started) * 1000,
        )
        server.run()
        return 0 if server.started else 1
    finally:
        service.close()


if __name__ == "__main__":
    sys.exit(main())
