"""GET /items/{item_id}."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from service.deps import StoreDep
from service.routes.errors import error
from service.schemas import ItemResponse

router = APIRouter(tags=["catalogue"])


@router.get("/items/{item_id:path}", responses={404: error("Unknown item_id")})
async def get_item(item_id: str, store: StoreDep) -> ItemResponse:
    """An active catalogue item (bundle or tokenized) with its current codes."""
    row = store.live.row_of(item_id)
    if row is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"item_id {item_id!r} is not in the catalogue"
        )
    view = store.live.item(row)
    return ItemResponse(
        item_id=view.item_id, codes=list(view.codes), title=view.title, source=view.source
    )
