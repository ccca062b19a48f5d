"""`lmc-admin`: the controller's HTTP API from the shell, one subcommand per route.

    lmc-admin instances
    lmc-admin compress --instance lmcache_default_instance --method cachegen \\
        --location LocalCPUBackend --tokens 128000,849,21435 --wait
    lmc-admin calibrate --instance lmcache_default_instance --method kvtc --wait
    lmc-admin lookup --prompt "Explain KV cache." --vllm-url http://localhost:8000 -o json

Global options (--url, --api-key, -o, --json, --timeout) go before or after
the subcommand. Answers print as tables; `-o wide` adds columns, `-o json`
and `-o yaml` print the controller's answer unchanged.

Exit codes: 0 success; 1 the operation failed (event failed, or workers did
not answer: HTTP 503); 2 usage error or request rejected (HTTP 400/404/422);
3 the controller or vLLM is unreachable, or the URL is not a controller;
4 authentication failed; 5 --wait ran out before the operation ended (it goes
on); 6 `health --strict` found the controller degraded; 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from lmc_connector.control import API_KEY_ENV
from lmc_connector.control.admin import render
from lmc_connector.control.admin.client import (
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    ControllerClient,
    ControllerRejectedError,
    ControllerUnreachableError,
)
from lmc_connector.control.admin.follow import WaitTimeoutError, follow
from lmc_connector.control.admin.tokens import (
    UsageError,
    add_token_options,
    required_tokens,
    scope_of,
    tokens_of,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_AUTH = 0, 1, 2, 3, 4
EXIT_WAIT_TIMEOUT, EXIT_DEGRADED, EXIT_INTERRUPTED = 5, 6, 130
#: Seconds --wait follows an operation by default.
DEFAULT_WAIT_S = 600.0
EPILOG = (
    "exit codes: 0 ok, 1 operation failed, 2 usage or request rejected, 3 unreachable or not "
    "a controller, 4 authentication, 5 --wait timed out, 6 degraded (health --strict), "
    "130 interrupted"
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description as written and shows every option's default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        shown = default not in (None, False, argparse.SUPPRESS) and action.nargs != 0
        if shown and "default" not in help_text:
            help_text += " (default: %(default)s)"
        return help_text


def _add_globals(p: argparse.ArgumentParser, top: bool) -> None:
    """The options every subcommand takes; below the top level they keep the top's values
    unless given again (argparse.SUPPRESS leaves the attribute unset)."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    where = "" if top else " (global option)"
    p.add_argument("--url", default=default(DEFAULT_URL), help=f"controller URL{where}")
    p.add_argument(
        "--api-key",
        default=default(os.environ.get(API_KEY_ENV)),
        help=f"the controller's API key{where} (default: ${API_KEY_ENV})",
    )
    p.add_argument(
        "-o",
        "--output",
        choices=render.FORMATS,
        default=default("table"),
        help=f"output format{where}",
    )
    p.add_argument(
        "--json",
        dest="output",
        action="store_const",
        const="json",
        default=argparse.SUPPRESS,
        help=f"same as -o json{where}",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=default(DEFAULT_TIMEOUT_S),
        help=f"seconds per HTTP call{where}",
    )
    p.add_argument(
        "--cacert",
        default=default(None),
        help=f"PEM file of the CA that signed an https:// controller's certificate{where}",
    )


def _add_wait(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="follow the operation to its end")
    p.add_argument("--wait-timeout", type=float, default=DEFAULT_WAIT_S, help="seconds to follow")


def _sub(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str, **kw: Any
) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help=help_text, description=help_text, formatter_class=_Formatter, **kw
    )
    _add_globals(p, top=False)
    return p


def _subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name in ("compress", "decompress"):
        s = _sub(sub, name, f"{name} cached KV of a prompt (or every chunk) on one instance")
        s.add_argument("--instance", required=True)
        s.add_argument("--method", default="cachegen", help="codec")
        s.add_argument("--location", default="LocalCPUBackend", help="cache location")
        add_token_options(s, every_chunk=True)
        _add_wait(s)
    s = _sub(
        sub,
        "calibrate",
        "fit a calibrated codec (kvtc) on KV each worker of an instance has cached; "
        "compress with it afterwards",
    )
    s.add_argument("--instance", required=True)
    s.add_argument("--method", default="kvtc", help="codec to calibrate")
    _add_wait(s)
    s = _sub(sub, "lookup", "where the longest cached prefix of a prompt lives")
    add_token_options(s)
    s = _sub(sub, "pin", "pin the cached prefix of a prompt")
    s.add_argument("--instance", required=True)
    s.add_argument("--location", help="pin only the chunks in this location (default: any)")
    add_token_options(s)
    s = _sub(sub, "unpin", "unpin the cached prefix of a prompt (in every location)")
    s.add_argument("--instance", required=True)
    add_token_options(s)
    s = _sub(sub, "clear", "remove unpinned chunks of an instance")
    s.add_argument("--instance", required=True)
    s.add_argument("--location", help="one location (default: all)")
    s = _sub(
        sub, "move", "move a cached prefix between locations of an instance, or to another one"
    )
    s.add_argument("--instance", required=True, help="the instance holding the prefix")
    s.add_argument("--source", required=True, help="its location, e.g. LocalCPUBackend")
    s.add_argument("--destination", required=True, help="the location to move it to")
    s.add_argument("--to-instance", help="move to this instance (it pulls, rank for rank)")
    s.add_argument("--copy", action="store_true", help="with --to-instance: keep the source's")
    add_token_options(s)
    _add_wait(s)
    s = _sub(sub, "health", "controller health (or one instance's)")
    s.add_argument("--instance")
    s.add_argument("--strict", action="store_true", help="exit 6 when degraded")
    s = _sub(sub, "worker-info", "workers of one instance, or of all", aliases=["workers"])
    s.add_argument("--instance", help="one instance (default: every instance)")
    s.add_argument("--worker", type=int, action="append", help="worker id (repeatable)")
    _sub(sub, "instances", "registered instances")
    s = _sub(sub, "query-instance", "the instance with a worker at an IP address")
    s.add_argument("ip")
    for name in ("event", "check-finish"):
        s = _sub(sub, name, "an operation's status")
        s.add_argument("event_id")
        _add_wait(s)
    s = _sub(sub, "operations", "recent operations: in progress first, then the last ended")
    s.add_argument("--limit", type=int, default=50, help="most operations to show (1-1000)")
    _sub(sub, "metrics", "Prometheus metrics text")


