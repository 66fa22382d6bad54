"""API keys: `Authorization: Bearer <key>`, compared in constant time.

With no keys configured, write routes are closed (401 saying how to configure keys): an open
write endpoint must be a deliberate choice, not a default.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from fastapi import HTTPException, status

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="letterrec"'}


def key_matches(presented: bytes, keys: Sequence[bytes]) -> bool:
    """True when `presented` equals one of `keys`; every key is compared, in constant time."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key)
    return found


def bearer_token(header: str | None) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token.encode("utf-8", errors="surrogateescape")


def check_api_key(header: str | None, keys: Sequence[bytes]) -> None:
    """Raise 401 unless `header` carries one of `keys`."""
    if not keys:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="this route needs an API key and none is configured on the server "
            "(set LETTERREC_API_KEYS)",
            headers=_CHALLENGE,
        )
    token = bearer_token(header)
    if token is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="header Authorization: missing or not of the form 'Bearer <key>'",
            headers=_CHALLENGE,
        )
    if not key_matches(token, keys):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="header Authorization: API key not accepted",
            headers=_CHALLENGE,
        )
