"""How every route reads its body and writes its answer: msgspec in, msgspec out.

Bodies are decoded straight from the request bytes with the route's Struct:
one validation library for the wire and the API, error messages that name
the field (`$.tokens[3]`), and 32K-token bodies parsed in microseconds.
Bodies larger than `--max-body-bytes` and token lists longer than
`--max-tokens` get 413 before any work is done. Errors are JSON
`{"detail": ..., "event_id": ...}`.
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


async def service_of(request: Request) -> ControllerService:
    """The service the app was created for (a FastAPI dependency; async, so that FastAPI
    calls it on the event loop instead of handing it to a worker thread)."""
    service: ControllerService = request.app.state.service
    return service


def _refusal(status: int, message: str) -> BodyError:
    error = BodyError(message)
    error.status = status
    return error


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed `limit` bytes."""
    too_large = _refusal(
        413,
        f"the request body exceeds the limit of {limit} bytes (lmc-controller "
        "--max-body-bytes); send fewer tokens per request",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def body(kind: type[B]) -> Callable[[Request], Awaitable[B]]:
    """A FastAPI dependency decoding the JSON body as `kind` (BodyError names the field)."""

    async def decode(request: Request) -> B:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise _refusal(
                415,
                f"send the body as JSON with 'Content-Type: application/json' (got "
                f"{media or 'no content type'!r})",
            )
        settings = (await service_of(request)).settings
        data = await _read_body(request, settings.max_body_bytes)
        if not data.strip():
            data = b"{}"  # no body: the fields' defaults, or a 422 naming what is required
        try:
            decoded = msgspec.json.decode(data, type=kind)
        except msgspec.ValidationError as e:
            raise _refusal(422, f"invalid request body: {e}") from None
        except msgspec.DecodeError as e:
            raise BodyError(f"request body is not valid JSON: {e}") from None
        tokens = getattr(decoded, "tokens", None)
        if tokens is not None and len(tokens) > settings.max_tokens:
            raise _refusal(
                413,
                f"tokens: {len(tokens)} token ids exceed the limit of {settings.max_tokens} "
                "(lmc-controller --max-tokens)",
            )
        return decoded

    return decode


def _ref(kind: Any) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{kind.__name__}"}


def doc(
    body_type: type[msgspec.Struct] | None, answer: type[msgspec.Struct] | None
) -> dict[str, Any]:
    """Route options documenting a msgspec body and answer in the OpenAPI schema."""
    responses: dict[int | str, dict[str, Any]] = {
        400: {"description": "bad request"},
        413: {"description": "body or token list over the controller's limits"},
        415: {"description": "body not sent as application/json"},
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
