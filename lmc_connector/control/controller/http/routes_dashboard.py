"""The pages a person opens in a browser: the dashboard at `/` and the API docs at `/docs`.

Both work on an air-gapped cluster: the dashboard is one self-contained page
(`dashboard.html`: HTML, CSS and JavaScript inline, nothing fetched but this
controller's own JSON routes), and `/docs` loads Swagger UI from this
controller (the files `fastapi-offline` ships) instead of a CDN. The pages
themselves need no API key (they hold no data); the JSON routes they read do,
and the dashboard asks for the key once, keeps it in the tab's session
storage and sends it as a Bearer token.
"""

from __future__ import annotations

import asyncio
import functools
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request

from lmc_connector.control.controller.http import bodies
from lmc_connector.control.controller.http.endpoint import doc, json_response, service_of
from lmc_connector.control.controller.service import ControllerService
from lmc_connector.control.controller.state import ControllerState

#: Where the Swagger UI files are served from.
DOCS_ASSETS = "/docs-assets"
#: Most operations one `GET /operations` returns.
MAX_OPERATIONS = 1000

router = APIRouter()


def _operations(state: ControllerState, limit: int) -> Response:
    with state.lock:
        return json_response(bodies.OperationsResponse(state.operations.recent(limit)))


@router.get(
    "/operations",
    summary="Recent operations (in progress first, then the last ended)",
    **doc(None, bodies.OperationsResponse),
)
async def operations(
    limit: Annotated[int, Query(ge=1, le=MAX_OPERATIONS)] = 50,
    service: ControllerService = Depends(service_of),  # noqa: B008
) -> Response:
    return await asyncio.to_thread(_operations, service.state, limit)


@functools.cache
def _page() -> str:
    return resources.files(__package__).joinpath("dashboard.html").read_text(encoding="utf-8")


async def dashboard(request: Request) -> Response:
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})


def install_pages(app: FastAPI) -> None:
    """Serve the dashboard and offline docs on `app` (created with `docs_url=None`), outside
    its API-key dependency."""
    assets = resources.files("fastapi_offline").joinpath("static")
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    async def docs(request: Request) -> Response:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - API",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
        )

    app.add_route("/docs", docs, include_in_schema=False)
    app.add_route("/", dashboard, include_in_schema=False)
