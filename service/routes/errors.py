"""Error answers as OpenAPI `responses` entries: every status a route can give is documented
with its body and headers, so /openapi.json is a contract a client (and the schema fuzz tests)
can hold the service to. 422 is documented by FastAPI itself."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from service.schemas import ConflictResponse, ErrorResponse

Responses = dict[int | str, dict[str, Any]]

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}
_CHALLENGE = {"WWW-Authenticate": {"description": "Bearer challenge", "schema": {"type": "string"}}}


def error(
    description: str, model: type[BaseModel] = ErrorResponse, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    entry: dict[str, Any] = {"description": description, "model": model}
    if headers:
        entry["headers"] = headers
    return entry


def unauthorized(description: str) -> dict[str, Any]:
    return error(description, headers=_CHALLENGE)


def unavailable(description: str) -> dict[str, Any]:
    return error(description, headers=_RETRY_AFTER)


def too_many(description: str) -> dict[str, Any]:
    return error(description, headers=_RETRY_AFTER)


def conflict(description: str) -> dict[str, Any]:
    return error(description, model=ConflictResponse)


BODY_TOO_LARGE: Responses = {
    413: error("The request body is larger than max_body_bytes (LETTERREC_MAX_BODY_BYTES)")
}
