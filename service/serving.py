"""Serving classes: turn validated requests into engine and store calls (no HTTP here).

`ServingRecommend` maps item ids to catalogue rows, builds prompts and exact exclusions, and
hands `DecodeRequest`s to the micro-batcher. `ServingTokenize` plans a /tokenize request against
the synced catalogue (idempotent repeats, conflicts, replacements), encodes the new texts, and
commits the result to the store before anything is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from models.collisions import CodeSpaceExhausted
from models.new_items import NewItemSlots
from models.repeat import RepeatPrior
from models.vocab import CodeVocab
from service.batcher import MicroBatcher
from service.engines.base import DecodeRequest, Recommendation
from service.metrics import Metrics
from service.schemas import (
    MODES,
    BatchRecommendResponse,
    Mode,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
    TokenizedItem,
    TokenizeRequest,
    TokenizeResponse,
)
from service.store import CatalogueStore, Entry, StaleVersion, StoreUnavailable, text_hash

log = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 4


class Conflict(Exception):
    """A /tokenize item clashes with what is stored; `detail` names the items."""

    def __init__(self, detail: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(d["msg"] for d in detail))
        self.detail = detail


class CatalogueFull(Exception):
    """No free identifier is left in the code space for a new item."""


class Unavailable(Exception):
    """A dependency (tokenizer, store) cannot serve the request now."""


class Tokenizer(Protocol):
    """What /tokenize needs of models.item_tokenizer.ItemTokenizer."""

    levels: int

    def item_text(self, item: Any) -> str: ...

    def encode(self, items: Sequence[Any], is_taken: Any = None) -> np.ndarray: ...


class InvalidRequest(ValueError):
    """A request whose options contradict each other; `loc` names the field."""

    def __init__(self, loc: str, msg: str) -> None:
        super().__init__(msg)
        self.loc = loc


@dataclass(frozen=True)
class RecommendDefaults:
    """The bundle's validation-chosen defaults (manifest `recommend`)."""

    mode: Mode = "exclude_history"
    prior: RepeatPrior | None = None
    new_item_bonus: float = 0.0
    new_item_slots: NewItemSlots = NewItemSlots()

    @classmethod
    def from_manifest(cls, recommend: dict[str, Any]) -> RecommendDefaults:
        bonus = float(recommend.get("new_item_bonus", 0.0))
        slots = NewItemSlots.from_dict(recommend.get("new_item_slots"))
        if "repeat_prior" not in recommend:
            # Bundles without a fitted mode: history excluded, as always.
            return cls(new_item_bonus=bonus, new_item_slots=slots)
        prior = RepeatPrior.from_dict(recommend["repeat_prior"])
        mode = recommend.get("mode", "plain")
        if mode not in MODES:
            raise ValueError(f"manifest recommend.mode: {mode!r} is not one of {list(MODES)}")
        return cls(mode=mode, prior=prior, new_item_bonus=bonus, new_item_slots=slots)

    def slots(self, req: RecommendRequest) -> NewItemSlots:
        """The request's new-item slots: its own fields over the bundle's."""
        d = self.new_item_slots
        return NewItemSlots(
            d.slots if req.new_item_slots is None else req.new_item_slots,
            d.margin if req.new_item_margin is None else req.new_item_margin,
        )


