"""The controller's HTTP API: a FastAPI app over one `ControllerService` (OpenAPI at /docs).

With an API key every route requires it except /docs and /openapi.json (the
schema, the same for every deployment) and the dashboard page at / (which
holds no data: it asks for the key and sends it with every request it makes). Every refusal is
JSON `{"detail": ..., "event_id": ...}`: 400 for invalid JSON or a bad choice, 415 for a body
that is not JSON, 422 for a body or query parameter of the wrong shape (an empty body is an
empty object), 401 without the API key, 404 for an unknown instance, operation or route, 503
when workers do not answer in time.
"""

from __future__ import annotations

import hmac
from typing import Any

import msgspec
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmc_connector.control.controller.errors import ControlError
from lmc_connector.control.controller.http import (
    routes_dashboard,
    routes_metrics,
    routes_ops,
    routes_query,
)
from lmc_connector.control.controller.http.endpoint import SCHEMA_TYPES, error_response
from lmc_connector.control.controller.service import ControllerService


def create_app(service: ControllerService) -> FastAPI:
    """The FastAPI app serving `service`; the caller starts and closes the service."""
    bearer = HTTPBearer(auto_error=False, description="the controller's --api-key")

    # async: checked on the event loop (a plain def would cost a worker-thread round trip)
    async def authorize(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        key = service.settings.api_key
        if key is None:
            return
        if creds is None or not hmac.compare_digest(creds.credentials.encode(), key.encode()):
            raise HTTPException(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <api key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    app = FastAPI(
        title="lmc_connector controller",
        description="Look up, pin, clear, move, compress and decompress cached KV.",
        dependencies=[Depends(authorize)],
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service

    @app.exception_handler(ControlError)
    async def refused(request: Request, error: ControlError) -> Response:
        return error_response(error.status, str(error), error.event_id)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(request: Request, error: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{' '.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        return error_response(422, f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        response = error_response(error.status_code, str(error.detail))
        response.headers.update(error.headers or {})
        return response

    for module in (routes_ops, routes_query, routes_metrics, routes_dashboard):
        app.include_router(module.router)
    routes_dashboard.install_pages(app)
    _install_openapi(app)
    return app


def _install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version="1", description=app.description, routes=app.routes
            )
            _, components = msgspec.json.schema_components(
                SCHEMA_TYPES, ref_template="#/components/schemas/{name}"
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
