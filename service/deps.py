"""FastAPI dependencies: the per-app state built in the lifespan, as Annotated aliases.

Every dependency is `async def`: they only read attributes and compare keys, and FastAPI runs a
plain `def` dependency in its thread pool. Under load that hop cost more than the work: profiled
at 100 requests/s on 2 cores, about a quarter of the event loop's CPU went to handing the four
dependencies of a /recommend call to worker threads and back, on the same cores as decoding."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import bearer_token, check_api_key
from service.batcher import MicroBatcher
from service.engines.base import DecodeEngine
from service.keys import KeyRing, RateLimiter
from service.metrics import Metrics
from service.serving import ServingRecommend, ServingTokenize
from service.settings import Settings
from service.store import CatalogueStore


@dataclass
class ServiceState:
    """Long-lived objects of one app instance (created in the lifespan, kept on app.state)."""

    settings: Settings
    metrics: Metrics
    store: CatalogueStore
    engine: DecodeEngine
    batcher: MicroBatcher[Any, Any]
    recommend: ServingRecommend
    tokenize: ServingTokenize
    model_version: str
    keys: KeyRing
    limiter: RateLimiter
    engine_warm: bool = False
    accepting: bool = True
    info: dict[str, Any] = field(default_factory=dict)

    def checks(self) -> dict[str, bool]:
        return {
            "bundle_loaded": True,
            "engine_warm": self.engine_warm,
            "store_reachable": self.store.healthy,
            "accepting": self.accepting,
        }

    DEGRADING = ("store_reachable",)
    """Checks of shared dependencies: a failure degrades writes and shows in /readyz's body, in
    `letterrec_store_up` and in an alert, but never makes the replica unready. Every replica
    shares the dependency, so unready replicas would turn a partial failure (no /tokenize) into
    a full outage behind the load balancer while /recommend still works."""

    def ready(self) -> bool:
        """This replica can answer /recommend now."""
        return all(v for k, v in self.checks().items() if k not in self.DEGRADING)

    def degraded(self) -> list[str]:
        return [k for k, v in self.checks().items() if k in self.DEGRADING and not v]


async def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "letterrec", None)
    if state is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "the service is starting", {"Retry-After": "1"}
        )
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_settings(state: StateDep) -> Settings:
    return state.settings


async def get_recommend(state: StateDep) -> ServingRecommend:
    return state.recommend


async def get_tokenize(state: StateDep) -> ServingTokenize:
    return state.tokenize


async def get_store(state: StateDep) -> CatalogueStore:
    return state.store


SettingsDep = Annotated[Settings, Depends(get_settings)]
RecommendDep = Annotated[ServingRecommend, Depends(get_recommend)]
TokenizeDep = Annotated[ServingTokenize, Depends(get_tokenize)]
StoreDep = Annotated[CatalogueStore, Depends(get_store)]

_bearer = HTTPBearer(
    auto_error=False, description="API key from LETTERREC_API_KEYS or LETTERREC_API_KEYS_FILE"
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]

_CHECKED = "letterrec_key_checked"


async def check_write(request: Request) -> None:
    """A write route's key, then its rate limit (429 + Retry-After). Run by the route class
    before the body is read (service.routes.json_body), so a caller without a valid key learns
    that first (401), whatever its body; the dependency below then finds it done."""
    if request.scope.get(_CHECKED):
        return
    state = await get_state(request)
    header = request.headers.get("authorization")
    check_api_key(header, state.keys.values())
    wait = state.limiter.take(bearer_token(header) or b"")
    if wait > 0:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"write rate limit of this API key reached ({state.limiter.rate_per_s:g}/s, bursts of "
            f"{state.limiter.burst}; LETTERREC_WRITE_RATE_PER_S); retry after the Retry-After "
            "seconds",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    request.scope[_CHECKED] = True


async def check_read(request: Request) -> None:
    """/recommend's key, only when `require_key_for_recommend` is set (no rate limit)."""
    if request.scope.get(_CHECKED):
        return
    state = await get_state(request)
    if state.settings.require_key_for_recommend:
        check_api_key(request.headers.get("authorization"), state.keys.values())
    request.scope[_CHECKED] = True


async def require_write_key(request: Request, creds: BearerDep) -> None:
    """Write routes always need a valid API key (declared as bearer auth in the schema)."""
    await check_write(request)


async def require_read_key(request: Request, creds: BearerDep) -> None:
    """/recommend needs a key only when `require_key_for_recommend` is set."""
    await check_read(request)


EARLY_CHECKS = {require_write_key: check_write, require_read_key: check_read}
"""Dependency -> the same check on the raw request, for route classes that run it first."""
