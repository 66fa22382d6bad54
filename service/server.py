"""Start the service under uvicorn: `run(bundle, host, port, **overrides)`.

`letterrec serve --bundle PATH` calls `run`; `python -m service --bundle PATH` does the same.
Overrides are Settings fields (e.g. `engine="vllm"`, `redis_url="redis://..."`); anything not
given comes from `LETTERREC_*` environment variables, then the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import Receive, Scope, Send

from models.bundle import Bundle
from service.app import create_app
from service.settings import Settings

log = logging.getLogger(__name__)


def build_settings(bundle: str | Path, **overrides: Any) -> Settings:
    """Settings from the environment, with `bundle` and `overrides` on top (validated)."""
    unknown = sorted(set(overrides) - set(Settings.model_fields))
    if unknown:
        raise ValueError(
            f"unknown setting(s) {unknown}; valid ones: {sorted(Settings.model_fields)}"
        )
    return Settings(bundle=Path(bundle), **overrides)  # init values win over the environment


def run(bundle: str | Path, host: str = "127.0.0.1", port: int = 8000, **overrides: Any) -> None:
    """Serve `bundle` on host:port until SIGINT/SIGTERM (graceful: queued requests finish)."""
    settings = build_settings(bundle, **overrides)
    Bundle.load(bundle)  # fail fast (BundleError, a ValueError) before uvicorn starts
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    server = uvicorn.Server(uvicorn_config(settings, host, port))
    server.run()
    if not server.started:
        raise SystemExit("letterrec: the service failed to start (see the log above)")


OVERLOADED_BODY = json.dumps(
    {
        "detail": "the server has max_connections (LETTERREC_MAX_CONNECTIONS) open connections "
        "or requests; retry after the Retry-After seconds"
    }
).encode()


async def overloaded(scope: Scope, receive: Receive, send: Send) -> None:
    """What uvicorn answers beyond limit_concurrency: the service's JSON error shape with
    Retry-After, instead of uvicorn's plain-text 'Service Unavailable'."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(OVERLOADED_BODY)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": OVERLOADED_BODY, "more_body": False})


def _http_protocol() -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol with its over-the-limit answer replaced by `overloaded`.
    uvicorn offers no setting for that answer; this hooks the one method that starts a
    request's app (`_start_asgi_task`, present since uvicorn 0.30), and falls back to uvicorn's
    own protocol (plain-text 503) where httptools or that method is missing. A test pins it."""
    try:
        from uvicorn.protocols.http.flow_control import service_unavailable
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"
    if not hasattr(HttpToolsProtocol, "_start_asgi_task"):
        return "auto"

    class JSONOverloadProtocol(HttpToolsProtocol):
        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            chosen: Any = overloaded if app is service_unavailable else app
            super()._start_asgi_task(cycle, chosen)

    return JSONOverloadProtocol


def uvicorn_config(settings: Settings, host: str, port: int) -> uvicorn.Config:
    """The server's configuration. `limit_concurrency` bounds open connections plus in-flight
    requests: beyond `max_connections` uvicorn answers 503 (JSON, Retry-After) at once instead
    of letting an overload pile up memory and latency."""
    return uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        access_log=False,
        proxy_headers=True,
        limit_concurrency=settings.max_connections,
        http=_http_protocol(),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--bundle", required=True, help="bundle directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--engine", default=None, help="torch or vllm")
    parser.add_argument("--device", default=None, help="auto, cpu or cuda")
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "engine": args.engine,
            "device": args.device,
            "redis_url": args.redis_url,
        }.items()
        if v is not None
    }
    run(args.bundle, args.host, args.port, **overrides)


if __name__ == "__main__":
    main()
