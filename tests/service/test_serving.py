"""Serving classes without HTTP: prompt and exclusion building, /tokenize planning rules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from models.bundle import Catalogue
from models.collisions import CodeSpaceExhausted, append_extra_token
from models.vocab import CodeVocab
from service.metrics import Metrics
from service.schemas import RecommendRequest, TokenizeRequest
from service.serving import (
    CatalogueFull,
    Conflict,
    ServingRecommend,
    ServingTokenize,
    Unavailable,
)
from service.store import CatalogueStore, LiveCatalogue

pytestmark = pytest.mark.anyio

VOCAB = CodeVocab(levels=2, codebook_size=4, history_items=2)
CODES = np.array([[0, 0], [0, 1], [1, 0], [2, 3]])


def store() -> CatalogueStore:
    cat = Catalogue(["a", "b", "c", "d"], CODES, ["A", "B", "C", "D"])
    return CatalogueStore(LiveCatalogue.from_bundle(cat, 4))


class StubTokenizer:
    """Maps a title to a fixed code tuple (first free after it), like a real tokenizer would."""

    levels = 2

    def __init__(self, table: dict[str, tuple[int, int]], fail: str | None = None) -> None:
        self.table = table
        self.fail = fail

    def item_text(self, item: Mapping[str, Any]) -> str:
        return str(item.get("title", ""))

    def encode(
        self, items: Sequence[Mapping[str, Any]], is_taken: Callable[[tuple[int, ...]], bool]
    ) -> np.ndarray:
        if self.fail:
            raise CodeSpaceExhausted(self.fail)
        out: list[tuple[int, int]] = []
        for it in items:
            want = self.table[str(it["title"])]
            flat = want[0] * 4 + want[1]
            while is_taken((flat // 4, flat % 4)) or (flat // 4, flat % 4) in out:
                flat = (flat + 1) % 16
            out.append((flat // 4, flat % 4))
        return np.array(out)


def test_prompt_uses_the_last_known_items_and_excludes_exactly() -> None:
    s = store()
    serving = ServingRecommend(s, VOCAB, batcher=None, model_version="v", timeout_s=1)  # type: ignore[arg-type]
    req = RecommendRequest(history=["a", "zz", "c", "d"], k=3, exclude=["b", "nope"])
    decode, ignored = serving.build(req)
    assert ignored == ["zz"]
    assert decode.prompt == [VOCAB.bos_id, *VOCAB.tokens(CODES[[2, 3]]).reshape(-1).tolist()]
    assert decode.exclude == frozenset({0, 1, 2, 3}) and decode.k == 3
    keep, _ = serving.build(RecommendRequest(history=["a"], exclude_history=False))
    assert keep.exclude == frozenset()
    empty, _ = serving.build(RecommendRequest())
    assert empty.prompt == [VOCAB.bos_id]


def tokenize_req(*items: dict[str, str], **flags: bool) -> TokenizeRequest:
    return TokenizeRequest.model_validate({"items": list(items), **flags})


async def test_replacement_frees_codes_for_an_item_in_the_same_request() -> None:
    s = store()
    tok = StubTokenizer({"x": (3, 0), "x2": (3, 1), "y": (3, 0)})
    serving = ServingTokenize(s, tok, Metrics())
    first = await serving.tokenize(tokenize_req({"item_id": "x", "title": "x"}))
    assert first.items[0].codes == [3, 0]
    # x moves to (3, 1) and y wants x's old (3, 0): it may take it, as the retirement goes first.
    both = await serving.tokenize(
        tokenize_req({"item_id": "y", "title": "y"}, {"item_id": "x", "title": "x2"}, replace=True)
    )
    assert [(i.item_id, i.codes, i.status) for i in both.items] == [
        ("y", [3, 0], "created"),
        ("x", [3, 1], "replaced"),
    ]
    live = s.live
    assert live.item(live.row_of("y")).codes == (3, 0)  # type: ignore[arg-type]
    assert live.item(live.row_of("x")).codes == (3, 1)  # type: ignore[arg-type]
    assert live.n_active == 6


async def test_conflicts_change_nothing() -> None:
    s = store()
    serving = ServingTokenize(
        s, StubTokenizer({"x": (3, 0), "other": (3, 2), "a2": (1, 1)}), Metrics()
    )
    await serving.tokenize(tokenize_req({"item_id": "x", "title": "x"}))
    before = len(s.live)
    with pytest.raises(Conflict) as err:
        await serving.tokenize(
            tokenize_req({"item_id": "new", "title": "other"}, {"item_id": "x", "title": "other"})
        )
    assert err.value.detail[0]["loc"] == ["body", "items", 1, "item_id"]
    with pytest.raises(Conflict, match="in the bundle"):
        await serving.tokenize(tokenize_req({"item_id": "a", "title": "a2"}))
    assert len(s.live) == before and s.live.row_of("new") is None


async def test_dry_run_stores_nothing() -> None:
    s = store()
    serving = ServingTokenize(s, StubTokenizer({"x": (3, 3)}), Metrics())
    r = await serving.tokenize(tokenize_req({"item_id": "x", "title": "x"}, dry_run=True))
    assert r.dry_run and r.items[0].codes == [3, 3] and r.items[0].status == "created"
    assert s.live.row_of("x") is None and s.version == 0


async def test_an_exhausted_code_space_is_reported_as_full() -> None:
    tok = StubTokenizer({}, fail="no free identifier left for row 0: the code space is exhausted")
    with pytest.raises(CatalogueFull):
        await ServingTokenize(store(), tok, Metrics()).tokenize(
            tokenize_req({"item_id": "x", "title": "x"})
        )


class ExtraTokenTokenizer(StubTokenizer):
    """TIGER's scheme as models.item_tokenizer runs it: the semantic code, then the real
    append_extra_token numbering the items that share it."""

    def encode(
        self, items: Sequence[Mapping[str, Any]], is_taken: Callable[[tuple[int, ...]], bool]
    ) -> np.ndarray:
        semantic = np.array([[self.table[str(it["title"])][0]] for it in items])
        return append_extra_token(semantic, 4, is_taken)


async def test_a_full_extra_token_prefix_is_reported_as_full_whatever_the_message() -> None:
    """The extra-token scheme's own error ('more than 4 items share ...') is a full catalogue
    too (507), not an internal error."""
    codes = np.array([[0, 0], [0, 1], [0, 2], [0, 3]])
    cat = Catalogue(["a", "b", "c", "d"], codes, ["A", "B", "C", "D"])
    s = CatalogueStore(LiveCatalogue.from_bundle(cat, 4))
    serving = ServingTokenize(s, ExtraTokenTokenizer({"x": (0, 0), "y": (1, 0)}), Metrics())
    with pytest.raises(CatalogueFull, match="share the codes"):
        await serving.tokenize(tokenize_req({"item_id": "x", "title": "x"}))
    r = await serving.tokenize(tokenize_req({"item_id": "y", "title": "y"}))
    assert r.items[0].codes == [1, 0]


async def test_calls_waiting_for_the_writer_are_bounded_in_number_and_time() -> None:
    s = store()
    serving = ServingTokenize(
        s, StubTokenizer({"x": (3, 3), "y": (3, 2)}), Metrics(), max_waiting=1, wait_timeout_s=5
    )
    await s.writer.acquire()  # a slow write in progress
    first = asyncio.create_task(serving.tokenize(tokenize_req({"item_id": "x", "title": "x"})))
    await asyncio.sleep(0.01)
    with pytest.raises(Unavailable, match="already waiting"):
        await serving.tokenize(tokenize_req({"item_id": "y", "title": "y"}))
    s.writer.release()
    assert (await first).items[0].status == "created"
    serving.wait_timeout_s = 0.05
    async with s.writer:
        with pytest.raises(Unavailable, match="waited 0.05 s"):
            await serving.tokenize(tokenize_req({"item_id": "y", "title": "y"}))
    assert s.live.row_of("y") is None
