"""`lmc-admin`: the controller's HTTP API from the shell, one subcommand per route.

    lmc-admin compress --instance lmcache_default_instance --method cachegen \\
        --location LocalCPUBackend --tokens 128000,849,21435 --wait
    lmc-admin lookup --prompt "Explain KV cache." --vllm-url http://localhost:8000

Tokens: --tokens 1,2,3 (or a JSON list), --tokens-file FILE (JSON list, a
/tokenize answer, or integers separated by commas/whitespace), or --prompt
TEXT --vllm-url URL (tokenized by vLLM's /tokenize; --model defaults to the
first model vLLM's /v1/models lists).

Exit codes: 0 success; 1 the operation failed (event failed, or workers did
not answer: HTTP 503); 2 usage error (bad arguments, or the controller
rejected the request: HTTP 400/404/422); 3 the controller or vLLM is
unreachable or timed out; 4 authentication failed (HTTP 401/403).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from lmc_connector.control import API_KEY_ENV
from lmc_connector.control.admin.client import (
    DEFAULT_URL,
    ControllerClient,
    ControllerRejectedError,
    ControllerUnreachableError,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_AUTH = 0, 1, 2, 3, 4
#: Seconds between event polls with --wait.
POLL_S = 0.2


class UsageError(ValueError):
    """The command line is wrong; the message says how."""


def _parse_tokens_text(text: str, source: str) -> list[int]:
    text = text.strip()
    try:
        data: Any = json.loads(text) if text[:1] in "[{" else None
    except json.JSONDecodeError as e:
        raise UsageError(f"{source}: not valid JSON: {e}") from e
    if isinstance(data, dict):
        data = data.get("tokens")
    if data is None:
        parts = [p for p in text.replace(",", " ").split() if p]
        if not all(p.isdigit() for p in parts):
            raise UsageError(f"{source}: expected integers separated by commas, or a JSON list")
        data = [int(p) for p in parts]
    if not isinstance(data, list) or not all(isinstance(t, int) and t >= 0 for t in data):
        raise UsageError(f"{source}: expected a list of non-negative integer token ids")
    return data


def _tokenize(args: argparse.Namespace) -> list[int]:
    base = args.vllm_url.rstrip("/")
    try:
        with httpx.Client(timeout=args.timeout) as http:
            model = args.model
            if model is None:
                models = http.get(f"{base}/v1/models").raise_for_status().json()
                model = models["data"][0]["id"]
            answer = http.post(f"{base}/tokenize", json={"model": model, "prompt": args.prompt})
            answer.raise_for_status()
            return [int(t) for t in answer.json()["tokens"]]
    except httpx.TransportError as e:
        raise ControllerUnreachableError(f"cannot reach vLLM at {base}: {e}") from e
    except (httpx.HTTPStatusError, KeyError, IndexError, TypeError, ValueError) as e:
        raise UsageError(f"vLLM at {base} could not tokenize the prompt: {e}") from e


def _tokens(args: argparse.Namespace) -> list[int]:
    given = [x for x in (args.tokens, args.tokens_file, args.prompt) if x is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --tokens, --tokens-file, --prompt")
    if args.tokens is not None:
        return _parse_tokens_text(args.tokens, "--tokens")
    if args.tokens_file is not None:
        try:
            text = Path(args.tokens_file).read_text()
        except OSError as e:
            raise UsageError(f"--tokens-file {args.tokens_file}: {e.strerror}") from e
        return _parse_tokens_text(text, f"--tokens-file {args.tokens_file}")
    if args.vllm_url is None:
        raise UsageError("--prompt needs --vllm-url (the vLLM server that tokenizes it)")
    return _tokenize(args)


def _add_tokens(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", help="token ids: 1,2,3 or a JSON list")
    p.add_argument("--tokens-file", help="file of token ids (JSON list or comma/space separated)")
    p.add_argument("--prompt", help="text to tokenize through vLLM (needs --vllm-url)")
    p.add_argument("--vllm-url", help="vLLM server for --prompt, e.g. http://localhost:8000")
    p.add_argument("--model", help="model name for /tokenize (default: vLLM's first model)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmc-admin",
        description="Operate the lmc_connector controller over HTTP.",
        epilog="exit codes: 0 ok, 1 operation failed, 2 usage/rejected, 3 unreachable, 4 auth",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default=DEFAULT_URL, help=f"controller URL (default {DEFAULT_URL})")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"or ${API_KEY_ENV}")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP call")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("compress", "decompress"):
        s = sub.add_parser(name, help=f"{name} cached KV of a prompt on one instance")
        s.add_argument("--instance", required=True)
        s.add_argument("--method", default="cachegen")
        s.add_argument("--location", default="LocalCPUBackend")
        _add_tokens(s)
        s.add_argument("--wait", action="store_true", help="follow the event to its end")
        s.add_argument("--wait-timeout", type=float, default=600.0)
    s = sub.add_parser("lookup", help="where the longest cached prefix of a prompt lives")
    _add_tokens(s)
    s = sub.add_parser("pin", help="pin the cached prefix of a prompt")
    s.add_argument("--instance", required=True)
    s.add_argument("--location", help="pin only the chunks in this location (default: any)")
    _add_tokens(s)
    s = sub.add_parser("unpin", help="unpin the cached prefix of a prompt (in every location)")
    s.add_argument("--instance", required=True)
    _add_tokens(s)
    s = sub.add_parser("clear", help="remove unpinned chunks of an instance")
    s.add_argument("--instance", required=True)
    s.add_argument("--location", help="one location (default: all)")
    s = sub.add_parser("move", help="move a cached prefix between locations of an instance")
    s.add_argument("--instance", required=True)
    s.add_argument("--source", required=True)
    s.add_argument("--destination", required=True)
    _add_tokens(s)
    s = sub.add_parser("health", help="controller health (or one instance's)")
    s.add_argument("--instance")
    s = sub.add_parser("worker-info", help="workers of an instance")
    s.add_argument("--instance", required=True)
    s.add_argument("--worker", type=int, action="append", help="worker id (repeatable)")
    sub.add_parser("instances", help="registered instances")
    for name in ("event", "check-finish"):
        s = sub.add_parser(name, help="an event's status")
        s.add_argument("event_id")
        s.add_argument("--wait", action="store_true", help="follow the event to its end")
        s.add_argument("--wait-timeout", type=float, default=600.0)
    sub.add_parser("metrics", help="Prometheus metrics text")
    return p


def _request(client: ControllerClient, args: argparse.Namespace) -> Any:
    c = args.command
    if c in ("compress", "decompress"):
        fn = client.compress if c == "compress" else client.decompress
        return fn(args.instance, args.method, args.location, _tokens(args))
    if c == "lookup":
        return client.lookup(_tokens(args))
    if c == "pin":
        return client.pin(args.instance, _tokens(args), args.location)
    if c == "unpin":
        return client.unpin(args.instance, _tokens(args))
    if c == "clear":
        return client.clear(args.instance, args.location)
    if c == "move":
        return client.move(args.instance, args.source, args.destination, _tokens(args))
    if c == "health":
        return client.health(args.instance)
    if c == "worker-info":
        return client.worker_info(args.instance, args.worker)
    if c == "instances":
        return client.instances()
    if c == "event":
        return client.event(args.event_id)
    if c == "check-finish":
        return client.check_finish(args.event_id)
    return client.metrics()


def _wait(client: ControllerClient, event_id: str, limit: float, quiet: bool) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while True:
        event: dict[str, Any] = client.event(event_id)
        workers = event.get("workers", [])
        done = sum(w["status"] in ("finished", "failed") for w in workers)
        if not quiet:
            print(
                f"\revent {event_id}: {event['status']}, {done}/{len(workers)} workers done",
                end="",
                file=sys.stderr,
                flush=True,
            )
        if event["status"] in ("finished", "failed"):
            if not quiet:
                print(file=sys.stderr)
            return event
        if time.monotonic() > deadline:
            raise ControllerUnreachableError(
                f"event {event_id} still {event['status']} after {limit:g} s"
            )
        time.sleep(POLL_S)


def _show(result: Any, as_json: bool) -> None:
    if isinstance(result, str):
        print(result, end="" if result.endswith("\n") else "\n")
    elif as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            text = (
                value
                if isinstance(value, str | int | float) or value is None
                else json.dumps(value)
            )
            print(f"{key}: {text}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with ControllerClient(args.url, args.api_key, args.timeout) as client:
            result = _request(client, args)
            if getattr(args, "wait", False):
                event_id = args.event_id if hasattr(args, "event_id") else result["event_id"]
                result = _wait(client, event_id, args.wait_timeout, args.json)
            _show(result, args.json)
            if isinstance(result, dict) and result.get("status") == "failed":
                return EXIT_FAILED
            return EXIT_OK
    except UsageError as e:
        print(f"lmc-admin: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ControllerUnreachableError as e:
        print(f"lmc-admin: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ControllerRejectedError as e:
        suffix = f" (event {e.event_id})" if e.event_id else ""
        print(f"lmc-admin: {e}{suffix}", file=sys.stderr)
        if e.status in (401, 403):
            return EXIT_AUTH
        return EXIT_FAILED if e.status >= 500 else EXIT_USAGE
