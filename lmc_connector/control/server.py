"""The controller's HTTP API (FastAPI; OpenAPI at /docs).

Bodies are msgspec Structs (`control.api`) decoded straight from the request
bytes: one validation library for the wire and the API, error messages that
name the field (`$.tokens[3]`), and 32K-token bodies parsed in microseconds.
Errors are JSON `{"detail": ..., "event_id": ...}`: 400 for invalid JSON or a
bad choice, 422 for a body of the wrong shape, 401 without the API key, 404
for an unknown instance or event, 503 when workers do not answer in time.

With an API key every route requires it except /docs and /openapi.json (the
schema, the same for every deployment). Handlers never take the controller's
lock on the event loop: the monitor thread may hold it for a while (a 1M-key
snapshot), so lock-taking work runs in a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lmc_connector.control import api
from lmc_connector.control import messages as m
from lmc_connector.control.events import UnknownEventError, new_event_id
from lmc_connector.control.metrics import render
from lmc_connector.control.registry import ControlError, Instance, InvalidChoiceError, Worker
from lmc_connector.control.service import ControllerService

logger = logging.getLogger(__name__)

B = TypeVar("B", bound=msgspec.Struct)
_SCHEMA_TYPES: list[Any] = [
    getattr(api, name) for name in api.__all__ if isinstance(getattr(api, name), type)
]


class BodyError(ControlError):
    """The request body is not what the route expects; the message names the field."""


def _decode(data: bytes, kind: type[B]) -> B:
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as e:
        error = BodyError(f"invalid request body: {e}")
        error.status = 422
        raise error from None
    except msgspec.DecodeError as e:
        raise BodyError(f"request body is not valid JSON: {e}") from None


def _json(body: msgspec.Struct, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def _error(status: int, detail: str, event_id: str | None = None) -> Response:
    return _json(api.ErrorResponse(detail, event_id), status)


def _worker_info(service: ControllerService, worker: Worker, now: float) -> api.WorkerInfo:
    index = service.controller.index
    usage = {
        loc: {
            "chunks": index.count(worker.instance_id, worker.rank, loc),
            "used_bytes": worker.usage.get(loc, [0, 0, 0])[1],
            "capacity_bytes": worker.usage.get(loc, [0, 0, 0])[2],
        }
        for loc in worker.locations
    }
    return api.WorkerInfo(
        instance_id=worker.instance_id,
        worker_id=worker.rank,
        address=f"{worker.host}:{worker.port}",
        pid=worker.pid,
        model=worker.model,
        chunk_size=worker.chunk_size,
        locations=worker.locations,
        methods=worker.methods,
        last_heartbeat_age_s=round(now - worker.last_seen, 3),
        registered_age_s=round(now - worker.registered_at, 3),
        usage=usage,
    )


def _instance_info(service: ControllerService, inst: Instance, now: float) -> api.InstanceInfo:
    return api.InstanceInfo(
        instance_id=inst.instance_id,
        model=inst.model,
        world_size=inst.world_size,
        chunk_size=inst.chunk_size,
        locations=inst.locations,
        methods=inst.methods,
        indexed_chunks=service.controller.index.size(inst.instance_id),
        workers=[_worker_info(service, w, now) for _, w in sorted(inst.workers.items())],
    )


def create_app(service: ControllerService) -> FastAPI:
    """The FastAPI app serving `service`; the caller starts and closes the service."""
    bearer = HTTPBearer(auto_error=False, description="the controller's --api-key")

    def authorize(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
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
    )
    controller = service.controller

    def route(
        method: str,
        path: str,
        body_type: type[B] | None,
        response_type: Any,
        summary: str,
    ) -> Callable[[Callable[..., Awaitable[Any]]], None]:
        def register(handler: Callable[..., Awaitable[Any]]) -> None:
            async def endpoint(request: Request) -> Response:
                try:
                    if body_type is None:
                        result = await handler(**request.path_params)
                    else:
                        result = await handler(_decode(await request.body(), body_type))
                except ControlError as e:
                    return _error(e.status, str(e), e.event_id)
                except UnknownEventError as e:
                    return _error(404, f"unknown event_id '{e.args[0]}' (never issued, or expired)")
                if isinstance(result, Response):
                    return result
                return _json(result)

            extra: dict[str, Any] = {}
            if body_type is not None:
                extra["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(body_type)}},
                }
            responses: dict[int | str, dict[str, Any]] = {
                400: {"description": "bad request"},
                404: {"description": "unknown instance or event"},
                503: {"description": "workers did not answer in time"},
            }
            if response_type is not None:
                responses[200] = {"content": {"application/json": {"schema": _ref(response_type)}}}
            app.add_api_route(
                path,
                endpoint,
                methods=[method],
                summary=summary,
                responses=responses,
                openapi_extra=extra or None,
                response_class=Response,
            )

        return register

    async def _transform(kind: str, body: api.TransformRequest) -> api.ScheduledResponse:
        def check(inst: Instance) -> None:
            inst.check_method(body.method)
            inst.check_location(body.location)

        op = m.TransformOp(kind, body.method, body.location, body.tokens)  # type: ignore[arg-type]
        event = await service.run(kind, body.instance_id, op, check)
        return api.ScheduledResponse(event.event_id, event.num_tokens)

    @route("POST", "/compress", api.TransformRequest, api.ScheduledResponse, "Compress cached KV")
    async def compress(body: api.TransformRequest) -> api.ScheduledResponse:
        return await _transform("compress", body)

    @route("POST", "/decompress", api.TransformRequest, api.ScheduledResponse, "Decompress")
    async def decompress(body: api.TransformRequest) -> api.ScheduledResponse:
        return await _transform("decompress", body)

    @route("POST", "/lookup", api.LookupRequest, api.LookupResponse, "Where a prefix is cached")
    async def lookup(body: api.LookupRequest) -> api.LookupResponse:
        layout = await asyncio.to_thread(controller.lookup, body.tokens)
        return api.LookupResponse(new_event_id(), layout)

    def _check_location(location: str | None) -> Callable[[Instance], None]:
        def check(inst: Instance) -> None:
            if location is not None:
                inst.check_location(location)

        return check

    @route("POST", "/pin", api.PinRequest, api.ScheduledResponse, "Pin a cached prefix")
    async def pin(body: api.PinRequest) -> api.ScheduledResponse:
        op = m.PinOp(body.tokens, body.location)
        event = await service.run("pin", body.instance_id, op, _check_location(body.location))
        return api.ScheduledResponse(event.event_id, event.num_tokens)

    @route("POST", "/unpin", api.UnpinRequest, api.ScheduledResponse, "Unpin a cached prefix")
    async def unpin(body: api.UnpinRequest) -> api.ScheduledResponse:
        op = m.UnpinOp(body.tokens)  # body.location is ignored: see api.UnpinRequest
        event = await service.run("unpin", body.instance_id, op, _check_location(None))
        return api.ScheduledResponse(event.event_id, event.num_tokens)

    @route("POST", "/clear", api.ClearRequest, api.ClearResponse, "Clear unpinned chunks")
    async def clear(body: api.ClearRequest) -> api.ClearResponse:
        op = m.ClearOp(body.location)
        event = await service.run("clear", body.instance_id, op, _check_location(body.location))
        return api.ClearResponse(
            event.event_id,
            sum(p.removed for p in event.workers),
            sum(p.kept_pinned for p in event.workers),
        )

    @route("POST", "/move", api.MoveRequest, api.ScheduledResponse, "Move a prefix between tiers")
    async def move(body: api.MoveRequest) -> api.ScheduledResponse:
        def check(inst: Instance) -> None:
            inst.check_location(body.source)
            inst.check_location(body.destination)
            if body.source == body.destination:
                others = [loc for loc in inst.locations if loc != body.source]
                raise InvalidChoiceError(
                    "destination (must differ from source)", body.destination, others
                )

        op = m.MoveOp(body.source, body.destination, body.tokens)
        event = await service.run("move", body.instance_id, op, check)
        return api.ScheduledResponse(event.event_id, event.num_tokens)

    @route("POST", "/check_finish", api.CheckFinishRequest, api.Event, "An event's status")
    async def check_finish(body: api.CheckFinishRequest) -> Response:
        return await asyncio.to_thread(_event_json, body.event_id)

    @route("GET", "/events/{event_id}", None, api.Event, "An event's status")
    async def get_event(event_id: str) -> Response:
        return await asyncio.to_thread(_event_json, event_id)

    def _event_json(event_id: str) -> Response:
        with controller.lock:
            return _json(controller.events.get(event_id))

    async def _health(body: api.HealthRequest) -> api.HealthResponse:
        return await asyncio.to_thread(_health_sync, body)

    def _health_sync(body: api.HealthRequest) -> api.HealthResponse:
        with controller.lock:
            codes: dict[int, int] = {}
            if body.instance_id is not None:
                inst = controller.instance(body.instance_id)
                codes = {r: int(r not in inst.workers) for r in range(inst.world_size)}
            return api.HealthResponse(
                event_id=new_event_id(),
                status="degraded" if any(codes.values()) else "ok",
                instances=len(controller.instances),
                workers=sum(len(i.workers) for i in controller.instances.values()),
                indexed_chunks=controller.index.size(),
                error_codes=codes,
            )

    @route("POST", "/health", api.HealthRequest, api.HealthResponse, "Controller/instance health")
    async def health(body: api.HealthRequest) -> api.HealthResponse:
        return await _health(body)

    @route("GET", "/health", None, api.HealthResponse, "Controller health")
    async def health_get() -> api.HealthResponse:
        return await _health(api.HealthRequest())

    @route("POST", "/query_worker_info", api.WorkerInfoRequest, api.WorkerInfoResponse, "Workers")
    async def query_worker_info(body: api.WorkerInfoRequest) -> api.WorkerInfoResponse:
        return await asyncio.to_thread(_worker_infos, body)

    def _worker_infos(body: api.WorkerInfoRequest) -> api.WorkerInfoResponse:
        now = time.monotonic()
        with controller.lock:
            inst = controller.instance(body.instance_id)
            ids = sorted(inst.workers) if body.worker_ids is None else body.worker_ids
            unknown = [i for i in ids if i not in inst.workers]
            if unknown:
                raise InvalidChoiceError(
                    "worker_id", str(unknown[0]), [str(r) for r in sorted(inst.workers)]
                )
            infos = [_worker_info(service, inst.workers[i], now) for i in ids]
        return api.WorkerInfoResponse(new_event_id(), infos)

    @route("GET", "/instances", None, api.InstancesResponse, "Registered instances")
    async def instances() -> api.InstancesResponse:
        return await asyncio.to_thread(_instances)

    def _instances() -> api.InstancesResponse:
        now = time.monotonic()
        with controller.lock:
            items = [_instance_info(service, i, now) for i in controller.instances.values()]
        return api.InstancesResponse(items)

    @route("GET", "/metrics", None, None, "Prometheus metrics")
    async def metrics() -> Response:
        text = await asyncio.to_thread(render, controller, service.latency)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    _install_openapi(app)
    return app


def _ref(kind: Any) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{kind.__name__}"}


def _install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version="1",
                description=app.description,
                routes=app.routes,
            )
            _, components = msgspec.json.schema_components(
                _SCHEMA_TYPES, ref_template="#/components/schemas/{name}"
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
