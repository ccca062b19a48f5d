"""The seed walk-through (compress and decompress the KV cache), end to end, as one command.

Trains the small local model if needed (once, about two minutes; see
`examples/tiny_model.py`), starts the controller and vLLM's OpenAI server
with our connector under the seed page's own names (`lmcache_controller`,
`"kv_connector":"LMCacheConnectorV1"`; `lmc-controller` and `LMCConnectorV1`
where the LMCache package is installed, which keeps those names), sends the
seed's completion, tokenizes the prompt, compresses its KV with CacheGen,
serves the prompt again from the compressed cache, decompresses, serves it
again, and prints a report with the three answers side by side: from exact
KV, from the compressed cache and from the decompressed one. Every step
prints the equivalent command to repeat it by hand. Every process it starts
is stopped on exit, Ctrl-C or failure.

A random-weight model (`examples.tiny_model.build_tiny_model`) may pick the
end-of-sequence token at once; for such a model only, the completions ask for
all 10 tokens (`ignore_eos`) so that the answers compare. The trained model
never learned to end a text (its training text has no end-of-sequence token),
so it needs no such help.

    python -m examples.walkthrough [--model DIR] [--method cachegen] [--keep-logs]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from examples.walkthrough_report import MISTAKE_FIX, Report, check, print_report, say
from lmc_connector import launch as services
from lmc_connector.entrypoints import lmcache_installed

ROOT = Path(__file__).resolve().parent.parent
SEED_PROMPT = "Explain the significance of KV cache in language models."
DEFAULT_MODEL_DIR = ROOT / ".models" / "trained-llama"
TERMINAL = {"finished", "failed"}
INSTANCE_ID = "lmcache_default_instance"


@dataclass
class Ports:
    vllm: int = 8000
    controller: int = 9000
    monitor: int = 9001
    worker: int = 8001

    @classmethod
    def free(cls) -> Ports:
        return cls(*(services.free_port() for _ in range(4)))


class WalkthroughError(RuntimeError):
    """A step did not do what the seed page says it does."""


def cached_tokens(answer: dict[str, Any]) -> int:
    """Prompt tokens a `/v1/completions` answer says came from a cache."""
    details = answer["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def show(command: str) -> None:
    say("    $ " + command.replace("\n", "\n      "))


def curl_json(url: str, body: dict[str, Any]) -> str:
    return (
        f"curl -X POST {url} -H 'Content-Type: application/json' "
        f"-d '{json.dumps(body, separators=(', ', ': '))}'"
    )


class Walkthrough:
    """The steps of the seed page against running services; each returns what it saw."""

    def __init__(
        self,
        vllm_url: str,
        controller_url: str,
        model: str,
        instance_id: str,
        ignore_eos: bool = False,
        expect_words: bool = False,
    ) -> None:
        self.ignore_eos = ignore_eos
        self.report = Report(expect_words=expect_words)
        self.vllm_url = vllm_url
        self.controller_url = controller_url
        self.model = model
        self.instance_id = instance_id
        self.http = httpx.Client(timeout=120)

    def complete(self, label: str, prompt: str = SEED_PROMPT) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "max_tokens": 10}
        body["temperature"] = 0
        if self.ignore_eos:
            body["ignore_eos"] = True
        say(f"\n== completion ({label})")
        show(curl_json(f"{self.vllm_url}/v1/completions", body))
        start = time.perf_counter()
        answer = self._post(f"{self.vllm_url}/v1/completions", body)
        self.report.seconds[f"completion {label}"] = time.perf_counter() - start
        cached = cached_tokens(answer)
        text = answer["choices"][0]["text"]
        self.report.outputs.append(text)
        self.report.cached_tokens.append(cached)
        say(f"    -> {text!r}; prompt tokens {answer['usage']['prompt_tokens']}, cached {cached}")
        return answer

    def tokenize(self, prompt: str = SEED_PROMPT) -> list[int]:
        body = {"model": self.model, "prompt": prompt}
        say("\n== tokenize the prompt")
        show(curl_json(f"{self.vllm_url}/tokenize", body))
        answer = self._post(f"{self.vllm_url}/tokenize", body)
        tokens = [int(t) for t in answer["tokens"]]
        self.report.num_tokens = len(tokens)
        say(f"    -> {json.dumps({'count': answer['count'], 'tokens': tokens})}")
        return tokens

    def transform(self, kind: str, method: str, location: str, tokens: list[int]) -> str:
        body = {
            "instance_id": self.instance_id,
            "method": method,
            "location": location,
            "tokens": tokens,
        }
        say(f"\n== {kind} with {method} in {location}")
        show(curl_json(f"{self.controller_url}/{kind}", body))
        show(
            f"lmc-admin --url {self.controller_url} {kind} --instance {self.instance_id} "
            f"--method {method} --location {location} --prompt '{SEED_PROMPT}' "
            f"--vllm-url {self.vllm_url} --wait"
        )
        answer = self._post(f"{self.controller_url}/{kind}", body)
        say(f"    -> {json.dumps(answer)}")
        self.report.scheduled[kind] = int(answer["num_tokens"])
        event_id = str(answer["event_id"])
        self.report.events[kind] = self.follow(event_id)
        return event_id

    def follow(self, event_id: str, timeout: float = 300.0) -> dict[str, Any]:
        say(f"    following event {event_id}")
        show(curl_json(f"{self.controller_url}/check_finish", {"event_id": event_id}))
        deadline = time.monotonic() + timeout
        while True:
            status = self._post(f"{self.controller_url}/check_finish", {"event_id": event_id})
            if status["status"] in TERMINAL or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        say(f"    -> {json.dumps(status)}")
        if status["status"] != "finished":
            raise WalkthroughError(f"event {event_id} ended {status['status']}: {status}")
        return dict(status)

    def mistakes(self, method: str, location: str, tokens: list[int]) -> None:
        """Send what a user gets wrong most often; each answer must say how to fix it."""
        say("\n== mistakes a user makes, and what the controller answers")
        good: dict[str, object] = {
            "instance_id": self.instance_id,
            "method": method,
            "location": location,
        }
        wrong = {
            "unknown instance": {**good, "instance_id": "my-instance"},
            "misspelled method": {**good, "method": "cachegn"},
            "unknown location": {**good, "location": "LocalGPUBackend"},
        }
        assert set(wrong) == set(MISTAKE_FIX)
        for name, body in wrong.items():
            body = {**body, "tokens": tokens}
            show(curl_json(f"{self.controller_url}/compress", body))
            answer = self.http.post(f"{self.controller_url}/compress", json=body)
            detail = str(answer.json().get("detail", answer.text))
            self.report.mistakes[name] = (answer.status_code, detail)
            say(f"    -> {answer.status_code} {detail}")

    def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(url, json=body)
        if response.status_code >= 400:
            raise WalkthroughError(f"POST {url} -> {response.status_code}: {response.text}")
        return dict(response.json())


def run_steps(flow: Walkthrough, method: str, location: str) -> Report:
    """The seed page, step by step; raises WalkthroughError where reality differs."""
    flow.complete("first request: computes and caches the prompt's KV")
    tokens = flow.tokenize()
    flow.transform("compress", method, location, tokens)
    flow.complete("served from the compressed cache")
    flow.transform("decompress", method, location, tokens)
    flow.complete("served from the decompressed cache")
    flow.mistakes(method, location, tokens)
    return flow.report


def build_model_if_missing(model_dir: Path) -> Path:
    from examples.tiny_model import build_trained_model

    if model_dir == DEFAULT_MODEL_DIR:
        say(f"== trained model in {model_dir} (trained once if missing, about two minutes)")
        build_trained_model(model_dir)
    elif not (model_dir / "config.json").exists():
        raise WalkthroughError(f"--model {model_dir} has no config.json: give a model directory")
    return model_dir


def _cpu_args() -> tuple[str, ...]:
    import torch

    return () if torch.cuda.is_available() else ("--enforce-eager", "--block-size", "32")


def max_model_len(model_dir: Path, cap: int = 4096) -> int:
    """The model's own context length (its `max_position_embeddings`), at most `cap`."""
    config = json.loads((model_dir / "config.json").read_text())
    return min(cap, int(config.get("max_position_embeddings", cap)))


