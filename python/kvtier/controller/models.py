"""Request and response bodies of the controller API (docs/controller.md).

Requests are strict: an unknown field, a string where a number belongs, a
negative token id or an empty prefix is a 422 before the engine is touched,
so a typo (``"tier"`` for ``"tiers"`` in a clear) can never widen what a
call does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

# The engine's token ids are int32 (kvtier.engine._tokens).
TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
MAX_PREFIX_TOKENS = 1 << 20
MAX_TEXT_CHARS = 16 << 20
# The local tiers: the remote tier is shared by every instance and is
# neither cleared nor a move target from one of them.
Tier = Literal["cpu", "disk"]
Seconds = Annotated[StrictInt | StrictFloat, Field(gt=0, le=10 * 365 * 86400)]

TokenList = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PREFIX_TOKENS)]
Text = Annotated[StrictStr, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _PrefixFields(_Request):
    tokens: TokenList | None = Field(None, description="Token ids of the prefix.")
    text: Text | None = Field(
        None, description="Text of the prefix, tokenized with the served model's tokenizer.")
    add_special_tokens: StrictBool = Field(
        True, description="With text: add the tokenizer's special tokens (BOS), as vLLM's completions API does.")
    cache_salt: Annotated[StrictStr, Field(min_length=1)] | None = Field(
        None, description="The cache_salt the requests carried (vLLM's): it is part of their chunk keys.")


class Prefix(_PrefixFields):
    """A token prefix: exactly one of ``tokens`` and ``text``."""

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.tokens is None) == (self.text is None):
            raise ValueError("give exactly one of 'tokens' and 'text'")
        return self


class LookupRequest(Prefix):
    pass


class UnpinRequest(Prefix):
    pass


class PinRequest(Prefix):
    ttl_s: Seconds | None = Field(None, description="Unpin by itself after this many seconds (default: never).")


class MoveRequest(Prefix):
    tier: Tier = Field(description="Where the cached prefix should be: 'cpu' promotes (prefetch), 'disk' demotes.")


class ClearRequest(_PrefixFields):
    """What to clear. Filters combine (AND); ``all: true`` alone clears
    everything. An empty body is refused, so a clear never widens by a typo."""

    tiers: Annotated[list[Tier], Field(min_length=1)] | None = Field(
        None, description="Only the copies in these tiers (default: every local tier).")
    older_than_s: Seconds | None = Field(None, description="Only entries last used longer ago than this.")
    all: StrictBool = Field(False, description="Clear every entry of the selected tiers (needed when no other filter is given).")

    @model_validator(mode="after")
    def _selects_something(self) -> Self:
        if self.tokens is not None and self.text is not None:
            raise ValueError("give at most one of 'tokens' and 'text'")
        if self.cache_salt is not None and self.tokens is None and self.text is None:
            raise ValueError("'cache_salt' narrows a clear by tokens or text: give one of them")
        narrowed = self.tokens is not None or self.text is not None or self.older_than_s is not None
        if self.all and narrowed:
            raise ValueError("'all' clears everything: it cannot be combined with tokens, text or older_than_s")
        if not self.all and not narrowed and self.tiers is None:
            raise ValueError("nothing selected: give tiers, tokens or text, older_than_s, or all: true")
        return self


class VerifyRequest(_Request):
    deep: StrictBool = Field(False, description="Also read every entry back and check its checksums.")


# --------------------------------------------------------------------------
# Responses. Engine dictionaries whose keys grow with the engine are passed
# through as objects; the fields the API promises are typed.


class ErrorResponse(BaseModel):
    detail: Any


class StatsResponse(BaseModel):
    rank: int
    stats: dict[str, Any] = Field(description="Engine.stats(): counters, gauges, per tier, histograms.")


class HealthResponse(BaseModel):
    rank: int
    status: Literal["ok", "degraded", "down"]
    reasons: list[str] = Field(description="Why the status is not ok (empty when ok).")
    tiers: dict[str, Any] = Field(description="Per tier: its own status and what it is based on.")
    queues: dict[str, Any] = Field(description="Background queues: depth, capacity, drops.")
    detail_hidden: bool = Field(
        False, description="True when a token is configured and the caller sent none: only status is given.")


class ChunkInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    tiers: list[str]
    pinned: bool


class LookupResponse(BaseModel):
    rank: int
    query_tokens: int = Field(description="Tokens in the prefix asked about.")
    cached_tokens: int = Field(description="Leading tokens whose KV is cached in some tier.")
    chunk_tokens: int = Field(description="Tokens per chunk.")
    chunks: list[ChunkInfo] = Field(description="Each cached leading chunk: where it is, whether it is pinned.")
    by_tier: dict[str, Any] = Field(description="Per tier: how many of those chunks it holds.")


class ClearResponse(BaseModel):
    rank: int
    cleared: int = Field(description="Chunks that lost a copy (a chunk leaves the index once no copy is left).")


class PinResponse(BaseModel):
    rank: int
    pinned: int = Field(description="Chunks pinned (the cached leading chunks of the prefix).")


class UnpinResponse(BaseModel):
    rank: int
    unpinned: int = Field(description="Chunks unpinned.")


class MoveResponse(BaseModel):
    rank: int
    task_id: str = Field(description="Poll GET /v1/tasks/{task_id}.")


class TaskResponse(BaseModel):
    task_id: str
    kind: str
    done: bool
    age_s: float = Field(description="Seconds since the task was started.")
    result: dict[str, Any] | None = Field(None, description="The engine's result, once done.")
    error: str | None = Field(None, description="Why it failed, if it did.")


class AsyncResponse(BaseModel):
    rank: int
    queues: dict[str, Any] = Field(description="Write-behind, remote upload and other queues: depth, capacity, drops.")
    tasks_running: list[TaskResponse]
    tasks_kept: int = Field(description="Tasks the controller remembers (running and finished).")


class VerifyResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    rank: int
    entries: int
    checked: int
    ok: int
    missing: dict[str, Any] = Field(description="Per tier: index entries whose data the tier does not have.")
    orphans: dict[str, Any] = Field(description="Per tier: data the index does not list.")
    corrupt: int
    consistent: bool
