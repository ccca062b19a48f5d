"""A small synchronous client of the controller's HTTP API (httpx), used by `lmc-admin`.

Every call has a timeout. Failures become one of three exceptions, each
saying what to do next; the response JSON is returned as plain dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:9000"
#: Seconds per HTTP call; the controller itself answers within its command timeout.
DEFAULT_TIMEOUT_S = 30.0


class ControllerUnreachableError(ConnectionError):
    """No answer from the controller: check --url, and that lmc-controller is running."""


class ControllerRejectedError(RuntimeError):
    """The controller answered with an error status; `detail` says what to fix."""

    def __init__(self, status: int, detail: str, event_id: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.event_id = event_id


class ControllerClient:
    """Owns one httpx connection pool to the controller; one method per route.

    Used from one thread (the CLI's); close it, or use it as a context manager.
    """

    def __init__(
        self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request; returns the decoded JSON (or text for non-JSON answers)."""
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TimeoutException as e:
            raise ControllerUnreachableError(f"{self.url}{path}: timed out ({e})") from e
        except httpx.TransportError as e:
            raise ControllerUnreachableError(
                f"cannot reach the controller at {self.url}: {e}"
            ) from e
        is_json = response.headers.get("content-type", "").startswith("application/json")
        data: Any = response.json() if is_json and response.content else response.text
        if response.status_code >= 400:
            detail = data.get("detail", data) if isinstance(data, dict) else data
            event_id = data.get("event_id") if isinstance(data, dict) else None
            raise ControllerRejectedError(response.status_code, str(detail), event_id)
        return data

    # -- one method per route -----------------------------------------------------------------

    def compress(self, instance_id: str, method: str, location: str, tokens: Sequence[int]) -> Any:
        body = {"instance_id": instance_id, "method": method, "location": location}
        return self.call("POST", "/compress", {**body, "tokens": list(tokens)})

    def decompress(
        self, instance_id: str, method: str, location: str, tokens: Sequence[int]
    ) -> Any:
        body = {"instance_id": instance_id, "method": method, "location": location}
        return self.call("POST", "/decompress", {**body, "tokens": list(tokens)})

    def lookup(self, tokens: Sequence[int]) -> Any:
        return self.call("POST", "/lookup", {"tokens": list(tokens)})

    def pin(self, instance_id: str, tokens: Sequence[int], location: str | None = None) -> Any:
        body = {"instance_id": instance_id, "tokens": list(tokens), "location": location}
        return self.call("POST", "/pin", body)

    def unpin(self, instance_id: str, tokens: Sequence[int]) -> Any:
        return self.call("POST", "/unpin", {"instance_id": instance_id, "tokens": list(tokens)})

    def clear(self, instance_id: str, location: str | None = None) -> Any:
        return self.call("POST", "/clear", {"instance_id": instance_id, "location": location})

    def move(self, instance_id: str, source: str, destination: str, tokens: Sequence[int]) -> Any:
        body = {"instance_id": instance_id, "source": source, "destination": destination}
        return self.call("POST", "/move", {**body, "tokens": list(tokens)})

    def health(self, instance_id: str | None = None) -> Any:
        return self.call("POST", "/health", {"instance_id": instance_id})

    def worker_info(self, instance_id: str, worker_ids: Sequence[int] | None = None) -> Any:
        ids = None if worker_ids is None else list(worker_ids)
        return self.call(
            "POST", "/query_worker_info", {"instance_id": instance_id, "worker_ids": ids}
        )

    def instances(self) -> Any:
        return self.call("GET", "/instances")

    def event(self, event_id: str) -> Any:
        return self.call("GET", f"/events/{quote(event_id, safe='')}")

    def check_finish(self, event_id: str) -> Any:
        return self.call("POST", "/check_finish", {"event_id": event_id})

    def metrics(self) -> str:
        return str(self.call("GET", "/metrics"))
