"""One typed, frozen settings object: defaults -> optional file -> ``EVC_*`` environment."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from evc.errors import ConfigError

ENV_PREFIX = "EVC_"


@dataclass(frozen=True)
class Settings:
    """Everything EVC can be configured with. Build with :func:`load_settings`."""

    # Redis: empty means "start a private embedded Redis" (evc up only).
    redis_url: str = ""
    redis_sentinels: str = ""  # "host:port,host:port" -> Sentinel mode with redis_sentinel_master
    redis_sentinel_master: str = "mymaster"
    key_prefix: str = "evc"
    data_dir: Path = Path.home() / ".local" / "share" / "evc"
    api_bind: str = "127.0.0.1:8080"
    public_url: str = ""  # how devices/CLI reach the API; defaults to http://<api_bind>
    cors_origins: str = ""  # empty: CORS off
    instance_id: str = ""  # a random value `evc up` gives its API (/healthz returns it) to know it is its own
    # tokens
    token_bytes: int = 32
    enrollment_ttl_s: int = 3600
    enrollment_max_uses: int = 10
    auth_fail_limit: int = 20  # failed authentications per client per window
    auth_fail_window_s: int = 60
    # an API process reuses an operator token it resolved for this long, on the endpoints whose
    # writes all go through the request's unit of work (job submission); the commit re-checks
    # the token atomically, so a revoked token writes nothing. 0: resolve on every request
    auth_cache_s: float = 5.0
    # proxies (IPs or CIDRs, comma separated) whose X-Forwarded-For is believed; empty: none
    trusted_proxies: str = ""
    # the web console (/ui): a session lasts this long after its last use
    console_session_ttl_s: int = 8 * 3600
    # jobs
    idempotency_ttl_s: int = 86400
    job_lease_s: float = 30.0  # a running job's worker renews its lease; an expired lease means the worker died
    job_max_attempts: int = 3  # a job whose worker was lost this many times fails ("worker lost N times")
    job_history: int = 100_000
    job_retention_s: float = 7 * 86400.0  # finished jobs (events, results, FL records) are deleted after this
    job_prune_interval_s: float = 3600.0  # how often beat runs the retention cleanup
    job_republish_after_s: float = 60.0  # a job queued this long with no message in the broker is re-published
    audit_history: int = 100_000
    # SSH
    ssh_connect_timeout_s: float = 10.0
    ssh_command_timeout_s: float = 60.0
    ssh_retries: int = 2
    # cipher preference (the client's order decides): AES-GCM is one AEAD call with AES-NI/ARMv8
    # crypto; put chacha20-poly1305@openssh.com first for fleets of boards without AES hardware
    ssh_ciphers: str = (
        "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr"
    )
    # celery
    task_soft_time_limit_s: int = 600
    task_time_limit_s: int = 660
    worker_concurrency: int = 4
    # playbooks
    playbook_dirs: str = ""  # extra operator playbook directories, os.pathsep separated
    # simulated devices only (they share this machine's filesystem): the playbooks write system
    # paths (/etc, /usr/local, /var/lib/evc) under <device_sysroot>/<device id>, as DESTDIR
    # does, and leave the machine's user database alone. Empty (real devices): the real paths
    device_sysroot: str = ""
    ansible_forks: int = 20
    # health
    health_interval_s: float = 60.0
    health_concurrency: int = 200
    health_degraded_after: int = 1
    health_offline_after: int = 3
    health_load_per_cpu_threshold: float = 2.0  # 1-minute load average divided by the device's CPUs
    health_disk_threshold: float = 0.95
    health_mem_threshold: float = 0.95
    health_temp_threshold_c: float = 85.0
    health_recover_after: int = 2  # consecutive good checks to leave offline (hysteresis)
    health_timeout_s: float = 10.0  # one device's health command
    ssh_backoff_s: float = 2.0  # first reconnect delay after a failed connect; doubles per failure
    ssh_backoff_max_s: float = 300.0
    webhook_url: str = ""
    webhook_timeout_s: float = 3.0
    # monitoring
    metrics_dir: str = ""  # prometheus_client multiprocess dir; empty: single process
    exporter_port: int = 9110
    # federated learning
    fl_channel_idle_s: float = 300.0  # close a device's FL client channel unused this long
    # model registry (blobs under <data_dir>/models: the API and the workers share the data dir)
    model_max_upload_bytes: int = 512 * 1024 * 1024  # a larger model or evaluation set upload is a 413
    # where model files are kept: "embedded" (<data_dir>/models) or "oci" (the registry below)
    model_storage: str = "embedded"
    model_registry_url: str = ""  # https://host:port (http:// only with model_registry_insecure)
    model_registry_repository: str = "evc/models"  # repository prefix: <prefix>/<model name>:<version>
    model_registry_credentials: str = "model-registry.json"  # in data_dir: {"username": ..., "password": ...}
    model_registry_insecure: bool = False  # allow plain HTTP (a registry on loopback)
    # registries (host:port, comma separated; "*": any) versions may also be registered from by
    # reference, besides model_registry_url's
    model_registry_pull_hosts: str = ""
    model_registry_timeout_s: float = 30.0
    # inference (data sets and results under <data_dir>/inference, shared like the models)
    inference_dataset_max_bytes: int = 256 * 1024 * 1024  # a larger data set upload is a 413
    inference_request_max_bytes: int = 64 * 1024 * 1024  # a larger POST /deployments/{id}/infer is a 413
    inference_timeout_s: float = 60.0  # one request to an edge server (a chunk, a routed request)
    # deployments with runtime "container": the edge server's image (scripts/build-edge-images),
    # e.g. 10.0.0.5:5000/evc-edge-infer:0.1.0@sha256:...; empty: localhost/evc-edge-infer:<version>
    edge_image: str = ""
    edge_image_tls_verify: bool = True  # False: pull it over plain HTTP (podman --tls-verify=false)

    @property
    def api_url(self) -> str:
        return self.public_url.rstrip("/") or f"http://{self.api_bind}"

    @property
    def key_path(self) -> Path:
        return self.data_dir / "ssh" / "id_ed25519"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def extra_playbook_dirs(self) -> list[Path]:
        return [Path(p) for p in self.playbook_dirs.split(os.pathsep) if p]


def _coerce(name: str, typ: Any, raw: Any) -> Any:
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            return str(raw).strip().lower() in {"1", "true", "yes", "on"}
        if typ is Path:
            return Path(str(raw)).expanduser()
        return typ(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: cannot read {raw!r} as {typ.__name__}") from exc


def load_settings(
    file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Defaults, then a JSON/TOML file (``EVC_CONFIG`` or *file*), then ``EVC_*`` variables."""
    env = os.environ if env is None else env
    hints = get_type_hints(Settings)
    values: dict[str, Any] = {}
    path = file or env.get(ENV_PREFIX + "CONFIG")
    if path:
        values.update(_read_file(Path(path)))
    for f in fields(Settings):
        key = ENV_PREFIX + f.name.upper()
        if key in env:
            values[f.name] = env[key]
    values.update(overrides)
    known = {f.name for f in fields(Settings)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    return Settings(**{k: _coerce(k, hints[k], v) for k, v in values.items()})


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc.strerror}") from exc
    if path.suffix == ".toml":
        import tomllib

        data: Any = tomllib.loads(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError(f"settings file {path} must hold a mapping")
    return data


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``EVC_*`` environment that reproduces *settings* in a child process."""
    out: dict[str, str] = {}
    for f in fields(Settings):
        out[ENV_PREFIX + f.name.upper()] = str(getattr(settings, f.name))
    return out


__all__ = ["Settings", "load_settings", "settings_env", "field"]
