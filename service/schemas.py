"""Request and response bodies of the HTTP API (the protocol layer).

Limits (documented in the OpenAPI schema and enforced here, so a malformed request gets a 422
whose `detail[].loc` names the field):
- item ids: 1..256 characters, no control characters;
- history and exclude: at most 1000 item ids each; k: 1..100;
- /recommend/batch: at most 256 requests; /tokenize: at most 256 items;
- text fields: at most 10,000 characters; at most 35 fields per item (item_id, title,
  description and 32 more), each a string whose name has at most 64 characters.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

MAX_HISTORY = 1000
MAX_EXCLUDE = 1000
MAX_K = 100
MAX_BATCH_REQUESTS = 256
MAX_TOKENIZE_ITEMS = 256
MAX_TEXT_CHARS = 10_000
MAX_ITEM_FIELDS = 35
MAX_FIELD_NAME_CHARS = 64
MAX_ITEM_ID_CHARS = 256

ItemId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ITEM_ID_CHARS, pattern=r"^[^\x00-\x1f\x7f]+$"),
]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]


def _integral(value: object) -> object:
    """JSON has one number type: 20.0 is the integer 20 (JSON Schema says so too); 20.5 and
    "20" stay what they are, and strict validation rejects them."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JSONInt = Annotated[int, BeforeValidator(_integral)]


class _Strict(BaseModel):
    # Field docstrings become descriptions in /openapi.json: constraints a JSON schema cannot
    # state are documented there.
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


class RecommendRequest(_Strict):
    """One user's recent items, oldest first; returns the k most likely next items."""

    history: list[ItemId] = Field(default_factory=list, max_length=MAX_HISTORY)
    """Item ids the user interacted with, oldest first. Unknown ids are ignored and listed."""
    k: JSONInt = Field(10, ge=1, le=MAX_K)
    """How many items to return."""
    exclude: list[ItemId] = Field(default_factory=list, max_length=MAX_EXCLUDE)
    """Item ids that must not be returned (exact: excluded inside the search)."""
    exclude_history: bool | None = None
    """Also exclude the (known) history items. Default: the bundle's validation-chosen mode
    (manifest `recommend.mode`; history excluded for bundles without one)."""
    repeat: bool | None = None
    """Repeat-aware mode: the user's recent items compete with the beam's, each scored exactly
    by the model plus a repeat prior fitted on validation (needs the history not excluded).
    Default: on when the bundle's chosen mode is 'repeat'."""
    new_item_bonus: float | None = Field(None, ge=0.0, le=1000.0)
    """Log-probability bonus for items added after training (POST /tokenize), applied exactly
    inside the search: identifiers are ranked by log P + bonus for new items. Default: the
    bundle's (manifest `recommend.new_item_bonus`, fitted by `letterrec evaluate
    --cold-items`; 0 when absent)."""
    new_item_slots: Annotated[int, Field(ge=0, le=MAX_K), BeforeValidator(_integral)] | None = None
    """At most this many of the list's last places go to the best items added after training
    (POST /tokenize), each found by an exact search over the new items and admitted when its
    log-probability plus `new_item_margin` reaches the score of the item it displaces (a new
    item that scores higher keeps its own place). Default: the bundle's (manifest
    `recommend.new_item_slots`, fitted by `letterrec evaluate --cold-items`; 0 when absent)."""
    new_item_margin: float | None = Field(None, ge=-1000.0, le=1000.0)
    """Log-probability margin of the new-item slots (larger: new items admitted more often).
    Default: the bundle's (0 when absent)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"history": ["1", "2"], "k": 10, "exclude": []}],
            # repeat needs the history, so it cannot be combined with exclude_history
            "not": {
                "required": ["repeat", "exclude_history"],
                "properties": {"repeat": {"const": True}, "exclude_history": {"const": True}},
            },
        }
    )


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    """Sum over the identifier's tokens of the masked log-softmax (a log-probability), plus the
    repeat prior for an item from the history and the new-item bonus for a new item."""
    codes: list[int]
    title: str
    from_history: bool = False
    """Recommended again from the user's history by the repeat-aware mode (its score then
    includes the repeat prior)."""
    new: bool = False
    """Added after training (POST /tokenize), not part of the bundle's catalogue: lets product
    teams track how often new items are shown."""


Mode = Literal["plain", "exclude_history", "repeat"]
MODES: tuple[Mode, ...] = get_args(Mode)


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    model_version: str
    mode: Mode = "plain"
    """How this answer was made: the plain beam search, with the history excluded inside the
    search, or repeat-aware."""
    ignored_history: list[str]
    """History ids that are not in the catalogue (ignored)."""


class BatchRecommendRequest(_Strict):
    requests: list[RecommendRequest] = Field(min_length=1, max_length=MAX_BATCH_REQUESTS)


class BatchRecommendResponse(BaseModel):
    responses: list[RecommendResponse]
    model_version: str


class TokenizeItem(BaseModel):
    """An item's text. Fields besides item_id, title and description must be strings too; the
    bundle's text template decides which of them the tokenizer reads."""

    model_config = ConfigDict(
        extra="allow",
        strict=True,
        use_attribute_docstrings=True,
        # what _check_extra enforces, stated in /openapi.json
        json_schema_extra={
            "additionalProperties": {"type": "string", "maxLength": MAX_TEXT_CHARS},
            "propertyNames": {"maxLength": MAX_FIELD_NAME_CHARS},
            "maxProperties": MAX_ITEM_FIELDS,
        },
    )

    item_id: ItemId
    title: Text = ""
    description: Text = ""

    @model_validator(mode="after")
    def _check_extra(self) -> TokenizeItem:
        extra = self.__pydantic_extra__ or {}
        given = len(self.model_fields_set | set(extra))
        if given > MAX_ITEM_FIELDS:
            raise ValueError(f"at most {MAX_ITEM_FIELDS} fields per item, got {given}")
        for name, value in extra.items():
            if not _is_unicode(name) or (isinstance(value, str) and not _is_unicode(value)):
                raise ValueError(f"field {name!r} is not valid unicode (lone surrogate)")
            if len(name) > MAX_FIELD_NAME_CHARS:
                raise ValueError(
                    f"field name longer than {MAX_FIELD_NAME_CHARS} characters: {name[:64]!r}..."
                )
            if not isinstance(value, str):
                raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
            if len(value) > MAX_TEXT_CHARS:
                raise ValueError(f"field {name!r} is longer than {MAX_TEXT_CHARS} characters")
        return self

    def fields(self) -> dict[str, Any]:
        """All fields as one mapping, as the tokenizer's text template expects."""
        return {**(self.__pydantic_extra__ or {}), **self.model_dump(exclude_unset=False)}


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class TokenizeRequest(_Strict):
    items: list[TokenizeItem] = Field(min_length=1, max_length=MAX_TOKENIZE_ITEMS)
    """The items, in any order. An item_id given twice with the same text is stored once (the
    later copy answers `existing`); twice with different texts is a conflict (409)."""
    dry_run: bool = False
    """Compute codes (and conflicts) without storing anything."""
    replace: bool = False
    """Re-tokenize items whose id exists with a different text (the old identifier retires)."""