@contextlib.contextmanager
def started(
    model_dir: Path,
    config_file: Path,
    ports: Ports,
    log_dir: Path,
    served_name: str,
    extra_args: tuple[str, ...] = (),
) -> Iterator[tuple[Walkthrough, list[services.Service]]]:
    """The controller and vLLM running; yields the walk-through and both services.

    `extra_args` go to vLLM's server after the walk-through's own flags.
    """
    from examples.tiny_model import model_kind

    controller_url = f"http://localhost:{ports.controller}"
    vllm_url = f"http://localhost:{ports.vllm}"
    # The seed page's own names where they mean this package (LMCache not installed).
    seed_names = not lmcache_installed()
    script = services.SEED_CONTROLLER_SCRIPT if seed_names else "lmc-controller"
    say("\n== start the controller")
    cmd = services.controller_command("localhost", ports.controller, ports.monitor, script)
    show(f"{script} " + " ".join(cmd[1:]))
    controller = services.running(
        "lmc-controller", cmd, controller_url, log_dir / "controller.log", timeout=30
    )
    with controller as controller_service:
        say("\n== start vLLM with the connector (20-60 s on a CPU)")
        vcmd = services.vllm_command(
            model_dir,
            ports.vllm,
            served_name,
            max_model_len=max_model_len(model_dir),
            connector=services.SEED_CONNECTOR_CONFIG if seed_names else None,
            extra_args=_cpu_args() + extra_args,
        )
        show(f"LMCACHE_CONFIG_FILE={config_file} " + " ".join(vcmd[2:]))
        env = services.cpu_vllm_env(config_file)
        with services.running("vLLM", vcmd, vllm_url, log_dir / "vllm.log", env=env) as vllm:
            kind = model_kind(model_dir)
            flow = Walkthrough(
                vllm_url,
                controller_url,
                served_name,
                INSTANCE_ID,
                ignore_eos=kind == "weights",
                expect_words=kind == "trained",
            )
            yield flow, [controller_service, vllm]


