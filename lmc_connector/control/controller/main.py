"""`lmc-controller`: the controller process (HTTP API on --port, worker monitor on
--monitor-port).

    lmc-controller --host localhost --port 9000 --monitor-port 9001

Never imports torch, vllm or the cache.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import sys
import time
from collections.abc import Sequence

from lmc_connector.control.controller.service import ControllerService
from lmc_connector.control.controller.settings import Settings, SettingsError, build_settings
from lmc_connector.control.wire.security import is_local
from lmc_connector.control.wire.sockets import resolve_host, tcp_url

logger = logging.getLogger("lmc_connector.control")


def _port_problem(settings: Settings, flag: str, port: int, error: int | None, text: str) -> str:
    """One line for a port that cannot be listened on, the same for every port."""
    where = f"{settings.host}:{port} ({flag})"
    if error == errno.EADDRINUSE:
        return (
            f"cannot listen on {where}: the port is already in use (another lmc-controller "
            f"still running?); stop that process or choose another {flag}"
        )
    if error == errno.EACCES:
        return f"cannot listen on {where}: permission denied; choose a port above 1023"
    if error == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: this machine has no such address; check --host"
    return f"cannot listen on {where}: {text}"


def _http_socket(settings: Settings) -> socket.socket:
    """The HTTP API's listening socket, bound here so that a taken port is reported as
    plainly as a taken monitor port (uvicorn would log its raw errno)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((resolve_host(settings.host), settings.port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; returns the limit.

    Each worker the controller talks to costs descriptors (a socket while commands run),
    and a fleet of thousands would exhaust the common default of 1024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            logger.warning("cannot raise the open-files limit from %d: %s", soft, e)
    return soft


def _warn_exposed_http(settings: Settings) -> None:
    """Warn at every start about an HTTP API reachable beyond this host without protection."""
    if is_local(tcp_url(settings.host, settings.port)):
        return
    if settings.api_key is None:
        logger.warning(
            "the HTTP API on %s:%d has no --api-key: anyone who reaches it can look up, pin, "
            "clear, move and compress cached KV",
            settings.host,
            settings.port,
        )
    if settings.ssl_certfile is None:
        logger.warning(
            "the HTTP API on %s:%d is plain HTTP: the API key and the prompts' token ids "
            "travel in clear text (give --ssl-certfile and --ssl-keyfile)",
            settings.host,
            settings.port,
        )


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

    files = raise_open_files_limit()
    try:
        http_socket = _http_socket(settings)
    except OSError as e:
        print(
            "lmc-controller: " + _port_problem(settings, "--port", settings.port, e.errno, str(e)),
            file=sys.stderr,
        )
        return 1
    try:
        service = ControllerService(settings)
    except ValueError as e:  # the host or the secret file changed since the settings were checked
        http_socket.close()
        print(f"lmc-controller: {e}", file=sys.stderr)
        return 2
    _warn_exposed_http(settings)
    try:
        service.start()
    except ValueError as e:  # InsecureBindError: checked in the settings too
        print(f"lmc-controller: {e}", file=sys.stderr)
        service.close()
        http_socket.close()
        return 2
    except zmq.ZMQError as e:
        # The monitor binds first: if its thread runs, the reply port was the one taken.
        flag, port = "--monitor-port", settings.monitor_port
        if service.monitor.alive and settings.reply_port is not None:
            flag, port = "--reply-port", settings.reply_port
        problem = _port_problem(settings, flag, port, e.errno, str(e))
        print(f"lmc-controller: {problem}", file=sys.stderr)
        service.close()
        http_socket.close()
        return 1
    try:
        config = uvicorn.Config(
            create_app(service),
            log_level=settings.log_level,
            access_log=False,
            ssl_certfile=settings.ssl_certfile,
            ssl_keyfile=settings.ssl_keyfile,
        )
        server = uvicorn.Server(config)
        logger.info(
            "controller starting: %s://%s:%d (monitor %s:%d, peer lookups %s, auth %s, "
            "workers: %s, %d open files allowed), %.0f ms since launch",
            "https" if settings.ssl_certfile else "http",
            settings.host,
            settings.port,
            settings.host,
            settings.monitor_port,
            f"on port {settings.reply_port}" if settings.reply_port else "off",
            "on" if settings.api_key else "off",
            service.security.describe(),
            files,
            (time.perf_counter() - started) * 1000,
        )
        try:
            server.run(sockets=[http_socket])
        except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then re-raises it
            logger.info("controller stopped (interrupted)")
        return 0 if server.started else 1
    finally:
        http_socket.close()
        service.close()
