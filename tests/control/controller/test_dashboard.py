"""The dashboard at `/` and the API docs at `/docs`, rendered by a real headless Chromium.

One controller with an API key and one instance of two in-process workers
that cached a prompt and compressed it. The screenshots are kept under
`test-artifacts/` (ignored by git) for a person to look at.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lmc_connector.launch import free_port
from tests.browser import Browser
from tests.control.conftest import new_controller
from tests.control.harness import CPU, Controller, Worker, engine_config, start_worker, wait_until

ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"
API_KEY = "dashboard-secret"
INSTANCE = "dash-instance-7"
PROMPT = list(range(300, 340))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Controller, str]]:
    """A controller with an API key, an instance of two workers, one finished compress."""
    tmp = tmp_path_factory.mktemp("dashboard")
    controller = new_controller(tmp, "--api-key", API_KEY, env={"LMC_CONTROLLER_API_KEY": API_KEY})
    controller.start()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    workers: list[Worker] = []
    try:
        ports = [free_port(), free_port()]
        config = engine_config(controller.monitor_port, INSTANCE, ports)
        workers = [start_worker(config, rank, 2) for rank in range(2)]
        for worker in workers:
            worker.fill(PROMPT)
        with httpx.Client(base_url=controller.url, headers=headers, timeout=10) as http:

            def indexed() -> bool:
                info = http.get("/instances").json()["instances"]
                return bool(info) and info[0]["indexed_chunks"] == len(PROMPT) // 4

            wait_until(indexed, what="the workers' chunks in the index")
            body = {"instance_id": INSTANCE, "method": "fp8", "location": CPU, "tokens": PROMPT}
            event_id = http.post("/compress", json=body).json()["event_id"]
            wait_until(
                lambda: http.get(f"/events/{event_id}").json()["status"] == "finished",
                what="the compress to finish",
            )
        yield controller, event_id
    finally:
        for worker in workers:
            worker.agent.close()
        controller.stop()


def test_dashboard_asks_for_the_key_once_then_shows_instances_workers_and_operations(
    fleet: tuple[Controller, str], tmp_path: Path
) -> None:
    controller, event_id = fleet
    with Browser.start(tmp_path / "chromium") as browser:
        browser.open(controller.url + "/")
        browser.wait_for_text("this controller needs its API key")
        browser.evaluate(
            f"document.getElementById('api-key').value = '{API_KEY}';"
            "document.getElementById('login-form').requestSubmit(); true"
        )
        browser.wait_for_text(INSTANCE)
        browser.wait_for_text(event_id[:12])
        shown = browser.text()
        status = browser.evaluate("document.getElementById('status').textContent")
        browser.screenshot(ARTIFACTS / "dashboard.png")
        # The key went to the tab's session storage, not into the page or a cookie.
        assert browser.evaluate("sessionStorage.getItem('lmc_controller_api_key')") == API_KEY
        assert browser.evaluate("document.cookie") == ""
        # Reloading keeps the key for this tab: no second prompt.
        browser.open(controller.url + "/")
        browser.wait_for_text(INSTANCE)
        assert browser.evaluate("getComputedStyle(document.getElementById('login')).display") == (
            "none"
        )
        requests = list(browser.requests)
    assert status == "ok"
    assert "2 / 2" in shown  # workers of the instance
    assert "LocalCPUBackend" in shown and "10 chunks" in shown  # tier usage per worker
    assert "compress" in shown and "finished" in shown
    assert all(url.startswith(controller.url) for url in requests), requests


def test_dashboard_escapes_what_workers_report(
    fleet: tuple[Controller, str], tmp_path: Path
) -> None:
    """Instance names come from workers: they are shown as text, never run as markup."""
    controller, _ = fleet
    with Browser.start(tmp_path / "chromium") as browser:
        browser.open(controller.url + "/")
        browser.evaluate(f"sessionStorage.setItem('lmc_controller_api_key', '{API_KEY}'); true")
        browser.open(controller.url + "/")
        browser.wait_for_text(INSTANCE)
        shown, harmless = browser.evaluate(
            "(() => {"
            " render({status: 'ok', instances: 1, workers: 0, indexed_chunks: 0, problems: []},"
            "  [{instance_id: '<img src=x onerror=window.pwned=1>', model: 'm', workers: [],"
            "   world_size: 1, chunk_size: 4, indexed_chunks: 0, locations: [], methods: []}], []);"
            " const shown = document.body.innerText.includes('<img src=x');"
            " const harmless = () => window.pwned === undefined;"
            " return new Promise(r => setTimeout(() => r([shown, harmless()]), 300));"
            "})()"
        )
        assert shown and harmless


def test_docs_render_without_internet(fleet: tuple[Controller, str], tmp_path: Path) -> None:
    controller, _ = fleet
    with Browser.start(tmp_path / "chromium") as browser:
        browser.open(controller.url + "/docs")
        browser.wait_for(
            "document.querySelector('.swagger-ui .info .title') !== null &&"
            " document.querySelectorAll('.opblock').length > 5",
            what="Swagger UI to render the API",
        )
        shown = browser.text()
        browser.screenshot(ARTIFACTS / "docs.png")
        requests = list(browser.requests)
    assert "lmc_connector controller" in shown
    assert "/compress" in shown
    assert requests and all(url.startswith(controller.url) for url in requests), requests
