"""Routes that read the controller's state: lookups, operations, health, workers, instances.

Handlers never take the state's lock on the event loop: the monitor thread
may hold it for a while (a 1M-key snapshot), so that work runs in a thread.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from lmc_connector.control.controller.errors import (
    BodyError,
    InvalidChoiceError,
    UnknownAddressError,
)
from lmc_connector.control.controller.http import bodies
from lmc_connector.control.controller.http.endpoint import body, doc, json_response, service_of
from lmc_connector.control.controller.instances import Instance, Worker
from lmc_connector.control.controller.operations import new_event_id
from lmc_connector.control.controller.service import ControllerService
from lmc_connector.control.controller.state import ControllerState
from lmc_connector.control.wire.monitor import TierReport, WorkerSpec
from lmc_connector.control.wire.types import key_scope

router = APIRouter()
Service = Depends(service_of)


def worker_info(
    state: ControllerState, worker: Worker, now: float, wall: float
) -> bodies.WorkerInfo:
    """The API's view of one worker (call with the state's lock held); `now` is
    `time.monotonic()` and `wall` is `time.time()`, read together."""
    spec = worker.spec
    usage = {
        loc: bodies.TierUsage(
            chunks=state.index.count(spec.instance_id, spec.rank, loc),
            used_bytes=worker.usage.get(loc, TierReport(0, 0, 0)).used_bytes,
            capacity_bytes=worker.usage.get(loc, TierReport(0, 0, 0)).capacity_bytes,
        )
        for loc in spec.locations
    }
    fields = {name: getattr(spec, name) for name in WorkerSpec.__struct_fields__}
    return bodies.WorkerInfo(
        **fields,
        worker_id=spec.rank,
        address=f"{spec.host}:{spec.port}",
        last_heartbeat_age_s=round(now - worker.last_seen, 3),
        registered_age_s=round(now - worker.registered_at, 3),
        usage=usage,
        ip=spec.host,
        peer_init_url=spec.peer_address.removeprefix("tcp://") if spec.peer_address else None,
        registration_time=round(worker.registered_wall, 3),
        last_heartbeat_time=round(wall - (now - worker.last_seen), 3),
        key_count=sum(u.chunks for u in usage.values()),
    )


def instance_info(
    state: ControllerState, inst: Instance, now: float, wall: float
) -> bodies.InstanceInfo:
    return bodies.InstanceInfo(
        instance_id=inst.instance_id,
        model=inst.model,
        world_size=inst.world_size,
        chunk_size=inst.chunk_size,
        locations=inst.locations,
        methods=inst.methods,
        indexed_chunks=state.index.size(inst.instance_id),
        workers=[worker_info(state, w, now, wall) for _, w in sorted(inst.workers.items())],
    )


@router.post(
    "/lookup",
    summary="Where a prefix is cached",
    **doc(bodies.LookupRequest, bodies.LookupResponse),
)
async def lookup(
    req: bodies.LookupRequest = Depends(body(bodies.LookupRequest)),  # noqa: B008
    service: ControllerService = Service,
) -> Response:
    scope = key_scope(req.scope())
    layout = await asyncio.to_thread(service.state.lookup, req.tokens, scope)
    return json_response(bodies.LookupResponse(new_event_id(), layout))


def _operation(state: ControllerState, event_id: str) -> Response:
    with state.lock:
        return json_response(state.operations.get(event_id))


@router.post(
    "/check_finish",
    summary="An operation's status",
    **doc(bodies.CheckFinishRequest, bodies.Operation),
)
async def check_finish(
    req: bodies.CheckFinishRequest = Depends(body(bodies.CheckFinishRequest)),  # noqa: B008
    service: ControllerService = Service,
) -> Response:
    return await asyncio.to_thread(_operation, service.state, req.event_id)


@router.get("/events/{event_id}", summary="An operation's status", **doc(None, bodies.Operation))
async def get_operation(event_id: str, service: ControllerService = Service) -> Response:
    return await asyncio.to_thread(_operation, service.state, event_id)


def _health(service: ControllerService, req: bodies.HealthRequest) -> Response:
    state = service.state
    problems = [f"internal thread '{name}' stopped" for name in service.dead_threads()]
    with state.lock:
        codes: dict[int, int] = {}
        if req.instance_id is not None:
            inst = state.instance(req.instance_id)
            codes = {r: int(r not in inst.workers) for r in range(inst.world_size)}
            if any(codes.values()):
                problems.append(f"missing ranks {[r for r, c in codes.items() if c][:16]}")
        return json_response(
            bodies.HealthResponse(
                event_id=new_event_id(),
                status="degraded" if problems else "ok",
                instances=len(state.instances),
                workers=sum(len(i.workers) for i in state.instances.values()),
                indexed_chunks=state.index.size(),
                error_codes=codes,
                problems=problems,
            )
        )


@router.post(
    "/health",
    summary="Controller or instance health",
    **doc(bodies.HealthRequest, bodies.HealthResponse),
)
async def health(
    req: bodies.HealthRequest = Depends(body(bodies.HealthRequest)),  # noqa: B008
    service: ControllerService = Service,
) -> Response:
    return await asyncio.to_thread(_health, service, req)


@router.get("/health", summary="Controller health", **doc(None, bodies.HealthResponse))
async def health_get(service: ControllerService = Service) -> Response:
    return await asyncio.to_thread(_health, service, bodies.HealthRequest())


def _worker_infos(state: ControllerState, req: bodies.WorkerInfoRequest) -> Response:
    now, wall = time.monotonic(), time.time()
    with state.lock:
        inst = state.instance(req.instance_id)
        ids = sorted(inst.workers) if req.worker_ids is None else req.worker_ids
        unknown = next((i for i in ids if i not in inst.workers), None)
        if unknown is not None:
            valid = [str(r) for r in sorted(inst.workers)]
            raise InvalidChoiceError("worker_id", str(unknown), valid)
        infos = [worker_info(state, inst.workers[i], now, wall) for i in ids]
    return json_response(bodies.WorkerInfoResponse(new_event_id(), infos))


@router.post(
    "/query_worker_info",
    summary="Workers of an instance",
    **doc(bodies.WorkerInfoRequest, bodies.WorkerInfoResponse),
)
async def query_worker_info(
    req: bodies.WorkerInfoRequest = Depends(body(bodies.WorkerInfoRequest)),  # noqa: B008
    service: ControllerService = Service,
) -> Response:
    return await asyncio.to_thread(_worker_infos, service.state, req)


def _instances(state: ControllerState) -> Response:
    now, wall = time.monotonic(), time.time()
    with state.lock:
        items = [instance_info(state, i, now, wall) for i in state.instances.values()]
    return json_response(bodies.InstancesResponse(items))


@router.get("/instances", summary="Registered instances", **doc(None, bodies.InstancesResponse))
async def instances(service: ControllerService = Service) -> Response:
    return await asyncio.to_thread(_instances, service.state)


def _workers(state: ControllerState, instance_id: str | None, worker_id: int | None) -> Response:
    now, wall = time.monotonic(), time.time()
    with state.lock:
        if instance_id is None:
            if worker_id is not None:
                raise BodyError("worker_id needs instance_id (worker ids repeat per instance)")
            found = [(i, w) for i in state.instances.values() for w in i.workers.values()]
        else:
            inst = state.instance(instance_id)
            found = [(inst, w) for w in inst.workers.values()]
            if worker_id is not None:
                if worker_id not in inst.workers:
                    valid = [str(r) for r in sorted(inst.workers)]
                    raise InvalidChoiceError("worker_id", str(worker_id), valid)
                return json_response(worker_info(state, inst.workers[worker_id], now, wall))
        found.sort(key=lambda pair: (pair[0].instance_id, pair[1].rank))
        infos = [worker_info(state, w, now, wall) for _, w in found]
    return json_response(bodies.WorkerListResponse(infos, len(infos)))


@router.get(
    "/controller/workers",
    summary="Workers of every instance, of one, or one worker (LMCache's route)",
    **doc(None, bodies.WorkerListResponse),
)
async def workers(
    instance_id: str | None = None,
    worker_id: int | None = None,
    service: ControllerService = Service,
) -> Response:
    """Without parameters every worker; with `instance_id` that instance's; with both, the
    one worker itself (not a list), as LMCache answers."""
    return await asyncio.to_thread(_workers, service.state, instance_id, worker_id)


def _query_instance(state: ControllerState, req: bodies.QueryInstanceRequest) -> Response:
    with state.lock:
        matches = sorted(
            i.instance_id
            for i in state.instances.values()
            if any(w.spec.host == req.ip for w in i.workers.values())
        )
        if not matches:
            known = sorted(
                {w.spec.host for i in state.instances.values() for w in i.workers.values()}
            )
            raise UnknownAddressError(req.ip, known)
    event_id = req.event_id or new_event_id()
    return json_response(bodies.QueryInstanceResponse(event_id, matches[0], matches))


@router.post(
    "/query_instance",
    summary="The instance with a worker at an IP address (LMCache's route)",
    **doc(bodies.QueryInstanceRequest, bodies.QueryInstanceResponse),
)
async def query_instance(
    req: bodies.QueryInstanceRequest = Depends(body(bodies.QueryInstanceRequest)),  # noqa: B008
    service: ControllerService = Service,
) -> Response:
    return await asyncio.to_thread(_query_instance, service.state, req)