def _version() -> str:
    try:
        return metadata.version("lmc-connector")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmc-admin",
        description="Operate the lmc_connector controller over HTTP.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    p.add_argument("--version", action="version", version=f"lmc-admin {_version()}")
    _add_globals(p, top=True)
    _subcommands(p.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return p


def _request(client: ControllerClient, args: argparse.Namespace) -> Any:
    c = args.command
    if c in ("compress", "decompress"):
        return client.transform(
            c, args.instance, args.method, args.location, tokens_of(args), scope_of(args)
        )
    if c == "calibrate":
        return client.calibrate(args.instance, args.method)
    if c == "lookup":
        return client.lookup(required_tokens(args), scope_of(args))
    if c == "pin":
        return client.pin(args.instance, required_tokens(args), args.location, scope_of(args))
    if c == "unpin":
        return client.unpin(args.instance, required_tokens(args), scope_of(args))
    if c == "clear":
        return client.clear(args.instance, args.location)
    if c == "move" and args.to_instance:
        old, new = (args.instance, args.source), (args.to_instance, args.destination)
        return client.move_across(old, new, required_tokens(args), args.copy, scope_of(args))
    if c == "move":
        if args.copy:
            raise UsageError("--copy needs --to-instance (copies go to another instance)")
        tokens, scope = required_tokens(args), scope_of(args)
        return client.move(args.instance, args.source, args.destination, tokens, scope)
    if c == "health":
        return client.health(args.instance)
    if c in ("worker-info", "workers"):
        if args.instance is None:
            if args.worker:
                raise UsageError("--worker needs --instance (worker ids repeat per instance)")
            return client.workers()
        return client.worker_info(args.instance, args.worker)
    if c == "instances":
        return client.instances()
    if c == "query-instance":
        return client.query_instance(args.ip)
    if c == "event":
        return client.event(args.event_id)
    if c == "check-finish":
        return client.check_finish(args.event_id)
    if c == "operations":
        return client.operations(args.limit)
    return client.metrics()


def _resume_hint(args: argparse.Namespace, event_id: str) -> str:
    url = "" if args.url == DEFAULT_URL else f" --url {args.url}"
    return f"lmc-admin{url} event {event_id} --wait"


def _error(message: str) -> None:
    print(f"lmc-admin: {message}", file=sys.stderr, flush=True)


def _run(client: ControllerClient, args: argparse.Namespace, state: dict[str, str]) -> int:
    """One command; `state["event_id"]` names the operation once the controller answered."""
    result = _request(client, args)
    if getattr(args, "wait", False):
        event_id = args.event_id if hasattr(args, "event_id") else result["event_id"]
        state["event_id"] = event_id
        try:
            result = follow(client, event_id, args.wait_timeout, sys.stderr.isatty())
        except WaitTimeoutError as e:
            render.show(e.event, args.output)
            _error(f"{e}; it goes on: follow it with `{_resume_hint(args, event_id)}`")
            return EXIT_WAIT_TIMEOUT
    render.show(result, args.output)
    if isinstance(result, dict) and result.get("status") == "failed":
        return EXIT_FAILED
    if args.command == "health" and args.strict and result.get("status") != "ok":
        return EXIT_DEGRADED
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    state: dict[str, str] = {}
    try:
        client = ControllerClient(args.url, args.api_key, args.timeout, args.cacert)
    except (OSError, ssl.SSLError) as e:
        _error(f"--cacert {args.cacert}: cannot load it ({e})")
        return EXIT_USAGE
    try:
        with client:
            return _run(client, args, state)
    except KeyboardInterrupt:
        if "event_id" in state:
            hint = (
                f"the operation goes on: follow it with `{_resume_hint(args, state['event_id'])}`"
            )
        else:
            hint = "the request may still have reached the controller"
        _error(f"interrupted; {hint}")
        return EXIT_INTERRUPTED
    except UsageError as e:
        _error(str(e))
        return EXIT_USAGE
    except ControllerUnreachableError as e:
        _error(str(e))
        return EXIT_UNREACHABLE
    except ControllerRejectedError as e:
        suffix = f" (event {e.event_id})" if e.event_id else ""
        _error(f"{e}{suffix}")
        if e.status in (401, 403):
            return EXIT_AUTH
        return EXIT_FAILED if e.status >= 500 else EXIT_USAGE
