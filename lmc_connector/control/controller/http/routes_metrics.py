"""Prometheus metrics of the controller (`metrics.py`): text, or OpenMetrics on request."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from lmc_connector.control.controller.http.endpoint import service_of
from lmc_connector.control.controller.metrics import exposition
from lmc_connector.control.controller.service import ControllerService

router = APIRouter()


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request, service: ControllerService = Depends(service_of)) -> Response:  # noqa: B008
    accept = request.headers.get("accept", "")
    body, content_type = await asyncio.to_thread(exposition, service.metrics, accept)
    return Response(body, headers={"Content-Type": content_type})
