"""POST /tokenize: new items get unique identifiers and become recommendable."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.deps import TokenizeDep, require_write_key
from service.schemas import TokenizeRequest, TokenizeResponse

router = APIRouter(tags=["catalogue"])


@router.post(
    "/tokenize",
    dependencies=[Depends(require_write_key)],
    responses={
        401: {"description": "Missing or wrong API key; nothing was changed"},
        409: {"description": "An item_id exists with a different text and replace is false"},
        503: {"description": "Catalogue store unreachable; nothing was stored"},
    },
)
async def tokenize(body: TokenizeRequest, serving: TokenizeDep) -> TokenizeResponse:
    """Codes for each item. New items enter the catalogue and trie on every replica at once;
    the same item with the same text again is a no-op (status `existing`)."""
    return await serving.tokenize(body)
