"""A small synchronous client of the controller's HTTP API (httpx), used by `lmc-admin`.

Every call has a timeout. Failures become one of a few exceptions, each
saying what to do next; the response JSON is returned as plain dicts.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:9000"
#: Seconds per HTTP call; the controller itself answers within its command timeout.
DEFAULT_TIMEOUT_S = 30.0
#: What FastAPI answers for a route it does not have: the controller's own 404s say more.
_GENERIC_DETAILS = ("Not Found", "Method Not Allowed")
#: What besides token ids names a prompt: `cache_salt`, `lora_name`, `lora_path` (as given).
Scope = Mapping[str, str]


class ControllerUnreachableError(ConnectionError):
    """No answer from the controller: check --url, and that lmc-controller is running."""


class NotAControllerError(ControllerUnreachableError):
    """Something answered at the URL, but not an lmc-controller: check --url."""


class ControllerRejectedError(RuntimeError):
    """The controller answered with an error status; `detail` says what to fix."""

    def __init__(self, status: int, detail: str, event_id: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.event_id = event_id


def _first_line(text: object, limit: int = 200) -> str:
    """A non-JSON error body (a proxy's page) shortened to one line."""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= limit else f"{line[:limit]}..."


class ControllerClient:
    """Owns one httpx connection pool to the controller; one method per route.

    Used from one thread (the CLI's); close it, or use it as a context manager.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        cacert: str | None = None,
    ) -> None:
        """`cacert`: PEM file of the CA that signed an HTTPS controller's certificate (default:
        the system's CAs); OSError / ssl.SSLError when it cannot be loaded."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        verify: ssl.SSLContext | bool = (
            True if cacert is None else ssl.create_default_context(cafile=cacert)
        )
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, verify=verify
        )

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
            hint = (
                " (give the CA that signed its certificate with --cacert)"
                if "CERTIFICATE_VERIFY_FAILED" in str(e)
                else ""
            )
            raise ControllerUnreachableError(
                f"cannot reach the controller at {self.url}: {e}{hint}"
            ) from e
        media = response.headers.get("content-type", "").split(";")[0].strip()
        expected = "text/plain" if path == "/metrics" else "application/json"
        try:
            data: Any = response.json() if media == "application/json" else response.text
        except ValueError:
            data = None
        generic = isinstance(data, dict) and data.get("detail") in _GENERIC_DETAILS
        if (media != expected and response.status_code < 500 and response.status_code != 401) or (
            response.status_code in (404, 405) and generic
        ):
            raise NotAControllerError(
                f"{self.url} does not look like an lmc-controller: {method} {path} answered "
                f"{response.status_code} {media or 'without a content type'}; check --url"
            )
        if response.status_code >= 400:
            detail = data.get("detail", data) if isinstance(data, dict) else _first_line(data)
            event_id = data.get("event_id") if isinstance(data, dict) else None
            raise ControllerRejectedError(response.status_code, str(detail), event_id)
        return data

    # -- one method per route -----------------------------------------------------------------

    def transform(
        self,
        kind: str,
        instance_id: str,
        method: str,
        location: str,
        tokens: Sequence[int] | None,
        scope: Scope | None = None,
    ) -> Any:
        """`kind` "compress" or "decompress"; `tokens` None means every chunk in `location`."""
        body: dict[str, Any] = {"instance_id": instance_id, "method": method, "location": location}
        if tokens is not None:
            body["tokens"] = list(tokens)
        return self.call("POST", f"/{kind}", {**body, **(scope or {})})

    def compress(
        self, instance_id: str, method: str, location: str, tokens: Sequence[int] | None
    ) -> Any:
        return self.transform("compress", instance_id, method, location, tokens)

    def decompress(
        self, instance_id: str, method: str, location: str, tokens: Sequence[int] | None
    ) -> Any:
        return self.transform("decompress", instance_id, method, location, tokens)

    def calibrate(self, instance_id: str, method: str = "kvtc") -> Any:
        return self.call("POST", "/calibrate", {"instance_id": instance_id, "method": method})

    def lookup(self, tokens: Sequence[int], scope: Scope | None = None) -> Any:
        return self.call("POST", "/lookup", {"tokens": list(tokens), **(scope or {})})

    def pin(
        self,
        instance_id: str,
        tokens: Sequence[int],
        location: str | None = None,
        scope: Scope | None = None,
    ) -> Any:
        body = {"instance_id": instance_id, "tokens": list(tokens), "location": location}
        return self.call("POST", "/pin", {**body, **(scope or {})})

    def unpin(self, instance_id: str, tokens: Sequence[int], scope: Scope | None = None) -> Any:
        body = {"instance_id": instance_id, "tokens": list(tokens), **(scope or {})}
        return self.call("POST", "/unpin", body)

    def clear(self, instance_id: str, location: str | None = None) -> Any:
        return self.call("POST", "/clear", {"instance_id": instance_id, "location": location})

    def move(
        self,
        instance_id: str,
        source: str,
        destination: str,
        tokens: Sequence[int],
        scope: Scope | None = None,
    ) -> Any:
        body = {"instance_id": instance_id, "source": source, "destination": destination}
        return self.call("POST", "/move", {**body, "tokens": list(tokens), **(scope or {})})

    def move_across(
        self,
        old_position: tuple[str, str],
        new_position: tuple[str, str],
        tokens: Sequence[int],
        should_copy: bool = False,
        scope: Scope | None = None,
    ) -> Any:
        """LMCache's `/move`: (instance_id, location) to (instance_id, location)."""
        body: dict[str, Any] = {
            "old_position": list(old_position),
            "new_position": list(new_position),
            "tokens": list(tokens),
            "should_copy": should_copy,
        }
        return self.call("POST", "/move", {**body, **(scope or {})})

    def health(self, instance_id: str | None = None) -> Any:
        return self.call("POST", "/health", {"instance_id": instance_id})

    def worker_info(self, instance_id: str, worker_ids: Sequence[int] | None = None) -> Any:
        ids = None if worker_ids is None else list(worker_ids)
        return self.call(
            "POST", "/query_worker_info", {"instance_id": instance_id, "worker_ids": ids}
        )

    def workers(self, instance_id: str | None = None, worker_id: int | None = None) -> Any:
        params = {"instance_id": instance_id, "worker_id": worker_id}
        query = "&".join(
            f"{k}={quote(str(v), safe='')}" for k, v in params.items() if v is not None
        )
        return self.call("GET", f"/controller/workers{'?' + query if query else ''}")

    def query_instance(self, ip: str) -> Any:
        return self.call("POST", "/query_instance", {"ip": ip})

    def instances(self) -> Any:
        return self.call("GET", "/instances")

    def event(self, event_id: str) -> Any:
        return self.call("GET", f"/events/{quote(event_id, safe='')}")

    def check_finish(self, event_id: str) -> Any:
        return self.call("POST", "/check_finish", {"event_id": event_id})

    def operations(self, limit: int = 50) -> Any:
        """Recent operations: those in progress first, then the last ended."""
        return self.call("GET", f"/operations?limit={int(limit)}")

    def metrics(self) -> str:
        return str(self.call("GET", "/metrics"))
