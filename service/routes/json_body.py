"""Request bodies that are not JSON get one answer: 422 `json_invalid`.

FastAPI answers a JSON syntax error with 422 but anything else `json.loads` raises (a body that
is not UTF-8, nesting too deep for the parser) with an undocumented 400 'There was an error
parsing the body'. Clients should parse one error format, so those become JSON decode errors
too, which FastAPI reports as a validation error naming the byte offset.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from service.deps import EARLY_CHECKS


class JSONBodyRequest(Request):
    async def json(self) -> Any:
        try:
            return await super().json()
        except UnicodeDecodeError as e:
            raise json.JSONDecodeError(f"the body is not UTF-8 ({e.reason})", "", e.start) from e
        except RecursionError as e:
            raise json.JSONDecodeError("the body is nested too deeply to parse", "", 0) from e


class JSONBodyRoute(APIRoute):
    """An APIRoute whose handler reads the body through `JSONBodyRequest`, after the API key
    checks among its dependencies (service.deps.EARLY_CHECKS): FastAPI parses the body before
    it solves dependencies, so a request without a key would otherwise learn that its body is
    malformed (422) before that it is not allowed (401)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        checks = [
            EARLY_CHECKS[d.dependency] for d in self.dependencies if d.dependency in EARLY_CHECKS
        ]

        async def handle(request: Request) -> Response:
            for check in checks:
                await check(request)
            return await handler(JSONBodyRequest(request.scope, request.receive))

        return handle
