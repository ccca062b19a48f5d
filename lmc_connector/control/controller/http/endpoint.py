"""How every route reads its body and writes its answer: msgspec in, msgspec out.

Bodies are decoded straight from the request bytes with the route's Struct:
one validation library for the wire and the API, error messages that name
the field (`$.tokens[3]`), and 32K-token bodies parsed in microseconds.
Errors are JSON `{"detail": ..., "event_id": ...}`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from fastapi import Request
from fastapi.responses import Response

from lmc_connector.control.controller.errors import BodyError
from lmc_connector.control.controller.http import bodies
from lmc_connector.control.controller.service import ControllerService

B = TypeVar("B", bound=msgspec.Struct)

#: Every Struct of the API, for the OpenAPI schema's components.
SCHEMA_TYPES: list[Any] = [
    getattr(bodies, name) for name in bodies.__all__ if isinstance(getattr(bodies, name), type)
]


def json_response(body: msgspec.Struct, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def error_response(status: int, detail: str, event_id: str | None = None) -> Response:
    return json_response(bodies.ErrorResponse(detail, event_id), status)


def service_of(request: Request) -> ControllerService:
    """The service the app was created for (a FastAPI dependency)."""
    service: ControllerService = request.app.state.service
    return service


def body(kind: type[B]) -> Callable[[Request], Awaitable[B]]:
    """A FastAPI dependency decoding the JSON body as `kind` (BodyError names the field)."""

    async def decode(request: Request) -> B:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            error = BodyError(
                f"send the body as JSON with 'Content-Type: application/json' (got "
                f"{media or 'no content type'!r})"
            )
            error.status = 415
            raise error
        data = await request.body()
        try:
            return msgspec.json.decode(data, type=kind)
        except msgspec.ValidationError as e:
            error = BodyError(f"invalid request body: {e}")
            error.status = 422
            raise error from None
        except msgspec.DecodeError as e:
            raise BodyError(f"request body is not valid JSON: {e}") from None

    return decode


def _ref(kind: Any) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{kind.__name__}"}


def doc(
    body_type: type[msgspec.Struct] | None, answer: type[msgspec.Struct] | None
) -> dict[str, Any]:
    """Route options documenting a msgspec body and answer in the OpenAPI schema."""
    responses: dict[int | str, dict[str, Any]] = {
        400: {"description": "bad request"},
        404: {"description": "unknown instance or event"},
        409: {"description": "not yet possible (e.g. compress before calibrate): do what it says"},
        503: {"description": "workers did not answer in time"},
    }
    if answer is not None:
        responses[200] = {"content": {"application/json": {"schema": _ref(answer)}}}
    extra = None
    if body_type is not None:
        extra = {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(body_type)}},
            }
        }
    return {"responses": responses, "openapi_extra": extra, "response_class": Response}