class ServingRecommend:
    def __init__(
        self,
        store: CatalogueStore,
        vocab: CodeVocab,
        batcher: MicroBatcher[DecodeRequest, list[Recommendation]],
        model_version: str,
        timeout_s: float,
        defaults: RecommendDefaults | None = None,
    ) -> None:
        self.store = store
        self.vocab = vocab
        self.batcher = batcher
        self.model_version = model_version
        self.timeout_s = timeout_s
        self.defaults = defaults or RecommendDefaults()

    def mode(self, req: RecommendRequest) -> Mode:
        """The request's mode: its explicit options win over the bundle's default."""
        if req.repeat and req.exclude_history:
            raise InvalidRequest(
                "repeat", "repeat needs the history: set exclude_history to false (or omit it)"
            )
        if req.repeat:
            if self.defaults.prior is None:
                raise InvalidRequest(
                    "repeat",
                    "this bundle has no fitted repeat prior (run `letterrec fit-mode` on it)",
                )
            return "repeat"
        if req.exclude_history is not None:
            return "exclude_history" if req.exclude_history else "plain"
        default = self.defaults.mode
        if req.repeat is False and default == "repeat":
            return "plain"
        return default

    def build(self, req: RecommendRequest) -> tuple[DecodeRequest, list[str]]:
        """Prompt from the known history, exclusions as rows; unknown history ids listed."""
        live = self.store.live
        rows: list[int] = []
        ignored: list[str] = []
        for item_id in req.history:
            row = live.row_of(item_id)
            if row is not None:
                rows.append(row)
            elif item_id not in ignored:
                ignored.append(item_id)
        exclude = {r for r in map(live.row_of, req.exclude) if r is not None}
        mode = self.mode(req)
        if mode == "exclude_history":
            exclude.update(rows)
        recent = rows[-self.vocab.history_items :] if self.vocab.history_items else []
        prompt = self.vocab.prompt(live.codes_rows(recent))
        repeat = mode == "repeat"
        decode = DecodeRequest(
            prompt=prompt,
            k=req.k,
            exclude=frozenset(exclude),
            history=tuple(recent) if repeat else (),
            prior=self.defaults.prior if repeat else None,
            new_bonus=(
                self.defaults.new_item_bonus if req.new_item_bonus is None else req.new_item_bonus
            ),
            new_from=live.n_bundle,
            new_slots=self.defaults.slots(req),
        )
        return decode, ignored

    def respond(
        self, recs: Sequence[Recommendation], ignored: list[str], mode: Mode = "plain"
    ) -> RecommendResponse:
        live = self.store.live
        items = []
        for r in recs:
            view = live.item(r.item_index)
            items.append(
                RecommendedItem(
                    item_id=view.item_id,
                    score=r.score,
                    codes=list(view.codes),
                    title=view.title,
                    from_history=r.from_history,
                    new=view.source == "tokenized",
                )
            )
        return RecommendResponse(
            items=items, model_version=self.model_version, ignored_history=ignored, mode=mode
        )

    async def recommend(self, req: RecommendRequest) -> RecommendResponse:
        decode_req, ignored = self.build(req)
        recs = await self.batcher.submit(decode_req, self.timeout_s)
        return self.respond(recs, ignored, self.mode(req))

    async def recommend_batch(self, reqs: Sequence[RecommendRequest]) -> BatchRecommendResponse:
        built = []
        for i, r in enumerate(reqs):
            try:
                built.append(self.build(r))
            except InvalidRequest as e:
                raise InvalidRequest(f"requests.{i}.{e.loc}", str(e)) from e
        results = await self.batcher.submit_many([b[0] for b in built], self.timeout_s)
        return BatchRecommendResponse(
            responses=[
                self.respond(recs, b[1], self.mode(r))
                for recs, b, r in zip(results, built, reqs, strict=True)
            ],
            model_version=self.model_version,
        )


@dataclass
class _Plan:
    statuses: list[str]
    codes: list[tuple[int, ...]]
    entries: list[Entry] = field(default_factory=list)


