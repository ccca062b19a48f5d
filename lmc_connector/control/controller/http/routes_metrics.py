"""Prometheus metrics of the controller."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from lmc_connector.control.controller.http.endpoint import service_of
from lmc_connector.control.controller.metrics import render
from lmc_connector.control.controller.service import ControllerService

router = APIRouter()


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(service: ControllerService = Depends(service_of)) -> Response:  # noqa: B008
    text = await asyncio.to_thread(render, service.state, service.latency)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")
