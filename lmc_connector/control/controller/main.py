"""`lmc-controller`: the controller process (HTTP API on --port, worker monitor on
--monitor-port).

    lmc-controller --host localhost --port 9000 --monitor-port 9001

Never imports torch, vllm or the cache.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

from lmc_connector.control.controller.service import ControllerService
from lmc_connector.control.controller.settings import SettingsError, build_settings
from lmc_connector.control.wire.sockets import resolve_host

logger = logging.getLogger("lmc_connector.control")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the controller until interrupted; returns the process exit code."""
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

    from lmc_connector.control.controller.http.app import create_app

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
