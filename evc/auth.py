"""Bearer tokens: operator tokens with scopes, device tokens, enrollment tokens; hashed at rest."""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from evc.choices import SCOPES
from evc.context import NO_QUEUE, Caller, Context
from evc.errors import AuthError, ConfigError, Forbidden, NotFound, RateLimited
from evc.model import Enrollment, PrincipalKind, Scope, Token
from evc.settings import Settings
from evc.store import Store, new_id, now

PREFIX_OPERATOR = "evco_"
PREFIX_DEVICE = "evcd_"
PREFIX_ENROLL = "evce_"
#: how much of a token is kept in clear to tell tokens apart (and to count failures by)
TOKEN_PREFIX_LEN = 10


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def make_token(prefix: str, nbytes: int = 32) -> str:
    return prefix + secrets.token_urlsafe(nbytes)


@dataclass(frozen=True)
class Principal:
    """Who is calling: an operator token, a device (its token), or an enrollment token."""

    kind: str  # a PrincipalKind: operator, device or enrollment
    id: str
    name: str = ""
    scopes: frozenset[str] = field(default_factory=frozenset)

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name or self.id}"

    def allows(self, scope: str) -> bool:
        if self.kind != PrincipalKind.OPERATOR:
            return False
        return Scope.ADMIN in self.scopes or scope in self.scopes


def create_operator_token(
    ctx: Context, name: str, scopes: list[str], *, expires_at: float | None = None
) -> tuple[Token, str]:
    """An operator token named *name* with *scopes*, created by the context's caller (shown
    once: the store keeps its hash)."""
    store, settings = ctx.store, ctx.settings
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        from evc.errors import ValidationError

        raise ValidationError(f"scopes must be a non-empty subset of {list(SCOPES)}", field="scopes")
    token = make_token(PREFIX_OPERATOR, settings.token_bytes)
    rec: Token = {
        "id": new_id("tok"), "name": name, "scopes": sorted(set(scopes)), "created_at": now(),
        "created_by": ctx.actor, "revoked": False, "expires_at": expires_at, "last_used_at": None,
        "prefix": token[:TOKEN_PREFIX_LEN],
    }  # fmt: skip
    store.create_token(rec, hash_token(token))
    return rec, token


def revoke_operator_token(store: Store, token_id: str) -> Token:
    """Revoke an operator token; the last usable admin token cannot be revoked (409)."""
    return store.revoke_token(token_id)


def create_enrollment(
    ctx: Context,
    *,
    ttl_s: int | None,
    max_uses: int | None,
    labels: dict[str, str] | None,
    allow_networks: list[str] | None = None,
) -> tuple[Enrollment, str]:
    """An enrollment token created by the context's caller; *allow_networks* (CIDRs) limits
    what it may register (see :mod:`evc.enrollment`)."""
    from evc.enrollment import parse_networks

    store, settings, created_by = ctx.store, ctx.settings, ctx.actor

    networks = [str(n) for n in parse_networks(allow_networks or [])]
    token = make_token(PREFIX_ENROLL, settings.token_bytes)
    ttl = ttl_s or settings.enrollment_ttl_s
    rec: Enrollment = {
        "id": new_id("enr"), "created_at": now(), "expires_at": now() + ttl,
        "uses_left": max_uses or settings.enrollment_max_uses,
        "max_uses": max_uses or settings.enrollment_max_uses, "labels": labels or {},
        "allow_networks": networks,
        "created_by": created_by, "revoked": False, "prefix": token[:TOKEN_PREFIX_LEN],
    }  # fmt: skip
    store.create_enrollment(rec, hash_token(token))
    return rec, token


_ENROLL_REASONS = {
    "expired": "this enrollment token has expired; ask an operator for a new one",
    "used_up": "this enrollment token has been used the maximum number of times",
    "revoked": "this enrollment token was revoked",
    "missing": "unknown enrollment token",
}


_INDEX = {
    PREFIX_OPERATOR: ("token-hash", "token"),
    PREFIX_DEVICE: ("device-token", "device"),
    PREFIX_ENROLL: ("enrollment-hash", "enrollment"),
}


class TokenCache:
    """Operator-token records an API process resolved in the last *ttl_s* seconds, by token
    hash: a request that finds its token here needs no lookup round trip, and what it writes is
    committed only while the token is unchanged (:meth:`evc.store.Store.commit_as_token`), so a
    token revoked meanwhile writes nothing. Bounded: the oldest entry goes first."""

    def __init__(self, ttl_s: float, size: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.size, self.clock = ttl_s, size, clock
        self._entries: dict[str, tuple[float, Token]] = {}

    def get(self, digest: str) -> Token | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            self._entries.pop(digest, None)
            return None
        return entry[1]

    def put(self, digest: str, rec: Token) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._entries) >= self.size:
            self._entries.pop(next(iter(self._entries)))
        self._entries[digest] = (self.clock() + self.ttl_s, rec)

    def forget(self, digest: str) -> None:
        self._entries.pop(digest, None)


@dataclass(frozen=True)
class Deferred:
    """A principal taken from a :class:`TokenCache`: its token's check is the commit's."""

    token_hash: str
    token: Token


def authenticate(store: Store, settings: Settings, header: str | None, client: str = "") -> Principal:
    """Resolve an ``Authorization: Bearer ...`` header to a principal, or raise AuthError.

    Tokens are looked up by their SHA-256 (the store keeps no plaintext); the comparison of the
    stored hash is constant-time. Failed attempts are counted per client address and per
    presented-token prefix; past the limit a failure answers 429. A valid token is never
    refused, however many others failed."""
    return authenticate_deferred(store, settings, header, client)[0]


