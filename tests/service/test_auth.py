"""API key parsing and constant-time matching."""

from __future__ import annotations

import pytest
from fastapi import HTTPException

from service.auth import bearer_token, check_api_key, key_matches


def test_bearer_token_parses_only_bearer_scheme() -> None:
    assert bearer_token("Bearer abc") == b"abc"
    assert bearer_token("bearer  abc ") == b"abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token("") is None
    assert bearer_token(None) is None


def test_key_matches_any_configured_key() -> None:
    keys = [b"first", b"second"]
    assert key_matches(b"second", keys)
    assert not key_matches(b"secon", keys)
    assert not key_matches(b"", keys)
    assert not key_matches(b"x", [])


@pytest.mark.parametrize(
    ("header", "keys", "fragment"),
    [
        (None, [b"k"], "missing"),
        ("Bearer wrong", [b"k"], "not accepted"),
        ("Token k", [b"k"], "missing"),
        ("Bearer k", [], "LETTERREC_API_KEYS"),
    ],
)
def test_check_api_key_rejects_with_reason(
    header: str | None, keys: list[bytes], fragment: str
) -> None:
    with pytest.raises(HTTPException) as err:
        check_api_key(header, keys)
    assert err.value.status_code == 401
    assert fragment in str(err.value.detail)
    assert err.value.headers == {"WWW-Authenticate": 'Bearer realm="letterrec"'}


def test_check_api_key_accepts_a_configured_key() -> None:
    check_api_key("Bearer k2", [b"k1", b"k2"])


def test_the_repositorys_placeholder_keys_are_never_accepted() -> None:
    """`dev-insecure-placeholder-key`, the key earlier compose and kustomize files shipped, is
    public: an operator who still configures it gets a key that opens nothing; real keys beside
    it still work."""
    from service.settings import Settings

    s = Settings(api_keys="dev-insecure-placeholder-key, real-key-0123456789")
    assert s.key_values() == [b"real-key-0123456789"]
    assert s.placeholder_keys() == 1
    check_api_key("Bearer real-key-0123456789", s.key_values())
    with pytest.raises(HTTPException) as e:
        check_api_key("Bearer dev-insecure-placeholder-key", s.key_values())
    assert e.value.status_code == 401
    only = Settings(api_keys="dev-insecure-placeholder-key")
    with pytest.raises(HTTPException, match="none is configured"):
        check_api_key("Bearer dev-insecure-placeholder-key", only.key_values())