TokenizeStatus = Literal["created", "existing", "replaced"]


class TokenizedItem(BaseModel):
    item_id: str
    codes: list[int]
    status: TokenizeStatus
    """created: new item; existing: same id and text already stored; replaced: new codes."""


class TokenizeResponse(BaseModel):
    items: list[TokenizedItem]
    dry_run: bool
    catalogue_version: int
    """Store version after this request (unchanged for a dry run)."""


class ItemResponse(BaseModel):
    item_id: str
    codes: list[int]
    title: str
    source: Literal["bundle", "tokenized"]


class ErrorResponse(BaseModel):
    """The body of an error answer (all but 409 and 422): what was wrong and what to do."""

    detail: str


class Problem(BaseModel):
    """One entry of a 409's `detail`, in the shape of a validation error's entries."""

    loc: list[str | int]
    """Where: ["body", "items", <index>, "item_id"]."""
    msg: str
    type: str


class ConflictResponse(BaseModel):
    detail: list[Problem]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool]
    degraded: list[str] = Field(default_factory=list)
    """Failed checks of shared dependencies (e.g. store_reachable): writes degrade, readiness
    does not."""
    model_version: str | None = None
    engine: str | None = None
    device: str | None = None
    dtype: str | None = None
    decode_workers: int | None = None
    """Child processes decoding batches side by side (0: in the server process)."""
    torch_threads: int | None = None
    """Torch threads of each decoding process (0: torch's default)."""
    catalogue_items: int = 0
    catalogue_version: int = 0
