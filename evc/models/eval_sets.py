"""Evaluation sets kept for quantization jobs (``.npz`` files with ``X`` and ``y``).

An evaluation set uploaded with ``POST /models/{name}/versions/{v}/quantize`` is kept (a blob,
content-addressed like models, in the same storage) so that later jobs can name it by digest
(``eval_set_sha256``) instead of uploading it again. They are listed and deleted here; a set
that a queued or running quantization job uses cannot be deleted (409).
"""

from __future__ import annotations

from evc.context import Context
from evc.errors import Conflict, NotFound
from evc.model import ACTIVE_JOB_STATES, JSON, JobKindName
from evc.models import registry


def list_sets(ctx: Context) -> list[JSON]:
    return ctx.store.eval_sets()


def get(ctx: Context, digest: str) -> JSON:
    rec = ctx.store.get_eval_set(digest.removeprefix("sha256:"))
    if rec is None:
        raise NotFound(f"no evaluation set sha256:{digest} is stored", sha256=digest)
    return rec


def delete(ctx: Context, digest: str) -> JSON:
    """Forget evaluation set *digest* and free its blob (refused while a job uses it)."""
    rec = get(ctx, digest)
    for state in ACTIVE_JOB_STATES:
        jobs, _ = ctx.store.list_jobs(kind=str(JobKindName.MODEL_QUANTIZE), state=str(state), limit=500)
        users = [j["id"] for j in jobs if (j.get("params") or {}).get("eval_set") == rec["sha256"]]
        if users:
            raise Conflict(f"evaluation set sha256:{rec['sha256']} is used by job {users[0]}; try again after it")
    registry.storage(ctx).release(ctx.store, rec["sha256"], registry.EVAL_SETS, rec.get("storage"))
    ctx.store.delete_eval_set(rec["sha256"])
    ctx.store.audit(ctx.actor, "model.eval-set.delete", rec["sha256"], size=rec.get("size"))
    return rec


__all__ = ["delete", "get", "list_sets"]
