"""Routes that change cached KV on an instance's workers: each runs as a tracked operation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from lmc_connector.control.controller.errors import BodyError, InvalidChoiceError
from lmc_connector.control.controller.http import bodies
from lmc_connector.control.controller.http.endpoint import body, doc, json_response, service_of
from lmc_connector.control.controller.instances import Instance
from lmc_connector.control.controller.operations import Operation
from lmc_connector.control.controller.peers import pull_sources
from lmc_connector.control.controller.service import ControllerService
from lmc_connector.control.wire import commands as cmd
from lmc_connector.operations import TransformKind

router = APIRouter()
Service = Depends(service_of)


async def _transform(
    service: ControllerService, kind: TransformKind, req: bodies.TransformRequest
) -> Response:
    def check(inst: Instance) -> None:
        inst.check_method(req.method)
        inst.check_location(req.location)
        if kind == "compress":
            inst.check_calibrated(req.method)

    every_chunk = req.tokens is None
    op = cmd.TransformOp(
        kind, req.method, req.location, req.tokens or [], every_chunk, scope=req.scope()
    )
    operation = await service.run(kind, req.instance_id, op, check)
    return _scheduled(operation)


def _scheduled(operation: Operation) -> Response:
    return json_response(bodies.ScheduledResponse(operation.event_id, operation.num_tokens))


def _location(location: str | None) -> Callable[[Instance], None]:
    def check(inst: Instance) -> None:
        if location is not None:
            inst.check_location(location)

    return check


@router.post(
    "/compress",
    summary="Compress cached KV",
    **doc(bodies.TransformRequest, bodies.ScheduledResponse),
)
async def compress(
    req: bodies.TransformRequest = Depends(body(bodies.TransformRequest)),  # noqa: B008
    service: ControllerService = Service,
) -> Response:
    return await _transform(service, "compress", req)


@router.post(
    "/decompress",
    summary="Decompress cached KV",
    **doc(bodies.TransformRequest, bodies.ScheduledResponse),
)
async def decompress(
    req: bodies.TransformRequest = Depends(body(bodies.TransformRequest)),  # noqa: B008
    service: ControllerService = Service,
) -> Response:
    return await _transform(service, "decompress", req)


@router.post(
    "/calibrate",
    summary="Calibrate a codec on cached KV",
    **doc(bodies.CalibrateRequest, bodies.ScheduledResponse),
)
async def calibrate(
    req: bodies.CalibrateRequest = Depends(body(bodies.CalibrateRequest)),  # noqa: B008
    service: ControllerService = Service,
) -> Response:
    """Each worker fits a calibration of `method` on chunks it holds, in the background
    (tracked like compress; `num_tokens`: the sample tokens), keeps it beside its tiers and
    compresses with it from then on."""

    def check(inst: Instance) -> None:
        inst.check_method(req.method)
        inst.check_calibrates(req.method)

    op = cmd.CalibrateOp(req.method)
    operation = await service.run("calibrate", req.instance_id, op, check, background=True)
    return _scheduled(operation)


@router.post(
    "/pin", summary="Pin a cached prefix", **doc(bodies.PinRequest, bodies.ScheduledResponse)
)
async def pin(
    req: bodies.PinRequest = Depends(body(bodies.PinRequest)),  # noqa: B008
    service: ControllerService = Service,
) -> Response:
    op = cmd.PinOp(req.tokens, req.location, scope=req.scope())
    operation = await service.run("pin", req.instance_id, op, _location(req.location))
    return _scheduled(operation)


@router.post(
    "/unpin",
    summary="Unpin a cached prefix",
    **doc(bodies.UnpinRequest, bodies.ScheduledResponse),
)
async def unpin(
    req: bodies.UnpinRequest = Depends(body(bodies.UnpinRequest)),  # noqa: B008
    service: ControllerService = Service,
) -> Response:
    # req.location is ignored: see bodies.UnpinRequest
    op = cmd.UnpinOp(req.tokens, scope=req.scope())
    operation = await service.run("unpin", req.instance_id, op, _location(None))
    return _scheduled(operation)


@router.post(
    "/clear", summary="Clear unpinned chunks", **doc(bodies.ClearRequest, bodies.ClearResponse)
)
async def clear(
    req: bodies.ClearRequest = Depends(body(bodies.ClearRequest)),  # noqa: B008
    service: ControllerService = Service,
) -> Response:
    op = cmd.ClearOp(req.location)
    operation = await service.run("clear", req.instance_id, op, _location(req.location))
    return json_response(
        bodies.ClearResponse(
            event_id=operation.event_id,
            num_tokens=operation.num_tokens,
            removed=sum(p.removed for p in operation.workers),
            kept_pinned=sum(p.kept for p in operation.workers),
        )
    )


@router.post(
    "/move",
    summary="Move a cached prefix between locations or instances",
    **doc(bodies.MoveRequest, bodies.ScheduledResponse),
)
async def move(
    req: bodies.MoveRequest = Depends(body(bodies.MoveRequest)),  # noqa: B008
    service: ControllerService = Service,
) -> Response:
    within = (req.instance_id, req.source, req.destination)
    across = (req.old_position, req.new_position)
    if all(v is not None for v in across) and all(v is None for v in within):
        assert req.old_position is not None and req.new_position is not None
        if req.old_position[0] != req.new_position[0]:
            return await _move_across(service, req, req.old_position, req.new_position)
        within = (req.old_position[0], req.old_position[1], req.new_position[1])
        if _copy(req):
            raise BodyError("should_copy within one instance is not supported: use two instances")
    elif any(v is not None for v in across) or any(v is None for v in within):
        raise BodyError(
            "give either instance_id, source and destination (within an instance) or "
            "old_position and new_position as [instance_id, location] (across instances)"
        )
    instance_id, source, destination = within
    assert instance_id is not None and source is not None and destination is not None

    def check(inst: Instance) -> None:
        inst.check_location(source)
        inst.check_location(destination)
        if source == destination:
            others = [loc for loc in inst.locations if loc != source]
            raise InvalidChoiceError("destination (must differ from source)", destination, others)

    op = cmd.MoveOp(source, destination, req.tokens, scope=req.scope())
    operation = await service.run("move", instance_id, op, check)
    return _scheduled(operation)


def _copy(req: bodies.MoveRequest) -> bool:
    return bool(req.should_copy if req.should_copy is not None else req.copy)


async def _move_across(
    service: ControllerService,
    req: bodies.MoveRequest,
    old: bodies.Position,
    new: bodies.Position,
) -> Response:
    (source_id, source_location), (destination_id, location) = old, new
    scope = req.scope()
    sources, num_tokens = await asyncio.to_thread(
        pull_sources, service.state, source_id, source_location, destination_id, req.tokens, scope
    )
    op = cmd.PullOp(
        sources, source_location, location, req.tokens, not _copy(req), num_tokens, scope
    )
    operation = await service.run("move", destination_id, op, _location(location), background=True)
    return _scheduled(operation)
