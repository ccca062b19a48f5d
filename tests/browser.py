"""A real headless Chromium driven over the Chrome DevTools protocol, for page tests.

    with Browser.start(tmp_path) as browser:
        browser.open("http://127.0.0.1:9000/")
        browser.wait_for_text("my-instance")
        browser.screenshot(path)

Uses Debian's `chromium` (installed by `scripts/system_deps.sh`) and the
`websockets` client that ships with vLLM's dependencies. Every wait has a
deadline. Network requests the page makes are recorded (`requests`), so a
test can show that a page fetches nothing from outside.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
START_TIMEOUT_S = 30.0


def chromium_path() -> str:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError(
        "headless Chromium is needed for page tests and was not found: run "
        "`bash scripts/system_deps.sh` (Debian: apt-get install chromium)"
    )


class Browser:
    """Owns one Chromium process and a DevTools session on its first page.

    Used from the test's thread only. Events that arrive while a command is
    awaited are kept: network requests in `requests`.
    """

    def __init__(self, process: subprocess.Popen[bytes], page: ClientConnection) -> None:
        self._process = process
        self._page = page
        self._ids = itertools.count(1)
        self.requests: list[str] = []

    @classmethod
    @contextmanager
    def start(cls, profile: Path, width: int = 1400, height: int = 1000) -> Iterator[Browser]:
        profile.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            [
                chromium_path(),
                "--headless=new",
                "--no-sandbox",  # tests run as root in CI
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port = _devtools_port(profile, process)
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            page_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            with connect(page_url, max_size=64 * 2**20, open_timeout=10) as page:
                browser = cls(process, page)
                browser.send("Page.enable")
                browser.send("Network.enable")
                browser.send("Runtime.enable")
                yield browser
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        """Run one DevTools command and return its result (AssertionError on an error)."""
        call_id = next(self._ids)
        self._page.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"DevTools {method} did not answer within {timeout} s")
            message = json.loads(self._page.recv(timeout=left))
            if message.get("id") == call_id:
                if "error" in message:
                    raise AssertionError(f"DevTools {method} failed: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            if message.get("method") == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"]["url"])

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if a promise)."""
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def text(self) -> str:
        return str(self.evaluate("document.body ? document.body.innerText : ''"))

    def wait_for(self, expression: str, timeout: float = 20.0, what: str = "") -> Any:
        """Poll a JavaScript expression until it is truthy; fail at the deadline."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(
            f"timed out after {timeout} s waiting for {what or expression}; last value "
            f"{value!r}; the page shows:\n{self.text()[:2000]}"
        )

    def wait_for_text(self, needle: str, timeout: float = 20.0) -> None:
        self.wait_for(
            f"document.body && document.body.innerText.includes({json.dumps(needle)})",
            timeout,
            f"the page to show {needle!r}",
        )

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path


def _devtools_port(profile: Path, process: subprocess.Popen[bytes]) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"chromium exited with code {process.returncode} at start")
        if marker.exists():
            first = marker.read_text().splitlines()[:1]
            if first and first[0].isdigit():
                return int(first[0])
        time.sleep(0.05)
    raise AssertionError(f"chromium did not open its DevTools port within {START_TIMEOUT_S} s")
