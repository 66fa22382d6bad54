"""POST /recommend and POST /recommend/batch."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from service.deps import RecommendDep, require_read_key
from service.schemas import (
    BatchRecommendRequest,
    BatchRecommendResponse,
    RecommendRequest,
    RecommendResponse,
)

router = APIRouter(tags=["recommend"], dependencies=[Depends(require_read_key)])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "API key required (when LETTERREC_REQUIRE_KEY_FOR_RECOMMEND is set)"},
    503: {"description": "Queue full or shutting down; see Retry-After"},
    504: {"description": "Not decoded within the request timeout"},
}


@router.post("/recommend", responses=_ERRORS)
async def recommend(body: RecommendRequest, serving: RecommendDep) -> RecommendResponse:
    """The k most likely next items after `history` (trie-constrained beam search)."""
    return await serving.recommend(body)


@router.post("/recommend/batch", responses=_ERRORS)
async def recommend_batch(
    body: BatchRecommendRequest, serving: RecommendDep
) -> BatchRecommendResponse:
    """Many histories in one call (offline callers); same semantics as /recommend, in order."""
    return await serving.recommend_batch(body.requests)
