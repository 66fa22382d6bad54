"""POST /recommend and POST /recommend/batch."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.deps import RecommendDep, require_read_key
from service.routes.errors import BODY_TOO_LARGE, Responses, error, unauthorized, unavailable
from service.routes.json_body import JSONBodyRoute
from service.schemas import (
    BatchRecommendRequest,
    BatchRecommendResponse,
    RecommendRequest,
    RecommendResponse,
)

# The API key is optional here unless LETTERREC_REQUIRE_KEY_FOR_RECOMMEND is set;
# /openapi.json says which (service.docs).
router = APIRouter(
    tags=["recommend"], dependencies=[Depends(require_read_key)], route_class=JSONBodyRoute
)

_ERRORS: Responses = {
    401: unauthorized(
        "Missing or wrong API key (only when LETTERREC_REQUIRE_KEY_FOR_RECOMMEND is set)"
    ),
    **BODY_TOO_LARGE,
    503: unavailable("Queue full, decoding failed or shutting down; see Retry-After"),
    504: error("Not decoded within the request timeout"),
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
