"""The FastAPI application: `create_app(settings)` builds one instance; the lifespan loads the
bundle, the store, the engine and the tokenizer, and shuts them down in order."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.bundle import Bundle, BundleError
from service.batcher import MicroBatcher, QueueFull, ShuttingDown
from service.deps import ServiceState
from service.docs import add_offline_docs, complete_openapi
from service.engines.base import DecodeEngine, DecodeRequest, Recommendation
from service.engines.subprocess_engine import DecodeWorkerError
from service.keys import RateLimiter
from service.metrics import Metrics, MetricsMiddleware
from service.routes import ROUTERS
from service.serving import (
    CatalogueFull,
    Conflict,
    InvalidRequest,
    RecommendDefaults,
    ServingRecommend,
    ServingTokenize,
    Unavailable,
)
from service.settings import Settings, usable_cores
from service.store import CatalogueStore, LiveCatalogue

log = logging.getLogger(__name__)


def model_version(bundle: Bundle) -> str:
    """`<git commit, 12 chars>@<created_at>` of the bundle's manifest."""
    m = bundle.manifest
    return f"{(m.git_commit or 'unknown')[:12]}@{m.created_at}"


def create_app(settings: Settings | None = None) -> FastAPI:
    """One app instance; `settings=None` reads `LETTERREC_*` from the environment at start-up."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings or Settings()
        state = await _start(app.state.settings, metrics)
        app.state.letterrec = state
        try:
            yield
        finally:
            await _stop(state)

    app = FastAPI(
        title="letterrec",
        summary="LETTER generative recommendation: next items by trie-constrained beam search",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served by add_offline_docs, without a CDN
        redoc_url=None,  # ReDoc has no offline bundle on PyPI
    )
    add_offline_docs(app)
    app.state.metrics = metrics
    app.state.settings = settings
    for router in ROUTERS:
        app.include_router(router)
    complete_openapi(app)
    _add_error_handlers(app)
    app.add_middleware(BodySizeLimit, limit=lambda: _body_limit(app))
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _body_limit(app: FastAPI) -> int:
    s = app.state.settings
    return s.max_body_bytes if s is not None else Settings.model_fields["max_body_bytes"].default


async def _start(settings: Settings, metrics: Metrics) -> ServiceState:
    logging.getLogger("service").setLevel(settings.log_level.upper())
    if settings.bundle is None:
        raise RuntimeError("no bundle given: set LETTERREC_BUNDLE or pass --bundle PATH")
    try:
        bundle = await asyncio.to_thread(Bundle.load, settings.bundle)
    except BundleError as e:
        raise RuntimeError(f"cannot serve: {e}") from e
    keys = settings.key_ring()
    if keys.placeholders:
        log.warning(
            "the API keys hold %d public development placeholder key(s) (dev-insecure-...):"
            " they are refused, so write routes need a real key",
            keys.placeholders,
        )
    if not keys.values():
        log.warning(
            "no API key configured (LETTERREC_API_KEYS or LETTERREC_API_KEYS_FILE): /tokenize "
            "refuses every call (401) until one is%s",
            " (the key file is re-read without a restart)" if settings.api_keys_file else "",
        )
    store = await _make_store(settings, bundle, metrics)
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)  # process-wide, decode threads included
    engine = await asyncio.to_thread(_make_engine, settings, bundle)
    tokenizer = await asyncio.to_thread(_load_tokenizer, settings, bundle.tokenizer_dir)
    batcher: MicroBatcher[DecodeRequest, list[Recommendation]] = MicroBatcher(
        _run_batch(engine, store.live, settings.beam_width),
        max_batch=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000.0,
        queue_size=settings.queue_size,
        metrics=metrics,
        engine_name=settings.engine,
        parallel=getattr(engine, "workers", 1),
    )
    version = model_version(bundle)
    state = ServiceState(
        settings=settings,
        metrics=metrics,
        store=store,
        engine=engine,
        batcher=batcher,
        recommend=ServingRecommend(
            store,
            bundle.vocab,
            batcher,
            version,
            settings.request_timeout_s,
            RecommendDefaults.from_manifest(bundle.manifest.recommend),
        ),
        tokenize=ServingTokenize(
            store,
            tokenizer,
            metrics,
            max_waiting=settings.max_waiting_writes,
            wait_timeout_s=settings.request_timeout_s,
        ),
        model_version=version,
        keys=keys,
        limiter=RateLimiter(settings.write_rate_per_s, settings.write_burst),
        info={
            "bundle": str(bundle.root),
            "device": settings.resolved_device(),
            "dtype": settings.dtype,
            "decode_workers": settings.resolved_decode_workers(),
            "torch_threads": getattr(engine, "threads", settings.torch_threads),
        },
    )
    await store.start()
    await asyncio.to_thread(_warmup, engine, store.live)
    state.engine_warm = True
    # Everything loaded so far lives as long as the process: move it out of the cyclic
    # collector's reach, so that a full collection under load does not walk the model's,
    # transformers' and the catalogue's objects (the usual pause behind a server's p99).
    gc.collect()
    gc.freeze()
    batcher.start()
    _bind_gauges(metrics, state)
    log.info(
        "serving %s (%d items, engine %s on %s, store %s)",
        bundle.root,
        store.live.n_active,
        settings.engine,
        state.info["device"],
        store.kind,
    )
    return state


async def _stop(state: ServiceState) -> None:
    """Graceful: stop accepting, finish queued requests, then release engine and store."""
    state.accepting = False
    await state.batcher.close(state.settings.shutdown_timeout_s)
    await state.store.close()
    await asyncio.to_thread(state.engine.close)
    gc.unfreeze()  # what _start froze can be collected again (tests start many apps)
    log.info("shut down cleanly")


async def _make_store(settings: Settings, bundle: Bundle, metrics: Metrics) -> CatalogueStore:
    n = bundle.vocab.codebook_size
    if settings.redis_url is None:
        live = await asyncio.to_thread(LiveCatalogue.from_bundle, bundle.catalogue, n)
        return CatalogueStore(live)
    from service.store_redis import RedisStore, bundle_fingerprint

    return await RedisStore.create(
        bundle.catalogue,
        n,
        url=settings.redis_url.get_secret_value(),
        namespace=settings.redis_namespace,
        fingerprint=bundle_fingerprint(bundle.catalogue, bundle.manifest.created_at),
        metrics=metrics,
        timeout_s=settings.redis_timeout_s,
        sync_interval_s=settings.sync_interval_s,
    )


def _make_engine(settings: Settings, bundle: Bundle) -> DecodeEngine:
    from service.engines import load_engine_class

    if not bundle.has_lm():
        raise RuntimeError(f"{bundle.root}: the bundle has no recommender (lm/config.json)")
    # Engines share one constructor signature (model_dir, vocab, device, dtype, beam, batch).
    kwargs: dict[str, Any] = {
        "model_dir": bundle.lm_dir,
        "vocab": bundle.vocab,
        "device": settings.resolved_device(),
        "dtype": settings.dtype,
        "beam_width": settings.beam_width,
        "max_batch": settings.max_batch_size,
    }
    workers = settings.resolved_decode_workers()
    if workers:
        from service.engines.subprocess_engine import DecodePool, SubprocessEngine

        threads = settings.torch_threads
        if workers > 1:
            if threads == 0:  # an equal share of the cores each
                threads = max(1, usable_cores() // workers)
            return DecodePool(
                settings.engine,
                workers,
                threads=threads,
                batch_timeout_s=settings.decode_timeout_s,
                **kwargs,
            )
        return SubprocessEngine(
            settings.engine,
            threads=threads,
            batch_timeout_s=settings.decode_timeout_s,
            **kwargs,
        )
    engine_cls: Callable[..., DecodeEngine] = load_engine_class(settings.engine)
    return engine_cls(**kwargs)


def _load_tokenizer(settings: Settings, path: Path):  # noqa: ANN202 - ItemTokenizer | None
    if not (path / "config.json").exists():
        log.warning("%s: no item tokenizer in the bundle; /tokenize answers 503", path)
        return None
    from models.item_tokenizer import ItemTokenizer

    tokenizer = ItemTokenizer.load(path, device=settings.resolved_tokenizer_device())
    tokenizer.encode([{"item_id": "warmup", "title": "warm-up"}])  # loads the text encoder now
    return tokenizer


def _run_batch(
    engine: DecodeEngine, live: LiveCatalogue, beam_width: int
) -> Callable[[Sequence[DecodeRequest]], list[list[Recommendation]]]:
    """Decode a batch under the catalogue lock, one engine call per effective beam width.

    Engines search with width max(beam_width, k) for a whole call; grouping by that width keeps
    a request's answer independent of which other requests happened to share its batch.
    """

    def run(requests: Sequence[DecodeRequest]) -> list[list[Recommendation]]:
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(max(beam_width, r.k), []).append(i)
        out: list[list[Recommendation]] = [[] for _ in requests]
        with live.lock.read():  # no trie update while the engine reads it
            for members in groups.values():
                results = engine.recommend([requests[i] for i in members], live.trie)
                for i, recs in zip(members, results, strict=True):
                    out[i] = recs
        return out

    return run


def _warmup(engine: DecodeEngine, live: LiveCatalogue) -> None:
    with live.lock.read():
        engine.warmup(live.trie)


def _bind_gauges(metrics: Metrics, state: ServiceState) -> None:
    live = state.store.live
    metrics.catalogue_items.set_function(lambda: live.n_active)
    metrics.trie_version.set_function(lambda: live.trie.version)
    metrics.ready.set_function(lambda: 1.0 if state.ready() else 0.0)
    metrics.store_up.set_function(lambda: 1.0 if state.store.healthy else 0.0)


class SafeJSONResponse(JSONResponse):
    """ASCII-escaped JSON: echoing a lone surrogate from the request cannot fail to encode."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return SafeJSONResponse(
            {"detail": jsonable_encoder(exc.errors())}, status.HTTP_422_UNPROCESSABLE_CONTENT
        )

    def unavailable(message: str, retry_after: int = 1) -> JSONResponse:
        return JSONResponse(
            {"detail": message},
            status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": str(retry_after)},
        )

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return unavailable(str(exc), exc.retry_after_s)

    @app.exception_handler(ShuttingDown)
    async def _shutting_down(request: Request, exc: ShuttingDown) -> JSONResponse:
        return unavailable(str(exc))

    @app.exception_handler(Unavailable)
    async def _unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        return unavailable(str(exc))

    @app.exception_handler(TimeoutError)
    async def _timeout(request: Request, exc: TimeoutError) -> JSONResponse:
        return JSONResponse(
            {"detail": "the request was not decoded within request_timeout_s; retry later"},
            status.HTTP_504_GATEWAY_TIMEOUT,
        )

    @app.exception_handler(CatalogueFull)
    async def _full(request: Request, exc: CatalogueFull) -> JSONResponse:
        return JSONResponse(
            {"detail": f"catalogue full: {exc}"}, status.HTTP_507_INSUFFICIENT_STORAGE
        )

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status.HTTP_409_CONFLICT)

    @app.exception_handler(DecodeWorkerError)
    async def _worker_failed(request: Request, exc: DecodeWorkerError) -> JSONResponse:
        # The decode child died or hung on this batch; it is restarted for the next one.
        return unavailable(f"decoding failed, retry: {exc}")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback under an id the caller can quote; the body holds neither
        # the traceback nor the exception's text (paths, internals).
        incident = uuid.uuid4().hex[:12]
        log.error(
            "internal error %s on %s %s",
            incident,
            request.method,
            request.url.path,
            exc_info=exc,
        )
        return JSONResponse(
            {"detail": f"internal error; it was logged as {incident}"},
            status.HTTP_500_INTERNAL_SERVER_ERROR,
        )

    @app.exception_handler(InvalidRequest)
    async def _contradiction(request: Request, exc: InvalidRequest) -> JSONResponse:
        # The same shape as a validation error, so clients parse one format.
        detail = [{"loc": ["body", *exc.loc.split(".")], "msg": str(exc), "type": "value_error"}]
        return JSONResponse({"detail": detail}, status.HTTP_422_UNPROCESSABLE_CONTENT)


class BodySizeLimit:
    """Pure ASGI middleware: 413 for bodies over the limit (declared or streamed)."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = JSONResponse(
                {"detail": f"request body larger than {limit} bytes (max_body_bytes)"},
                413,
            )
            await response(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(
                        413,
                        f"request body larger than {limit} bytes (max_body_bytes)",
                    )
            return message

        await self.app(scope, limited_receive, send)
