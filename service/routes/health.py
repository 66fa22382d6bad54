"""GET /healthz, /readyz, /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse, PlainTextResponse

from service.schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> Health:
    """The process is alive (no dependency is checked)."""
    return Health()


@router.get("/readyz", responses={503: {"model": Readiness, "description": "Not ready"}})
async def readyz(request: Request) -> Response:
    """This replica can answer /recommend: bundle loaded, engine warmed, not shutting down.
    A shared store (Redis) that is unreachable is reported in `checks` and `degraded` but does
    not fail readiness: recommendations keep working from the replica's own copy."""
    state = getattr(request.app.state, "letterrec", None)
    if state is None:
        body = Readiness(ready=False, checks={"bundle_loaded": False})
    else:
        live = state.store.live
        body = Readiness(
            ready=state.ready(),
            checks=state.checks(),
            degraded=state.degraded(),
            model_version=state.model_version,
            engine=state.settings.engine,
            device=state.info.get("device"),
            dtype=state.info.get("dtype"),
            decode_workers=state.info.get("decode_workers"),
            torch_threads=state.info.get("torch_threads"),
            catalogue_items=live.n_active,
            catalogue_version=state.store.version,
        )
    code = status.HTTP_200_OK if body.ready else status.HTTP_503_SERVICE_UNAVAILABLE
    return JSONResponse(body.model_dump(), status_code=code)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={
        200: {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this app's registry (`letterrec_*` metrics)."""
    data, content_type = request.app.state.metrics.render()
    return Response(data, media_type=content_type)
