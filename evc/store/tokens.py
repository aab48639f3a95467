"""Credentials: operator tokens (and the first admin token's bootstrap), enrollment tokens."""

from __future__ import annotations

import json
from typing import Any

from evc.errors import Conflict, NotFound
from evc.model import JSON, Enrollment, Token
from evc.store import scripts
from evc.store._base import ENROLLMENT, TOKEN, StoreBase, _text, dump_value, now

_json = dump_value  # a field's value as the store writes it


_SCRIPT_COMMANDS = frozenset(("EVAL", "EVALSHA"))
_TEXT, _WORDS = frozenset((str,)), frozenset((str, int, float))


def _command_words(stack: Any) -> str | None:
    """A pipeline's queued commands as one JSON array of arrays of words, each word the text
    redis-py would send (numbers as their ``repr``); None when a word is something else
    (bytes, a bool...) or a command is a script: those go through the pipeline itself."""
    out = []
    for args, _ in stack:
        name = args[0]
        if type(name) is not str or " " in name or name.upper() in _SCRIPT_COMMANDS:
            return None
        types = set(map(type, args))  # exact types: a bool is not a number here
        if types <= _TEXT:  # most commands: keys and stored values
            out.append(args)
        elif types <= _WORDS:
            out.append([a if type(a) is str else repr(a) for a in args])
        else:
            return None
    return json.dumps(out, ensure_ascii=False)


class TokenStore(StoreBase):
    # ------------------------------------------------------------------ token lookup
    def resolve_token(self, index: str, kind: str, token_hash: str) -> JSON | None:
        """The record the token hash names (one round trip), or None."""
        raw = self._script(scripts.RESOLVE)(keys=[self.k(index, token_hash)], args=[self.k(kind) + ":"])
        if not raw:
            return None
        it = iter(raw)
        return {k.decode(): json.loads(v) for k, v in zip(it, it, strict=True)}

    def commit_as_token(self, pipe: Any, token_hash: str, token: JSON) -> bool:
        """Run what is queued on *pipe* (a request's unit of work) in one atomic script, only
        while operator token *token* (a record the API cached) is unchanged: still indexed by
        *token_hash*, not revoked, the same scopes and expiry. One round trip, the token's check
        included. False with nothing written, *pipe* untouched, when the token changed or *pipe*
        holds what the script cannot run (a script, or a word that is not text or a number):
        the caller checks the token and executes *pipe* itself."""
        if pipe.scripts:
            return False
        words = _command_words(pipe.command_stack)
        if words is None:
            return False
        argv = [token["id"], _json(token.get("scopes")), _json(token.get("expires_at")), words]
        keys = [self.k("token-hash", token_hash), self.k("token", token["id"])]
        if not self._script(scripts.COMMIT_AS_TOKEN)(keys=keys, args=argv):
            return False
        pipe.reset()
        return True

    # ------------------------------------------------------------------ operator tokens
    def claim_bootstrap(self) -> bool:
        """True once per store: the first caller creates the first admin token."""
        return bool(self._redis.setnx(self.k("bootstrap"), "1"))

    def create_token(self, tok: Token, token_hash: str) -> Token:
        stored: Token = {**tok, "hash": token_hash}
        self._put(TOKEN, stored)
        self._redis.set(self.k("token-hash", token_hash), tok["id"])
        return tok

    def token_by_hash(self, token_hash: str) -> Token | None:
        tok_id = self._redis.get(self.k("token-hash", token_hash))
        if not tok_id:
            return None
        try:
            return self._get(TOKEN, tok_id.decode())
        except NotFound:
            return None

    def get_token(self, token_id: str) -> Token:
        return self._get(TOKEN, token_id)

    def update_token(self, token_id: str, **changes: Any) -> Token:
        return self._update(TOKEN, token_id, changes)

    def revoke_token(self, token_id: str) -> Token:
        """Revoke an operator token, atomically refusing to revoke the last usable admin token."""
        res = _text(
            self._script(scripts.REVOKE_TOKEN)(
                keys=[self.k("tokens"), self.k("token", token_id)],
                args=[self.k("token") + ":", token_id, now(), json.dumps(now())],
            )
        )
        if res == "missing":
            raise NotFound(f"token {token_id} not found", id=token_id)
        if res == "last_admin":
            raise Conflict(
                "this is the last admin token: create another admin token before revoking it "
                "(an operator with access to the data directory can recover with `evc bootstrap --reset-admin`)",
                id=token_id,
            )
        return self._get(TOKEN, token_id)

    def list_tokens(self, offset: int = 0, limit: int = 50) -> tuple[list[Token], int]:
        return self._page(TOKEN, offset, limit, newest_first=False)

    # ------------------------------------------------------------------ enrollment tokens
    def create_enrollment(self, enr: Enrollment, token_hash: str) -> Enrollment:
        stored: Enrollment = {**enr, "hash": token_hash}
        self._put(ENROLLMENT, stored)
        self._redis.set(self.k("enrollment-hash", token_hash), enr["id"])
        return enr

    def enrollment_by_hash(self, token_hash: str) -> Enrollment | None:
        enr_id = self._redis.get(self.k("enrollment-hash", token_hash))
        if not enr_id:
            return None
        try:
            return self._get(ENROLLMENT, enr_id.decode())
        except NotFound:
            return None

    def get_enrollment(self, enrollment_id: str) -> Enrollment:
        return self._get(ENROLLMENT, enrollment_id)

    def consume_enrollment(self, enrollment_id: str) -> str:
        return _text(self._script(scripts.CONSUME)(keys=[self.k("enrollment", enrollment_id)], args=[now()]))

    def update_enrollment(self, enrollment_id: str, **changes: Any) -> Enrollment:
        return self._update(ENROLLMENT, enrollment_id, changes)

    def list_enrollments(self, offset: int = 0, limit: int = 50) -> tuple[list[Enrollment], int]:
        return self._page(ENROLLMENT, offset, limit)
