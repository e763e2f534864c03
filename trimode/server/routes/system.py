"""/health, /metrics and /version: what monitoring asks of the server."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest

from trimode import __version__
from trimode.server.service import Service


def router(service: Service) -> APIRouter:
    routes = APIRouter()
    engine = service.engine

    @routes.get("/health")
    async def health() -> JSONResponse:
        """200 only while the engine thread is alive and coming round its loop: a step running
        longer than `stall_s`, a dead thread, or a dead tensor-parallel worker (no forward can run
        again) answers 503 with the reason."""
        age = engine.heartbeat_age
        status = "ok"
        failure = engine.worker_failure
        if not engine.is_alive:
            status = "engine_dead"
        elif failure is not None:
            status = "worker_dead"
        elif age > service.stall_s:
            status = "engine_stalled"
        elif engine.is_draining:
            status = "shutting_down"
        doc = {
            "status": status,
            "engine_alive": engine.is_alive,
            "heartbeat_age_s": round(age, 3),
            "running": engine.status.running,
            "waiting": engine.status.waiting,
        }
        if failure is not None:
            doc["worker_error"] = failure
        return JSONResponse(doc, status_code=200 if status == "ok" else 503)

    @routes.get("/metrics")
    async def metrics() -> PlainTextResponse:
        engine.metrics.heartbeat.set(engine.heartbeat_age)
        return PlainTextResponse(
            generate_latest(engine.metrics.registry).decode(), media_type="text/plain; version=0.0.4"
        )

    @routes.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    return routes