def config_for_ports(template: Path, ports: Ports, folder: Path) -> Path:
    """A copy of the example config pointing at `ports` instead of the seed's."""
    text = template.read_text()
    text = text.replace("localhost:9001", f"localhost:{ports.monitor}")
    text = text.replace("lmcache_worker_ports: 8001", f"lmcache_worker_ports: {ports.worker}")
    path = folder / template.name
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="local model dir")
    parser.add_argument("--served-model-name", default=None, help="default: the model dir's name")
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "example.yaml")
    parser.add_argument("--method", default="cachegen")
    parser.add_argument("--location", default="LocalCPUBackend")
    parser.add_argument("--free-ports", action="store_true", help="pick free ports, not the seed's")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep service logs here")
    parser.add_argument("--report-json", type=Path, default=None, help="also write the report")
    args = parser.parse_args(argv)

    ports = Ports.free() if args.free_ports else Ports()
    busy = [p for p in (ports.vllm, ports.controller, ports.monitor) if services.port_in_use(p)]
    if busy:
        say(f"ports {busy} are in use: stop what holds them, or pass --free-ports")
        return 2
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="lmc-walkthrough-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    config_file = config_for_ports(args.config, ports, log_dir) if args.free_ports else args.config
    try:
        model_dir = build_model_if_missing(args.model.resolve())
        name = args.served_model_name or model_dir.name
        with started(model_dir, config_file, ports, log_dir, name) as (flow, _):
            report = run_steps(flow, args.method, args.location)
        print_report(report, args.method)
        problems = check(report)
        if args.report_json is not None:
            report.save(args.report_json, problems)
    except (WalkthroughError, services.ServiceError) as e:
        say(f"\nFAILED: {e}\nlogs: {log_dir}")
        return 1
    except KeyboardInterrupt:
        say("\ninterrupted; every process started here was stopped")
        return 130
    for problem in problems:
        say(f"FAILED: {problem}")
    say(f"\nall steps of the seed page passed; logs: {log_dir}" if not problems else "")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