class ServingTokenize:
    def __init__(
        self,
        store: CatalogueStore,
        tokenizer: Tokenizer | None,
        metrics: Metrics,
        max_waiting: int = 32,
        wait_timeout_s: float = 30.0,
    ) -> None:
        self.store = store
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.wait_timeout_s = wait_timeout_s
        self._waiting = 0

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        if self.tokenizer is None:
            raise Unavailable("this bundle has no item tokenizer (tokenizer/), /tokenize is off")
        await self._acquire_writer()
        try:
            return await self._tokenize(req)
        finally:
            self.store.writer.release()

    async def _acquire_writer(self) -> None:
        """Writes are serialized; at most `max_waiting` calls wait their turn, each at most
        `wait_timeout_s` (a slow or paused store must not pile up callers without bound)."""
        if self._waiting >= self.max_waiting:
            raise Unavailable(
                f"{self._waiting} /tokenize calls are already waiting for the catalogue writer "
                "(max_waiting_writes); retry later"
            )
        self._waiting += 1
        try:
            async with asyncio.timeout(self.wait_timeout_s):
                await self.store.writer.acquire()
        except TimeoutError:
            raise Unavailable(
                f"waited {self.wait_timeout_s:g} s for the catalogue writer (the store is slow); "
                "nothing was stored, retry later"
            ) from None
        finally:
            self._waiting -= 1

    async def _tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """The write itself; the caller holds the store's writer lock."""
        for _ in range(COMMIT_ATTEMPTS):
            try:
                await self.store.sync()
            except StoreUnavailable as e:
                raise Unavailable(str(e)) from e
            plan = await asyncio.to_thread(self._plan, req)
            if req.dry_run or not plan.entries:
                return self._response(req, plan)
            try:
                await self.store.commit(plan.entries)
            except StoreUnavailable as e:
                raise Unavailable(str(e)) from e
            except StaleVersion:
                continue
            self.metrics.tokenized_items.inc(len(plan.entries))
            return self._response(req, plan)
        raise Unavailable("the catalogue store is busy with other writers; retry")

    def _response(self, req: TokenizeRequest, plan: _Plan) -> TokenizeResponse:
        items = [
            TokenizedItem(item_id=it.item_id, codes=list(c), status=s)  # type: ignore[arg-type]
            for it, c, s in zip(req.items, plan.codes, plan.statuses, strict=True)
        ]
        return TokenizeResponse(
            items=items, dry_run=req.dry_run, catalogue_version=self.store.version
        )

    def _plan(self, req: TokenizeRequest) -> _Plan:
        """Decide per item: existing (same id, same text), created, replaced, or a conflict.

        Runs in a thread while the caller holds the store's writer lock, so the catalogue it
        reads does not change underneath it.
        """
        assert self.tokenizer is not None
        live = self.store.live
        fields = [it.fields() for it in req.items]
        hashes = [text_hash(self.tokenizer.item_text(f)) for f in fields]
        n = len(req.items)
        plan = _Plan(statuses=[""] * n, codes=[()] * n)
        todo: list[int] = []
        conflicts: list[dict[str, Any]] = []
        first: dict[str, int] = {}
        copies: dict[int, int] = {}  # a repeated item -> its first occurrence
        for i, item in enumerate(req.items):
            j = first.setdefault(item.item_id, i)
            if j != i:
                if hashes[i] == hashes[j]:
                    copies[i] = j
                else:
                    conflicts.append(_repeated(i, j, item.item_id))
                continue
            row = live.row_of(item.item_id)
            view = live.item(row) if row is not None else None
            if view is not None and view.text_hash == hashes[i]:
                plan.statuses[i], plan.codes[i] = "existing", view.codes
            elif view is not None and view.source == "tokenized" and not req.replace:
                conflicts.append(_conflict(i, item.item_id, "was tokenized with a different text"))
            else:
                todo.append(i)
        if conflicts:
            raise Conflict(conflicts)
        if todo:
            self._encode(req, fields, hashes, todo, plan)
        for i, j in copies.items():  # as if sent after the first: it finds the item stored
            plan.statuses[i], plan.codes[i] = "existing", plan.codes[j]
        return plan

    def _encode(
        self,
        req: TokenizeRequest,
        fields: list[dict[str, Any]],
        hashes: list[str],
        todo: list[int],
        plan: _Plan,
    ) -> None:
        assert self.tokenizer is not None
        live = self.store.live
        rows = {i: live.row_of(req.items[i].item_id) for i in todo}
        # An item being re-tokenized may keep (or swap into) its own old identifier.
        free = frozenset(r for r in rows.values() if r is not None)
        try:
            codes = self.tokenizer.encode(
                [fields[i] for i in todo], is_taken=lambda c: live.is_taken(tuple(c), free)
            )
        except CodeSpaceExhausted as e:
            raise CatalogueFull(str(e)) from e
        conflicts: list[dict[str, Any]] = []
        for j, i in enumerate(todo):
            item, row = req.items[i], rows[i]
            new = tuple(int(c) for c in codes[j])
            old = live.item(row).codes if row is not None else None
            plan.codes[i] = new
            if row is None:
                plan.statuses[i] = "created"
            elif old == new and row < live.n_bundle:
                plan.statuses[i] = "existing"  # a bundle item whose text maps to its codes
                continue
            elif not req.replace:
                conflicts.append(
                    _conflict(
                        i,
                        item.item_id,
                        f"is in the bundle with codes {list(old or ())}, "
                        f"its text now maps to {list(new)}",
                    )
                )
                continue
            else:
                plan.statuses[i] = "replaced"
            # Later than the version it replaces even if this replica's clock is behind.
            stamp = max(time.time_ns(), live.stamp_of(item.item_id) + 1)
            plan.entries.append(Entry(item.item_id, new, item.title, hashes[i], stamp))
        if conflicts:
            raise Conflict(conflicts)
        # Retire re-tokenized rows before new items may take their freed identifiers.
        plan.entries.sort(key=lambda e: live.row_of(e.item_id) is None)


def _repeated(i: int, first: int, item_id: str) -> dict[str, Any]:
    return {
        "loc": ["body", "items", i, "item_id"],
        "msg": f"item_id {item_id!r} is also items[{first}], with a different text; "
        "send one text per item_id",
        "type": "conflict",
    }


def _conflict(i: int, item_id: str, why: str) -> dict[str, Any]:
    return {
        "loc": ["body", "items", i, "item_id"],
        "msg": f"item_id {item_id!r} {why}; send replace=true to re-tokenize it",
        "type": "conflict",
    }
