"""POST /tokenize: new items get unique identifiers and become recommendable."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.deps import TokenizeDep, require_write_key
from service.routes.errors import (
    BODY_TOO_LARGE,
    conflict,
    error,
    too_many,
    unauthorized,
    unavailable,
)
from service.routes.json_body import JSONBodyRoute
from service.schemas import TokenizeRequest, TokenizeResponse

router = APIRouter(tags=["catalogue"], route_class=JSONBodyRoute)


@router.post(
    "/tokenize",
    dependencies=[Depends(require_write_key)],
    responses={
        401: unauthorized("Missing or wrong API key; nothing was changed"),
        429: too_many(
            "This API key's write rate limit (LETTERREC_WRITE_RATE_PER_S, LETTERREC_WRITE_BURST) "
            "is reached; nothing was changed, retry after Retry-After seconds"
        ),
        409: conflict("An item_id exists with a different text and replace is false"),
        **BODY_TOO_LARGE,
        503: unavailable(
            "Catalogue store unreachable or busy: nothing was acknowledged. The detail says "
            "whether nothing was stored or the outcome is unknown; repeating the same request "
            "is safe either way (what was stored answers `existing`)"
        ),
        507: error("No free identifier is left for a new item; nothing was stored"),
    },
)
async def tokenize(body: TokenizeRequest, serving: TokenizeDep) -> TokenizeResponse:
    """Codes for each item. New items enter the catalogue and trie on every replica at once;
    the same item with the same text again is a no-op (status `existing`)."""
    return await serving.tokenize(body)
