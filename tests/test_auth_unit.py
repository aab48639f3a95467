"""Auth's pure parts: token hashing and shapes, scopes, principals, authentication against an
in-memory token index with failure counting (no Redis)."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any, cast

import pytest

from evc import auth
from evc.context import Context
from evc.errors import AuthError, ConfigError, Forbidden, RateLimited, ValidationError
from evc.settings import load_settings

JSON = dict[str, Any]


class TokenStore:
    """The token part of the store: records by (index, digest), failure counters."""

    def __init__(self) -> None:
        self.index: dict[tuple[str, str], JSON] = {}
        self.counts: Counter[str] = Counter()

    def create_token(self, rec: JSON, digest: str) -> None:
        self.index[("token-hash", digest)] = {**rec, "hash": digest}

    def resolve_token(self, index: str, kind: str, digest: str) -> JSON | None:
        return self.index.get((index, digest))

    def hit_many(self, names: list[str], window_s: int) -> list[int]:
        for n in names:
            self.counts[n] += 1
        return [self.counts[n] for n in names]


def _ctx(store: TokenStore, settings: Any) -> Context:
    """A context over the in-memory token store (it has only the token part of a Store)."""
    return Context(store, settings)  # type: ignore[arg-type]


@pytest.fixture
def settings(tmp_path: Path):
    return load_settings(env={}, data_dir=tmp_path, auth_fail_limit=3)


def test_tokens_are_prefixed_random_and_stored_as_sha256() -> None:
    a, b = auth.make_token(auth.PREFIX_OPERATOR), auth.make_token(auth.PREFIX_OPERATOR)
    assert a.startswith("evco_") and a != b and len(a) > 40
    assert auth.make_token(auth.PREFIX_DEVICE, 8).startswith("evcd_")
    assert auth.hash_token("evco_x") == hashlib.sha256(b"evco_x").hexdigest()


def test_scopes_and_principals() -> None:
    admin = auth.Principal("operator", "tok_1", "ops", frozenset({"admin"}))
    reader = auth.Principal("operator", "tok_2", "", frozenset({"read"}))
    device = auth.Principal("device", "dev_1", "edge-1")
    assert admin.allows("read") and admin.allows("admin")
    assert reader.allows("read") and not reader.allows("admin")
    assert not device.allows("read")
    assert (admin.label, reader.label, device.label) == ("operator:ops", "operator:tok_2", "device:edge-1")
    auth.check_scope(admin, "admin")
    with pytest.raises(Forbidden, match="lacks the 'admin' scope"):
        auth.check_scope(reader, "admin")
    with pytest.raises(Forbidden, match="device token"):
        auth.check_scope(device, "read")
    with pytest.raises(Forbidden, match="only register devices"):
        auth.check_scope(auth.Principal("enrollment", "enr_1"), "read")


def test_operator_tokens_need_known_scopes(settings) -> None:
    store = TokenStore()
    rec, token = auth.create_operator_token(_ctx(store, settings), "ci", ["read", "read"])
    assert rec["scopes"] == ["read"] and rec["prefix"] == token[: auth.TOKEN_PREFIX_LEN]
    assert "hash" not in auth.public_token(store.index[("token-hash", auth.hash_token(token))])
    for bad in ([], ["root"]):
        with pytest.raises(ValidationError):
            auth.create_operator_token(_ctx(store, settings), "x", bad)


def test_authenticate(settings) -> None:
    store = TokenStore()
    rec, token = auth.create_operator_token(_ctx(store, settings), "ops", ["admin"])
    p = auth.authenticate(store, settings, f"Bearer {token}")  # type: ignore[arg-type]
    assert (p.kind, p.id, p.scopes) == ("operator", rec["id"], frozenset({"admin"}))
    with pytest.raises(AuthError, match="missing bearer token"):
        auth.authenticate(store, settings, None)  # type: ignore[arg-type]
    with pytest.raises(AuthError, match="invalid token"):
        auth.authenticate(store, settings, "Bearer evco_nope", "10.0.0.1")  # type: ignore[arg-type]
    store.index[("token-hash", auth.hash_token(token))]["revoked"] = True
    with pytest.raises(AuthError, match="revoked"):
        auth.authenticate(store, settings, f"Bearer {token}")  # type: ignore[arg-type]


def test_expired_tokens_are_refused(settings) -> None:
    store = TokenStore()
    _, token = auth.create_operator_token(_ctx(store, settings), "old", ["read"], expires_at=1.0)
    with pytest.raises(AuthError, match="expired"):
        auth.authenticate(store, settings, f"Bearer {token}")  # type: ignore[arg-type]


def test_failures_past_the_limit_are_rate_limited_but_valid_tokens_work(settings) -> None:
    store = TokenStore()
    _, token = auth.create_operator_token(_ctx(store, settings), "ops", ["read"])
    for _ in range(3):
        with pytest.raises(AuthError) as exc:
            auth.authenticate(store, settings, "Bearer evco_wrong", "10.0.0.9")  # type: ignore[arg-type]
        assert not isinstance(exc.value, RateLimited)
    with pytest.raises(RateLimited) as limited:
        auth.authenticate(store, settings, "Bearer evco_other", "10.0.0.9")  # type: ignore[arg-type]
    assert limited.value.details["retry_after"] == settings.auth_fail_window_s
    assert auth.authenticate(store, settings, f"Bearer {token}", "10.0.0.9").kind == "operator"  # type: ignore[arg-type]


def test_trusted_proxies_must_parse() -> None:
    with pytest.raises(ConfigError, match="trusted_proxies"):
        auth.client_address("127.0.0.1", "1.2.3.4", "not-a-network")
    assert auth.client_address("10.1.2.3", "1.2.3.4", "10.0.0.0/8") == "1.2.3.4"
    assert auth.client_address("10.1.2.3", "10.9.9.9", "10.0.0.0/8") == "10.9.9.9"  # every hop trusted: first


def test_token_cache_expires_forgets_and_is_bounded() -> None:
    from evc.auth import TokenCache

    clock = [100.0]
    cache = TokenCache(5.0, size=2, clock=lambda: clock[0])
    rec = cast(Any, {"id": "tok_1", "scopes": ["admin"]})
    cache.put("h1", rec)
    assert cache.get("h1") == rec and cache.get("h2") is None
    clock[0] += 5.0
    assert cache.get("h1") is None  # expired
    cache.put("h1", rec)
    cache.forget("h1")
    assert cache.get("h1") is None
    for h in ("a", "b", "c"):
        cache.put(h, rec)
    assert cache.get("a") is None and cache.get("c") == rec  # the oldest went first
    off = TokenCache(0.0)
    off.put("h", rec)
    assert off.get("h") is None
