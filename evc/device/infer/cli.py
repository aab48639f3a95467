"""Command line of the edge inference server: ``python -m evc.device.infer --models-dir DIR``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Sequence

from . import __version__
from .metrics import InferMetrics
from .repository import Repository
from .server import DEFAULT_MAX_BODY, InferServer

log = logging.getLogger(__name__)

DEFAULT_PORT = 8000  # the Open Inference Protocol's customary HTTP port (Triton, KServe)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evc-edge-infer",
        description="EVC edge inference server: ONNX models over the Open Inference Protocol (KServe v2 REST).",
    )
    p.add_argument(
        "--models-dir", required=True, type=Path, help="folder of <name>/<version>/model.onnx (+ model.json)"
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")  # noqa: S104
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("EVC_INFER_THREADS") or 0),
        help="ONNX Runtime intra-op threads per model (default $EVC_INFER_THREADS, else 0: its default)",
    )
    p.add_argument(
        "--provider",
        action="append",
        default=[],
        metavar="NAME",
        help="ONNX Runtime execution provider, in order of preference; repeat (default: CUDA if present, then CPU)",
    )
    p.add_argument(
        "--max-body-mb", type=float, default=DEFAULT_MAX_BODY / 2**20, help="largest request body in MiB (default 64)"
    )
    p.add_argument("--grace", type=float, default=10.0, help="seconds requests in progress get to finish on SIGTERM")
    p.add_argument(
        "--builtin-metrics", action="store_true", help="do not use prometheus_client even if it is installed"
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def default_providers() -> Sequence[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or list(available)


def session_options(threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not ns.models_dir.is_dir():
        log.error("no models folder %s", ns.models_dir)
        return 2
    repo = Repository(ns.models_dir, session_options(ns.threads), ns.provider or default_providers())
    metrics = InferMetrics(__version__, use_prometheus_client=not ns.builtin_metrics)
    server = InferServer(repo, metrics, ns.host, ns.port, int(ns.max_body_mb * 2**20))

    stop, rescan = threading.Event(), threading.Event()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        rescan.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hup)
    try:
        port = server.start()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", ns.host, ns.port, exc)
        return 1
    versions = repo.versions()
    log.info(
        "EVC edge inference server %s listening on %s:%s, %d model version(s), %d ready, metrics: %s",
        __version__,
        ns.host,
        port,
        len(versions),
        sum(1 for mv in versions if mv.ready),
        metrics.backend,
    )
    while not stop.wait(1.0):
        if rescan.is_set():
            rescan.clear()
            log.info("SIGHUP: rescanning %s", ns.models_dir)
            server.reload()
    log.info("stopping: letting requests in progress finish (at most %.0f s)", ns.grace)
    if not server.stop(ns.grace):
        log.warning("some requests were still running after %.0f s", ns.grace)
    log.info("stopped")
    return 0