def authenticate_deferred(
    store: Store, settings: Settings, header: str | None, client: str = "", cache: TokenCache | None = None
) -> tuple[Principal, Deferred | None]:
    """:func:`authenticate`, an operator token taken from *cache* when it is there (then with
    a :class:`Deferred`: the caller must commit through
    :meth:`~evc.store.Store.commit_as_token`), else resolved (and put in *cache*)."""
    if not header or not header.startswith("Bearer "):
        raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
    token = header[7:].strip()
    digest = hash_token(token)
    index, kind = _INDEX.get(token[:5], ("token-hash", "token"))
    cache = cache if kind == "token" else None
    cached = cache.get(digest) if cache is not None else None
    rec: Any = cached or store.resolve_token(index, kind, digest)
    if cache is not None and cached is None and rec and not rec.get("revoked"):
        cache.put(digest, rec)
    principal: Principal | None = None
    stored = (rec or {}).get("token_hash" if kind == "device" else "hash", "")
    if rec and hmac.compare_digest(stored, digest):
        if kind == "token":
            if rec.get("revoked"):
                _fail(store, settings, client, token, "this token has been revoked")
            if rec.get("expires_at") and rec["expires_at"] < now():
                _fail(store, settings, client, token, "this token has expired")
            principal = Principal(PrincipalKind.OPERATOR, rec["id"], rec.get("name", ""), frozenset(rec["scopes"]))
        elif kind == "device":
            principal = Principal(PrincipalKind.DEVICE, rec["id"], rec.get("name", ""))
        else:
            principal = Principal(PrincipalKind.ENROLLMENT, rec["id"])
    if principal is None:
        _fail(store, settings, client, token, "invalid token")
    return principal, Deferred(digest, cached) if cached is not None else None


def _fail(store: Store, settings: Settings, client: str, token: str, message: str) -> NoReturn:
    """Count a failed authentication (per source, per token prefix) and refuse it: 401, or 429
    once either counter is past the limit in this window."""
    counters = [f"authfail:prefix:{hash_token(token[:TOKEN_PREFIX_LEN])[:16]}"]
    if client:
        counters.append(f"authfail:src:{client}")
    counts = store.hit_many(counters, settings.auth_fail_window_s)
    if max(counts) > settings.auth_fail_limit:
        raise RateLimited(
            "too many failed authentications from this address or with this token prefix; "
            f"wait {settings.auth_fail_window_s}s (valid tokens still work)",
            retry_after=settings.auth_fail_window_s,
        )
    raise AuthError(message)


def client_address(remote_addr: str, forwarded_for: str | None, trusted_proxies: str) -> str:
    """The caller's address: *remote_addr*, or — only when that is a trusted proxy — the
    nearest address in ``X-Forwarded-For`` that is not itself a trusted proxy."""
    nets = _networks(trusted_proxies)
    if not nets or not forwarded_for or not _in(remote_addr, nets):
        return remote_addr
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return remote_addr  # a malformed hop: trust nothing further
        if not _in(hop, nets):
            return hop
    return hops[0] if hops else remote_addr


@functools.lru_cache(maxsize=16)  # the setting, parsed once per process (not every request)
def _networks(spec: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in spec.split(",") if p.strip())
    except ValueError as exc:
        raise ConfigError(f"setting trusted_proxies: {exc}") from exc


def _in(addr: str, nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in n for n in nets)


def check_scope(principal: Principal, scope: str) -> None:
    if principal.kind == PrincipalKind.DEVICE:
        raise Forbidden("a device token cannot be used on operator endpoints")
    if principal.kind == PrincipalKind.ENROLLMENT:
        raise Forbidden("an enrollment token can only register devices")
    if not principal.allows(scope):
        raise Forbidden(f"this token lacks the {scope!r} scope")


def use_enrollment(store: Store, principal: Principal) -> Enrollment:
    """Spend one use of an enrollment token; raise with the reason when it cannot be used."""
    result = store.consume_enrollment(principal.id)
    if result != "ok":
        raise AuthError(_ENROLL_REASONS.get(result, "enrollment token refused"), reason=result)
    try:
        return store.get_enrollment(principal.id)
    except NotFound as exc:  # pragma: no cover - removed in between
        raise AuthError("unknown enrollment token") from exc


def ensure_admin_token(store: Store, settings: Settings) -> str | None:
    """Create the first admin token when none exists; returns it (shown once) or None."""
    if store.claim_bootstrap():
        rec, token = create_operator_token(_as(store, settings, "bootstrap"), "admin", [Scope.ADMIN])
        _write_admin_token(settings, token)
        return token
    return None


def reset_admin_token(store: Store, settings: Settings) -> Token:
    """Recovery for an operator who lost or revoked every admin token: a new admin token,
    written to <data_dir>/admin-token (mode 0600), replacing the file. Whoever can run this
    can read the data directory and reach Redis, which is the trust an admin token gives."""
    rec, token = create_operator_token(_as(store, settings, "bootstrap --reset-admin"), "admin", [Scope.ADMIN])
    _write_admin_token(settings, token)
    store.audit("bootstrap", "token.reset-admin", rec["id"])
    return rec


def _as(store: Store, settings: Settings, actor: str) -> Context:
    """A context acting as *actor* with no job queue (the CLI's bootstrap enqueues nothing)."""
    return Context(store, settings, NO_QUEUE, Caller(actor))


def _write_admin_token(settings: Settings, token: str) -> None:
    from evc.embedded import write_private

    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(settings.data_dir / "admin-token", token + "\n")


def public_token(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k != "hash"}
