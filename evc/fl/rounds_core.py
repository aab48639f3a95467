"""The shared part of the round engine (:class:`evc.fl.orchestrator.Rounds`): its store,
settings and dispatcher, how a job ends (finished, stopped, failed), and per-process caches
of job specs, global models and test sets."""

from __future__ import annotations

import logging
import statistics
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evc import pool as pooling
from evc.errors import ConfigError, EVCError
from evc.fl import channels
from evc.fl.checkpoint import load_checkpoint
from evc.fl.data import load_shard
from evc.fl.jobspec import BUILTIN_TEST_SETS, Dispatcher, FLSpec, checkpoint_dir, default_owner, evaluation_dir
from evc.fl.models import is_device_model, load_model
from evc.jobs import JobRun
from evc.model import BETWEEN_ROUNDS, IN_ROUND, EventType, FLPhase, FLState, JobState
from evc.settings import Settings
from evc.store import JSON, Store

log = logging.getLogger(__name__)


@dataclass
class RoundsCore:
    """What every part of the engine shares (see :class:`evc.fl.orchestrator.Rounds`)."""

    store: Store
    settings: Settings
    dispatch: Dispatcher
    owner: str = field(default_factory=default_owner)

    def start_round(self, job_id: str, round: int) -> str:
        """Select round *round*'s devices and dispatch it (:class:`~evc.fl.orchestrator.Rounds`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ endings
    def _finish(self, run: JobRun, spec: FLSpec) -> None:
        records = self.store.fl_rounds(run.id)
        last = records[-1] if records else {}
        durations = [r["duration_s"] for r in records]
        summary = {
            "rounds": len(records),
            "accuracy": last.get("eval_accuracy"),
            "loss": last.get("eval_loss"),
            "train_loss": last.get("train_loss"),
            "median_round_s": statistics.median(durations) if durations else None,
            "client_starts": sum(int(r.get("client_starts") or 0) for r in records),
        }
        if spec.export:
            summary.update(self._export(run, spec.export))
        self.store.fl_cas(run.id, {}, phase=FLPhase.DONE)
        self.store.fl_deactivate(run.id)
        run.succeed(summary, message=f"finished {spec.rounds} rounds")
        self._close_channels(run.id)

    def _export(self, run: JobRun, target: Mapping[str, str]) -> JSON:
        """Register the finished model (the job's ``export``) on behalf of whoever submitted the
        job: ``{"exported": version}``, or ``{"export_error": why}`` (the training stands)."""
        from evc.context import Context
        from evc.fl import export as fl_export

        ctx = Context(self.store, self.settings).acting_as(str(run.job.get("created_by") or "evc:fl"))
        try:
            rec, _ = fl_export.export(ctx, run.id, target["name"], target["version"], finished=False)
        except EVCError as exc:
            run.event(f"export to {target['name']}:{target['version']} failed: {exc.message}", type=EventType.FL)
            return {"export_error": exc.message}
        keep = ("name", "version", "sha256", "accuracy")
        run.event(f"registered the model as {rec['name']}:{rec['version']}", type=EventType.FL)
        return {"exported": {k: rec.get(k) for k in keep}}

    def _stop(self, run: JobRun, why: str) -> None:
        self.store.fl_cas(run.id, {"phase": [*BETWEEN_ROUNDS, *IN_ROUND]},
                          phase=FLPhase.STOPPED)  # fmt: skip
        self.store.fl_deactivate(run.id)
        run.cancel({"stopped": why, "rounds": len(self.store.fl_rounds(run.id))})
        run.event(why, type=EventType.FL)
        self._close_channels(run.id)

    def fail_job(self, run: JobRun, exc: EVCError, st: FLState | None = None) -> None:
        """Fail the job with *exc*; a round in flight is discarded (resume restarts it)."""
        changes: JSON = {"phase": FLPhase.FAILED}
        if st is not None and st.get("token"):
            changes["next_round"] = int(st["round"])
            self.store.fl_drop_round(run.id, str(st["token"]))
        self.store.fl_cas(run.id, {}, **changes)
        self.store.fl_deactivate(run.id)
        run.fail(exc, {"rounds": len(self.store.fl_rounds(run.id))})
        self._close_channels(run.id)

    def _close_channels(self, job_id: str) -> None:
        """Close the job's channels in this process (other processes' reapers close theirs)."""
        for reg in channels.local_registries():
            try:
                pooling.call(reg.close_job(job_id), 5.0)
            except Exception:  # noqa: BLE001 - the reaper closes what this misses
                log.debug("closing FL channels of %s failed", job_id, exc_info=True)

    # ------------------------------------------------------------------ helpers
    def _late_reply(self, job_id: str, device_id: str, item: JSON) -> None:
        self.store.fl_add_late(job_id, {
            "round": _round_of(item.get("id")), "device": device_id,
            "reason": "the device answered after its round's deadline; the update was discarded",
        })  # fmt: skip

    def _job_alive(self, job_id: str) -> bool:
        return self.store.job_state(job_id) == JobState.RUNNING

    def _spec(self, job_id: str) -> FLSpec:
        spec = _specs.get(job_id)
        if spec is None:
            spec = FLSpec.from_params(self.store.get_job(job_id)["params"])
            _remember(_specs, job_id, spec)
        return spec

    def _global_params(self, job_id: str, round: int) -> list[np.ndarray]:
        key = (str(checkpoint_dir(self.settings)), job_id, round)
        params = _globals.get(key)
        if params is None:
            params = load_checkpoint(checkpoint_dir(self.settings), job_id, round).params
            _remember(_globals, key, params)
        return params

    def _evaluate(self, spec: FLSpec, params: Sequence[np.ndarray]) -> dict[str, Any] | None:
        if not spec.test_set or is_device_model(spec.model):
            return None  # a module model is device code: never evaluated (run) here
        try:
            X, y = load_test_set(self.settings, spec.test_set)
            return load_model(spec.model, n_features=X.shape[1], n_classes=spec.n_classes
                              ).evaluate(params, X, y)  # fmt: skip
        except (EVCError, ValueError) as exc:
            log.warning("evaluating on test set %r failed: %s", spec.test_set, exc)
            return None

    @staticmethod
    def _record_metrics(job_id: str, record: JSON) -> None:
        hook = pooling.optional_metric("record_fl_round")
        if hook is None:
            return
        try:
            hook(job_id, record["round"], record["num_clients"], record["duration_s"],
                 record["eval_accuracy"])  # fmt: skip
        except Exception:  # noqa: BLE001 - metrics never break a round
            log.debug("record_fl_round failed", exc_info=True)


# ---------------------------------------------------------------------- per-process caches
_cache_lock = threading.Lock()  # a threads-pool worker runs many round tasks per process
_specs: OrderedDict[str, FLSpec] = OrderedDict()
_globals: OrderedDict[tuple[str, str, int], list[np.ndarray]] = OrderedDict()
_test_sets: OrderedDict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = OrderedDict()


def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any, size: int = 16) -> None:
    with _cache_lock:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > size:
            cache.popitem(last=False)


def _round_of(request_id: object) -> int | None:
    """The round of a fit request id ``<round>-<hex>:<device>``."""
    try:
        return int(str(request_id).split("-", 1)[0])
    except ValueError:
        return None


def load_test_set(settings: Settings, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A server-side test set: ``<data_dir>/fl/test-sets/<name>.npz`` (written by the
    partition helper), or the built-in reference split ``digits``."""
    key = (str(settings.data_dir), name)
    cached = _test_sets.get(key)
    if cached is not None:
        return cached
    path = evaluation_dir(settings) / f"{name}.npz"
    if path.is_file():
        X, y = load_shard(path)
    elif name in BUILTIN_TEST_SETS:
        from evc.fl.data import load_reference_digits

        ds = load_reference_digits()
        X, y = ds.X_test, ds.y_test
    else:
        raise ConfigError(f"no test set {name!r} in {evaluation_dir(settings)}")
    _remember(_test_sets, key, (X, y), size=4)
    return X, y
