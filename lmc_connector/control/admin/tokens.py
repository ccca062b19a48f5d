"""Where `lmc-admin` gets token ids: --tokens, --tokens-file, or a prompt tokenized by vLLM."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import httpx

from lmc_connector.control.admin.client import ControllerUnreachableError


class UsageError(ValueError):
    """The command line is wrong; the message says how."""


def add_token_options(p: argparse.ArgumentParser, every_chunk: bool = False) -> None:
    """The options naming a prompt's tokens; `every_chunk` adds --all (no tokens at all)."""
    p.add_argument("--tokens", help="token ids: 1,2,3 or a JSON list")
    p.add_argument("--tokens-file", help="file of token ids (JSON list or comma/space separated)")
    p.add_argument("--prompt", help="text to tokenize through vLLM (needs --vllm-url)")
    p.add_argument("--vllm-url", help="vLLM server for --prompt, e.g. http://localhost:8000")
    p.add_argument("--model", help="model name for /tokenize (default: vLLM's first model)")
    p.add_argument("--cache-salt", help="the cache_salt the prompt was sent to vLLM with")
    p.add_argument("--lora-name", help="the LoRA adapter the prompt was served with")
    p.add_argument("--lora-path", help="that adapter's path (as in --lora-modules name=path)")
    if every_chunk:
        p.add_argument(
            "--all",
            action="store_true",
            help="every chunk of the instance in --location instead of one prompt's",
        )


def scope_of(args: argparse.Namespace) -> dict[str, str]:
    """The body fields naming a scoped prompt (cache salt, LoRA adapter) the options give."""
    given = {
        "cache_salt": args.cache_salt,
        "lora_name": args.lora_name,
        "lora_path": args.lora_path,
    }
    scope = {k: v for k, v in given.items() if v is not None}
    if scope and getattr(args, "all", False):
        raise UsageError(
            "--all takes every chunk: it takes no --cache-salt, --lora-name, --lora-path"
        )
    return scope


def parse_tokens_text(text: str, source: str) -> list[int]:
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


def tokens_of(args: argparse.Namespace) -> list[int] | None:
    """The token ids the options name; None for --all (every chunk)."""
    given = [x for x in (args.tokens, args.tokens_file, args.prompt) if x is not None]
    every = getattr(args, "all", False)
    if every:
        if given:
            raise UsageError("--all takes no --tokens, --tokens-file or --prompt")
        return None
    if len(given) != 1:
        also = ", or --all" if hasattr(args, "all") else ""
        raise UsageError(f"give exactly one of --tokens, --tokens-file, --prompt{also}")
    if args.tokens is not None:
        return parse_tokens_text(args.tokens, "--tokens")
    if args.tokens_file is not None:
        try:
            text = Path(args.tokens_file).read_text()
        except OSError as e:
            raise UsageError(f"--tokens-file {args.tokens_file}: {e.strerror}") from e
        return parse_tokens_text(text, f"--tokens-file {args.tokens_file}")
    if args.vllm_url is None:
        raise UsageError("--prompt needs --vllm-url (the vLLM server that tokenizes it)")
    return _tokenize(args)


def required_tokens(args: argparse.Namespace) -> list[int]:
    tokens = tokens_of(args)
    assert tokens is not None, "only compress/decompress offer --all"
    return tokens
