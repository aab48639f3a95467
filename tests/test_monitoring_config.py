"""Monitoring configuration, checked by Prometheus itself, and EVC's own metrics.

promtool validates prometheus.yml and the rules and unit-tests every alert; a real Prometheus
scrapes a real edge exporter and EVC's metrics endpoint, evaluates every dashboard query and
every alert expression, and fires EVCDeviceDown when the exporter stops.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest, start_http_server
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from evc import metrics
from evc.device.exporter.cli import ExporterConfig, build_exporter, make_registry
from evc.device.exporter.gpu import TegrastatsCollector
from evc.recommend.metrics import RecommendCollector
from tests.fixtures.prometheus import (
    EdgeExporterProcess,
    PrometheusAPIError,
    PrometheusServer,
    edge_exporter,  # noqa: F401 - a fixture
    fake_nvidia_smi,
    fake_sys_root,
    fake_tegrastats,
    free_port,
    promtool,  # noqa: F401 - a fixture
    require_binary,
    rewrite_rule_durations,
    start_prometheus,  # noqa: F401 - a fixture
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "rules" / "evc.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = GRAFANA / "dashboards"

ALERTS = {
    "EVCDeviceDown", "EVCDeviceHot", "EVCDiskAlmostFull", "EVCMemoryPressure",
    "EVCGPUHot", "EVCJobFailureRatio", "EVCQueueBacklog", "EVCWorkerAbsent",
    "EVCInferenceErrors", "EVCInferenceSlow", "EVCInferenceServerDown", "EVCInferenceModelNotReady",
}  # fmt: skip
#: what Grafana puts in place of its variables when a test evaluates a dashboard query
GRAFANA_VARS = {
    "$__rate_interval": "20s",
    "$__interval": "5s",
    "$__range": "5m",
    "$cluster": ".*",
    "$fl_job": ".*",
    "$model": ".*",
}
METRIC_NAME = re.compile(r"^[a-z_:][a-z0-9_:]*$")
UNIT_SUFFIXES = ("_seconds", "_bytes", "_celsius", "_watts", "_hertz", "_ratio")


def rule_docs() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panel_exprs(dash: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            yield panel["title"], t["expr"]


def variable_queries(dash: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            yield var["name"], q


def label_values_parts(query: str) -> tuple[str, str]:
    """``label_values(selector, label)`` -> (selector, label)."""
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
    assert m, f"variable query {query!r} is not label_values(selector, label)"
    return m.group(1), m.group(2)


def substitute(expr: str, device: str) -> str:
    for var, val in sorted({**GRAFANA_VARS, "$device": device}.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, val)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "inf",
    "nan",
}


def metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (enough PromQL for our own expressions)."""
    names = set()
    for alternatives in re.findall(r'__name__=~"([^"]*)"', expr):
        names.update(alternatives.split("|"))
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _GROUPING.sub(" ", s)
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        rest = s[m.end() :].lstrip()
        if m.group() not in _KEYWORDS and not rest.startswith("("):
            names.add(m.group())
    return names


def exposed_names(text: str) -> set[str]:
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def lint_families(families: list[Metric], prefix: str) -> list[str]:
    """Our reading of the Prometheus naming rules; returns the problems found."""
    problems = []
    for f in families:
        name = f.name + "_total" if f.type == "counter" else f.name
        if not METRIC_NAME.match(name) or not name.startswith(prefix):
            problems.append(f"{name}: not a {prefix}* snake_case name")
        if f.type == "counter" and not name.endswith("_total"):
            problems.append(f"{name}: counter without _total")
        if f.type != "counter" and name.endswith("_total"):
            problems.append(f"{name}: _total on a {f.type}")
        if f.type == "histogram" and not name.endswith(UNIT_SUFFIXES):
            problems.append(f"{name}: histogram without a base unit")
        for word, unit in (
            ("temperature", "_celsius"),
            ("duration", "_seconds"),
            ("power", "_watts"),
        ):
            if word in name and not name.endswith(unit):
                problems.append(f"{name}: should end in {unit}")
        for bad in (
            "_milliseconds",
            "_kilobytes",
            "_megabytes",
            "_percent",
            "_mhz",
            "_millicelsius",
        ):
            if bad in name:
                problems.append(f"{name}: not a base unit ({bad})")
        if not f.documentation:
            problems.append(f"{name}: no help text")
        for s in f.samples:
            for label in s.labels:
                if label in ("job", "instance") or label.startswith("__"):
                    problems.append(f"{name}: label {label} clashes with Prometheus' own labels")
    return problems


def promtool_run(binary: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary, *args], capture_output=True, text=True, input=stdin, timeout=60)


def test_missing_prometheus_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install prometheus"):
        require_binary("evc-no-such-prometheus", "EVC_NO_SUCH_PROMETHEUS")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_binary("evc-no-such-prometheus", "EVC_NO_SUCH_PROMETHEUS")


# --- promtool -----------------------------------------------------------------------------------


def test_promtool_check_config(promtool: str) -> None:  # noqa: F811
    out = promtool_run(promtool, "check", "config", str(PROM / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout


def test_promtool_check_rules(promtool: str) -> None:  # noqa: F811
    files = sorted(str(p) for p in (PROM / "rules").glob("*.yml"))
    out = promtool_run(promtool, "check", "rules", *files)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in out.stdout


def test_prometheus_yml_scrapes_evc() -> None:
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert cfg["rule_files"] == ["rules/*.yml"]
    assert jobs["evc-api"]["static_configs"][0]["targets"] == ["evc-api:8080"]
    assert jobs["evc-api"]["metrics_path"] == "/metrics"
    assert jobs["evc-workers"]["metrics_path"] == "/metrics/workers"
    assert jobs["flower"]["static_configs"][0]["targets"][0].endswith(":5555")
    (sd,) = jobs["evc-edge"]["http_sd_configs"]
    assert sd["url"] == "http://evc-api:8080/api/v1/prometheus/targets"
    assert sd["authorization"]["type"] == "Bearer"
    assert sd["authorization"]["credentials_file"]
    assert "credentials" not in sd["authorization"]  # never a token in the file itself
    (infer,) = jobs["evc-infer"]["http_sd_configs"]  # the edge inference servers of deployments
    assert infer["url"] == "http://evc-api:8080/api/v1/prometheus/targets?exporter=infer"
    assert infer["authorization"]["credentials_file"] and jobs["evc-infer"]["honor_labels"] is True


def test_alert_rules_are_complete() -> None:
    rules = rule_docs()
    assert {r["alert"] for r in rules} == ALERTS
    for r in rules:
        assert r["for"] and r["labels"]["severity"] in {"warning", "critical"}
        assert r["annotations"]["summary"] and r["annotations"]["description"]


def _promtool_rule_tests(rules_file: Path) -> dict[str, Any]:
    """promtool unit tests: each alert fires on the series it is about, and only on them."""
    edge = 'job="evc-edge", cluster="c1"'
    zone = 'zone="z0", type="cpu"'

    def s(series: str, values: str) -> dict[str, str]:
        return {"series": series, "values": values}

    def alert(name: str, at: str, *labels: dict[str, str]) -> dict[str, Any]:
        return {
            "eval_time": at,
            "alertname": name,
            "exp_alerts": [{"exp_labels": lab} for lab in labels],
        }

    c1 = {"cluster": "c1"}
    return {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    s(f'up{{{edge}, instance="d1", device="d1"}}', "1 1 0x58"),
                    s(f'up{{{edge}, instance="d2", device="d2"}}', "1x60"),
                    s(
                        f'evc_edge_thermal_zone_temperature_celsius{{{edge}, device="d1", {zone}}}',
                        "90x60",
                    ),
                    s(
                        f'evc_edge_thermal_zone_temperature_celsius{{{edge}, device="d2", {zone}}}',
                        "50x60",
                    ),
                    s(
                        f'evc_edge_jetson_temperature_celsius{{{edge}, device="d3", sensor="gpu"}}',
                        "95x60",
                    ),
                    s(
                        f'evc_edge_jetson_temperature_celsius{{{edge}, device="d3", sensor="cpu"}}',
                        "60x60",
                    ),
                    s(f'evc_edge_gpu_temperature_celsius{{{edge}, device="d4", gpu="0"}}', "90x60"),
                    s(f'evc_edge_gpu_temperature_celsius{{{edge}, device="d4", gpu="1"}}', "60x60"),
                    s(
                        f'evc_edge_filesystem_avail_bytes{{{edge}, device="d1", mountpoint="/"}}',
                        "5x60",
                    ),
                    s(
                        f'evc_edge_filesystem_size_bytes{{{edge}, device="d1", mountpoint="/"}}',
                        "100x60",
                    ),
                    s(
                        f'evc_edge_filesystem_readonly{{{edge}, device="d1", mountpoint="/"}}',
                        "0x60",
                    ),
                    s(
                        f'evc_edge_filesystem_avail_bytes{{{edge}, device="d1", mountpoint="/ro"}}',
                        "0x60",
                    ),
                    s(
                        f'evc_edge_filesystem_size_bytes{{{edge}, device="d1", mountpoint="/ro"}}',
                        "100x60",
                    ),
                    s(
                        f'evc_edge_filesystem_readonly{{{edge}, device="d1", mountpoint="/ro"}}',
                        "1x60",
                    ),
                    s(f'evc_edge_memory_available_bytes{{{edge}, device="d2"}}', "5x60"),
                    s(f'evc_edge_memory_total_bytes{{{edge}, device="d2"}}', "100x60"),
                    s(f'evc_edge_memory_available_bytes{{{edge}, device="d1"}}', "50x60"),
                    s(f'evc_edge_memory_total_bytes{{{edge}, device="d1"}}', "100x60"),
                    s(
                        'evc_jobs_total{job="evc-workers", kind="register", state="failed"}',
                        "0+1x60",
                    ),
                    s(
                        'evc_jobs_total{job="evc-workers", kind="register", state="succeeded"}',
                        "0+1x60",
                    ),
                    s(
                        'evc_jobs_total{job="evc-workers", kind="deploy", state="succeeded"}',
                        "0+1x60",
                    ),
                    s('evc_queue_length{job="evc-api", queue="ssh"}', "500x60"),
                    s('evc_queue_length{job="evc-api", queue="default"}', "3x60"),
                ],
                "alert_rule_test": [
                    alert("EVCDeviceDown", "3m"),  # down for 1m of the 2m it must last
                    alert(
                        "EVCDeviceDown",
                        "40m",
                        {
                            "severity": "critical",
                            "job": "evc-edge",
                            "cluster": "c1",
                            "instance": "d1",
                            "device": "d1",
                        },
                    ),
                    alert("EVCDeviceHot", "40m", {"severity": "warning", "device": "d1", **c1}),
                    alert(
                        "EVCGPUHot",
                        "40m",
                        {"severity": "warning", "device": "d3", **c1},
                        {"severity": "warning", "device": "d4", "gpu": "0", **c1},
                    ),
                    alert(
                        "EVCDiskAlmostFull",
                        "40m",
                        {
                            "severity": "warning",
                            "job": "evc-edge",
                            "device": "d1",
                            "mountpoint": "/",
                            **c1,
                        },
                    ),
                    alert(
                        "EVCMemoryPressure",
                        "40m",
                        {"severity": "warning", "job": "evc-edge", "device": "d2", **c1},
                    ),
                    alert("EVCJobFailureRatio", "40m", {"severity": "warning", "kind": "register"}),
                    alert("EVCQueueBacklog", "40m", {"severity": "warning", "queue": "ssh"}),
                    alert("EVCWorkerAbsent", "40m", {"severity": "critical"}),
                ],
            },
            {
                "interval": "1m",
                "input_series": [
                    s('up{job="evc-workers", instance="evc-api:8080"}', "1x30"),
                    s('flower_worker_online{job="flower", worker="w1@h"}', "1x10 0x20"),
                ],
                "alert_rule_test": [
                    alert("EVCWorkerAbsent", "8m"),
                    alert("EVCWorkerAbsent", "25m", {"severity": "critical"}),
                ],
            },
            _infer_rule_tests(s, alert),
        ],
    }


def _infer_rule_tests(s: Callable[..., dict[str, str]], alert: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """The evc-inference alerts: d1 fails 10 % of 2 req/s and answers in ~2 s; d2 is healthy;
    d3's server is down; d1 holds a version it does not serve."""
    inf = 'job="evc-infer", deployment="dep_1"'
    hist = "evc_infer_request_duration_seconds_bucket"
    w = {"severity": "warning", "deployment": "dep_1"}
    return {
        "interval": "1m",
        "input_series": [
            s(f'evc_infer_requests_total{{{inf}, device="d1", model="m", version="1", status="200"}}', "0+108x40"),
            s(f'evc_infer_requests_total{{{inf}, device="d1", model="m", version="1", status="400"}}', "0+12x40"),
            s(f'evc_infer_errors_total{{{inf}, device="d1", model="m", reason="bad_request"}}', "0+12x40"),
            s(f'evc_infer_requests_total{{{inf}, device="d2", model="m", version="1", status="200"}}', "0+120x40"),
            s(f'{hist}{{{inf}, device="d1", model="m", version="1", le="1"}}', "0x40"),
            s(f'{hist}{{{inf}, device="d1", model="m", version="1", le="5"}}', "0+108x40"),
            s(f'{hist}{{{inf}, device="d1", model="m", version="1", le="+Inf"}}', "0+108x40"),
            s(f'{hist}{{{inf}, device="d2", model="m", version="1", le="1"}}', "0+120x40"),
            s(f'{hist}{{{inf}, device="d2", model="m", version="1", le="5"}}', "0+120x40"),
            s(f'{hist}{{{inf}, device="d2", model="m", version="1", le="+Inf"}}', "0+120x40"),
            s(f'up{{{inf}, device="d2", instance="dep_1/d2"}}', "1x40"),
            s(f'up{{{inf}, device="d3", instance="dep_1/d3"}}', "0x40"),
            s(f'evc_infer_model_ready{{{inf}, device="d1", model="m", version="2", sha256="ab"}}', "0x40"),
            s(f'evc_infer_model_ready{{{inf}, device="d2", model="m", version="1", sha256="cd"}}', "1x40"),
        ],
        "alert_rule_test": [
            alert("EVCInferenceErrors", "3m"),  # not for 5m yet
            alert("EVCInferenceErrors", "20m", {**w, "device": "d1"}),
            alert("EVCInferenceSlow", "20m", {**w, "device": "d1"}),
            alert(
                "EVCInferenceServerDown",
                "20m",
                {
                    "severity": "critical",
                    "job": "evc-infer",
                    "deployment": "dep_1",
                    "device": "d3",
                    "instance": "dep_1/d3",
                },
            ),  # fmt: skip
            alert(
                "EVCInferenceModelNotReady",
                "20m",
                {**w, "job": "evc-infer", "device": "d1", "model": "m", "version": "2", "sha256": "ab"},
            ),
        ],
    }


def test_alerts_fire_on_what_they_watch(promtool: str, tmp_path: Path) -> None:  # noqa: F811
    """Every alert, with its real `for:`, fires on matching series and stays quiet otherwise."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")  # promtool compares annotations too; the templates are
    rules_file = tmp_path / "evc.yml"  # validated by `promtool check rules`
    rules_file.write_text(yaml.safe_dump(doc))
    tests_file = tmp_path / "evc_test.yml"
    tests_file.write_text(yaml.safe_dump(_promtool_rule_tests(rules_file)))
    out = promtool_run(promtool, "test", "rules", str(tests_file))
    assert out.returncode == 0, out.stdout + out.stderr


def test_exporter_and_evc_metrics_pass_promtool_check_metrics(
    promtool: str,  # noqa: F811
    edge_exporter: Callable[..., EdgeExporterProcess],  # noqa: F811
) -> None:
    exposition = edge_exporter("--process", "sleep").metrics()
    out = promtool_run(promtool, "check", "metrics", stdin=exposition)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr
    metrics.record_job_finished("lint", "succeeded", 1.0)
    body = generate_latest(metrics.registry_for_exposition(metrics.FleetCollector(FleetStore()))).decode()
    out = promtool_run(promtool, "check", "metrics", stdin=body)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


# --- Grafana ----------------------------------------------------------------------------------


def test_grafana_provisioning() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert (source["type"], source["uid"], source["url"]) == (
        "prometheus",
        "evc-prometheus",
        "http://prometheus:9090",
    )
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "evc.yml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_dashboards_match_their_generator() -> None:
    generator = runpy.run_path(str(GRAFANA / "generate_dashboards.py"))
    rendered = generator["render"]()
    on_disk = {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")}
    assert rendered == on_disk, "run python deploy/grafana/generate_dashboards.py"


def test_dashboards_are_well_formed() -> None:
    dashes = dashboards()
    titles = {d["title"] for d in dashes.values()}
    assert {
        "EVC / Fleet overview",
        "EVC / Device detail",
        "EVC / Jobs and queues",
        "EVC / Federated training",
        "EVC / Inference",
    } <= titles
    assert len({d["uid"] for d in dashes.values()}) == len(dashes)
    for name, dash in dashes.items():
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), name
        defined = {v["name"] for v in dash["templating"]["list"]}
        for panel in dash["panels"]:
            assert panel["targets"], f"{name}: {panel['title']} has no query"
            assert panel["datasource"]["uid"] == "${datasource}"
            g = panel["gridPos"]
            assert g["x"] + g["w"] <= 24
            for t in panel["targets"]:
                used = set(re.findall(r"\$(\w+)", t["expr"])) - {
                    "__rate_interval",
                    "__interval",
                    "__range",
                }
                assert used <= defined, f"{name}: {panel['title']} uses undefined {used - defined}"
    device = dashes["evc-device.json"]
    assert any(v["name"] == "device" for v in device["templating"]["list"])
    exprs = " ".join(e for _, e in panel_exprs(device))
    for needle in ("cpu_seconds", "memory", "filesystem", "temperature", "gpu", "network"):
        assert needle in exprs, f"device detail lacks {needle}"


#: metrics of other programs that dashboards and rules use (Flower 2's /metrics)
FLOWER_METRICS = {"flower_worker_online", "flower_worker_number_of_currently_executing_tasks"}


def known_metric_names(tmp_path: Path) -> set[str]:
    """Every sample name EVC's exporter and EVC's own metrics can expose, plus Flower's and up."""
    exporter = build_exporter(
        ExporterConfig(
            nvidia_smi=str(fake_nvidia_smi(tmp_path)),
            nvml=False,
            tegrastats=str(fake_tegrastats(tmp_path)),
            tegrastats_interval_ms=50,
            sys_root=str(fake_sys_root(tmp_path / "sys")),
            processes=("sleep",),
        )
    )
    try:
        readers = [c.reader for c in exporter.collectors if isinstance(c, TegrastatsCollector) and c.reader is not None]
        wait_until(lambda: all(r.latest() for r in readers), 10, "tegrastats lines")
        names = exposed_names(generate_latest(make_registry(exporter)).decode())
    finally:
        exporter.close()
    metrics.record_fl_round("fl_names", 1, 1, 1.0, 0.5)
    metrics.record_job_finished("names", "failed", 1.0)
    metrics.record_registration_failure("names")
    metrics.record_device_state_change("online", "offline")
    metrics.observe_health_sweep(1.0)
    body = generate_latest(metrics.registry_for_exposition(metrics.FleetCollector(FleetStore()))).decode()
    metrics.remove_fl_job("fl_names")
    return names | exposed_names(body) | infer_metric_names() | recommend_names() | FLOWER_METRICS | {"up"}


def infer_metric_names() -> set[str]:
    """Every sample name the edge inference server exposes (one request of each kind served)."""
    from types import SimpleNamespace

    from evc.device.infer.metrics import InferMetrics

    m = InferMetrics("test")
    m.served("m", "1", 200, 0.01, 0.005, 1)
    m.failed("m", "1", 400, "bad_request")
    m.models([SimpleNamespace(name="m", version="1", sha256="0" * 64, ready=True)])
    return exposed_names(m.render()[0].decode())


def recommend_names() -> set[str]:
    """The series of watched model recommendations (evc.recommend.metrics)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(RecommendCollector(FleetStore()))
    return exposed_names(generate_latest(registry).decode())


def test_dashboards_and_rules_use_only_exposed_metrics(tmp_path: Path) -> None:
    """A misspelled metric name in a panel or an alert would silently show nothing."""
    known = known_metric_names(tmp_path)
    used: list[tuple[str, set[str]]] = []
    for name, dash in dashboards().items():
        used += [(f"{name} / {title}", metric_names_in(e)) for title, e in panel_exprs(dash)]
        for var, query in variable_queries(dash):
            used.append((f"{name} / ${var}", metric_names_in(label_values_parts(query)[0])))
    used += [(f"alert {r['alert']}", metric_names_in(r["expr"])) for r in rule_docs()]
    unknown = [(where, sorted(names - known)) for where, names in used if names - known]
    assert not unknown
    assert all(names for _, names in used)


def test_metric_name_extraction() -> None:
    assert metric_names_in('sum by (kind, le) (rate(evc_x_bucket{a="b"}[5m])) / on (kind) evc_y') == {
        "evc_x_bucket",
        "evc_y",
    }
    assert metric_names_in('topk(10, max by (device) ({__name__=~"a_b|c_d", x="1"}))') == {
        "a_b",
        "c_d",
    }
    assert metric_names_in('count_values("level", evc_z{c=~".*"}) > 0 and up == 1') == {
        "evc_z",
        "up",
    }


# --- EVC's own metrics ----------------------------------------------------------------------


class FleetStore:
    """A store with the two methods FleetCollector reads; devices can be added and removed."""

    def __init__(self) -> None:
        self.devices: list[dict[str, Any]] = [
            {"id": "dev_1", "name": "sim-1", "state": "online", "cluster_id": "c1",
             "labels": {}, "facts": {"arch": "aarch64"}, "level": "L2"},
            {"id": "dev_2", "name": "sim-2", "state": "offline", "cluster_id": "c1",
             "labels": {}, "facts": {"arch": "x86_64"}, "level": 1},
            {"id": "dev_3", "name": "sim-3", "state": "pending", "cluster_id": None,
             "labels": {}, "facts": {}, "level": None},
        ]  # fmt: skip
        self.queues = {"default": 0, "ssh": 3, "ansible": 0, "fl": 1}
        self.broken = False

    def recommendation_watches(self) -> dict[str, Any]:
        chosen = {"name": "sim-1", "label": "int8", "p50_ms": 3.0, "source": "measured", "predicted_p50_ms": 3.3}
        return {"digits": {"chosen": {"dev_1": chosen}}}

    def all_devices(self) -> list[dict[str, Any]]:
        if self.broken:
            raise ConnectionError("redis down")
        return [dict(d) for d in self.devices]

    def queue_lengths(self) -> dict[str, int]:
        return dict(self.queues)


def _values(collector: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in collector.collect() for s in f.samples}


def test_evc_metric_names_follow_prometheus_rules() -> None:
    metrics.record_fl_round("fl_lint", 1, 2, 3.0, 0.5)
    families = list(metrics.REGISTRY.collect()) + list(metrics.FleetCollector(FleetStore()).collect())
    assert lint_families(families, "evc_") == []
    names = set(metrics.metric_names(families))
    assert {
        "evc_jobs_total", "evc_job_duration_seconds", "evc_registration_failures_total",
        "evc_health_sweep_duration_seconds", "evc_ssh_pool_connections",
        "evc_fl_round_duration_seconds", "evc_fl_round_participants", "evc_fl_round_accuracy",
        "evc_devices", "evc_queue_length", "evc_device_up",
    } <= names  # fmt: skip
    metrics.remove_fl_job("fl_lint")


def test_edge_exporter_names_follow_prometheus_rules(tmp_path: Path) -> None:
    exporter = build_exporter(
        ExporterConfig(
            nvidia_smi=str(fake_nvidia_smi(tmp_path)),
            nvml=False,
            tegrastats="none",
            sys_root=str(fake_sys_root(tmp_path / "sys")),
            processes=("sleep",),
        )
    )
    try:
        families = list(exporter.collect())
    finally:
        exporter.close()
    assert lint_families(families, "evc_edge_") == []


def test_recording_functions() -> None:
    reg = metrics.REGISTRY

    def get(name: str, **labels: str) -> float:
        return reg.get_sample_value(name, labels) or 0.0

    jobs = get("evc_jobs_total", kind="register", state="failed")
    count = get("evc_job_duration_seconds_count", kind="register")
    metrics.record_job_finished("register", "failed", 2.5)
    metrics.record_job_finished("register", "failed", None)
    assert get("evc_jobs_total", kind="register", state="failed") == jobs + 2
    assert get("evc_job_duration_seconds_count", kind="register") == count + 1

    before = get("evc_registration_failures_total", reason="auth_refused")
    metrics.record_registration_failure("auth_refused")
    assert get("evc_registration_failures_total", reason="auth_refused") == before + 1

    changes = get("evc_device_state_changes_total", from_state="online", to_state="offline")
    metrics.record_device_state_change("online", "offline")
    assert get("evc_device_state_changes_total", from_state="online", to_state="offline") == changes + 1

    sweeps = get("evc_health_sweep_duration_seconds_count")
    metrics.observe_health_sweep(0.7)
    assert get("evc_health_sweep_duration_seconds_count") == sweeps + 1
    metrics.set_ssh_pool_size(7)
    assert get("evc_ssh_pool_connections") == 7

    metrics.record_fl_round("fl_a", 4, 9, 31.5, 0.875)
    assert get("evc_fl_round", fl_job="fl_a") == 4
    assert get("evc_fl_round_participants", fl_job="fl_a") == 9
    assert get("evc_fl_round_duration_seconds", fl_job="fl_a") == 31.5
    assert get("evc_fl_round_accuracy", fl_job="fl_a") == 0.875
    metrics.remove_fl_job("fl_a")
    metrics.remove_fl_job("fl_a")  # twice is fine
    assert reg.get_sample_value("evc_fl_round_accuracy", {"fl_job": "fl_a"}) is None


def test_fleet_collector_follows_the_store() -> None:
    store = FleetStore()
    collector = metrics.FleetCollector(store)
    got = _values(collector)
    assert got[("evc_store_up", ())] == 1
    assert got[("evc_devices", (("state", "online"),))] == 1
    assert got[("evc_devices", (("state", "degraded"),))] == 0  # known states are always there
    assert got[("evc_queue_length", (("queue", "ssh"),))] == 3
    assert got[("evc_device_up", (("cluster", "c1"), ("device", "sim-1")))] == 1
    assert got[("evc_device_up", (("cluster", "c1"), ("device", "sim-2")))] == 0
    assert got[("evc_device_up", (("cluster", ""), ("device", "sim-3")))] == 0
    assert got[("evc_device_level", (("cluster", "c1"), ("device", "sim-1")))] == 2
    assert got[("evc_device_level", (("cluster", "c1"), ("device", "sim-2")))] == 1

    store.devices = [d for d in store.devices if d["name"] != "sim-2"]  # device removed
    got = _values(collector)
    assert not [k for k in got if ("device", "sim-2") in k[1]]
    assert got[("evc_devices", (("state", "offline"),))] == 0

    store.broken = True  # the store is down: /metrics still answers
    assert _values(collector) == {("evc_store_up", ()): 0.0}


def test_exposition_content_negotiation() -> None:
    reg = metrics.registry_for_exposition(metrics.FleetCollector(FleetStore()))
    body, ctype = metrics.render(reg)
    assert ctype.startswith("text/plain") and b"evc_devices" in body
    body, ctype = metrics.render(reg, "application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


_WRITER = """
import sys
from evc import metrics
from evc.device.exporter.cli import ExporterConfig, build_exporter, make_registry
from evc.device.exporter.gpu import TegrastatsCollector
assert metrics.multiprocess_enabled()
metrics.record_job_finished("deploy", "succeeded", float(sys.argv[1]))
metrics.set_ssh_pool_size(int(sys.argv[2]))
metrics.record_fl_round("fl_mp", int(sys.argv[2]), 3, 10.0, 0.5)
"""


def test_multiprocess_mode_merges_processes(tmp_path: Path) -> None:
    """Two worker processes write; the API's exposition shows their sum (gunicorn/prefork)."""
    base = tmp_path / "metrics"
    workers_dir = metrics.reset_multiprocess_dir(metrics.multiprocess_dir(base, "workers"))
    (workers_dir / "stale_123.db").write_bytes(b"left from an earlier run")
    workers_dir = metrics.reset_multiprocess_dir(workers_dir)
    assert list(workers_dir.iterdir()) == []
    env = {**os.environ, **metrics.multiprocess_env(str(base), "workers")}
    assert env["PROMETHEUS_MULTIPROC_DIR"] == str(workers_dir)
    assert metrics.multiprocess_env("", "workers") == {}
    for duration, pool in (("3", "2"), ("5", "4")):
        subprocess.run([sys.executable, "-c", _WRITER, duration, pool], env=env, check=True, timeout=60)

    reg = metrics.registry_for_exposition(metrics_dir=workers_dir)
    assert reg.get_sample_value("evc_jobs_total", {"kind": "deploy", "state": "succeeded"}) == 2
    assert reg.get_sample_value("evc_job_duration_seconds_sum", {"kind": "deploy"}) == 8
    assert reg.get_sample_value("evc_fl_round", {"fl_job": "fl_mp"}) == 4  # most recent write
    # livesum counts live processes only: both writers have exited and are marked dead
    for f in workers_dir.glob("gauge_livesum_*.db"):
        metrics.mark_process_dead(int(f.stem.rsplit("_", 1)[1]), workers_dir)
    assert not reg.get_sample_value("evc_ssh_pool_connections")


# --- a real Prometheus --------------------------------------------------------------------------


@pytest.fixture()
def evc_metrics_endpoint() -> Iterator[tuple[str, FleetStore]]:
    """EVC's own /metrics (this process's metrics plus the fleet) on a free loopback port."""
    metrics.record_job_finished("register", "succeeded", 12.0)
    metrics.record_job_finished("register", "failed", 3.0)
    metrics.record_job_finished("deploy", "succeeded", 40.0)
    metrics.record_registration_failure("unreachable")
    metrics.record_device_state_change("online", "degraded")
    metrics.observe_health_sweep(1.5)
    metrics.set_ssh_pool_size(4)
    metrics.record_fl_round("fl_e2e", 3, 5, 42.0, 0.81)
    store = FleetStore()
    port = free_port()
    server, thread = start_http_server(
        port,
        addr="127.0.0.1",
        registry=metrics.registry_for_exposition(metrics.FleetCollector(store), RecommendCollector(store)),
    )
    yield f"127.0.0.1:{port}", store
    server.shutdown()
    server.server_close()
    thread.join(5)
    metrics.remove_fl_job("fl_e2e")


@pytest.mark.slow
def test_dashboards_and_alerts_on_a_real_prometheus(
    start_prometheus: Callable[..., PrometheusServer],  # noqa: F811
    edge_exporter: Callable[..., EdgeExporterProcess],  # noqa: F811
    evc_metrics_endpoint: tuple[str, FleetStore],
    tmp_path: Path,
) -> None:
    exporter = edge_exporter("--process", "prometheus", "--mount", "/")
    api_address, _ = evc_metrics_endpoint
    device = "sim-1"

    # the evc-edge job of deploy/prometheus/prometheus.yml, with file_sd in place of the registry
    shipped = {j["job_name"]: j for j in yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"]}
    sd_file = tmp_path / "targets.json"
    sd_file.write_text(
        json.dumps(
            [
                {
                    "targets": [exporter.address],
                    "labels": {
                        "device": device,
                        "cluster": "c1",
                        "profile": "bare",
                        "arch": "aarch64",
                        "state": "online",
                    },
                }
            ]
        )
    )
    edge_job = {k: v for k, v in shipped["evc-edge"].items() if k != "http_sd_configs"}
    edge_job["file_sd_configs"] = [{"files": [str(sd_file)], "refresh_interval": "1s"}]
    rules = rewrite_rule_durations(RULES, tmp_path / "rules" / "evc.yml", for_="1s")
    prom = start_prometheus(
        [edge_job, {"job_name": "evc-api", "static_configs": [{"targets": [api_address]}]}],
        [rules],
    )
    prom.wait_for_scrapes("evc-edge", samples=5)
    prom.wait_for_scrapes("evc-api", samples=5)
    (up,) = prom.query('up{job="evc-edge"}')
    assert up["metric"]["device"] == device and up["metric"]["instance"] == device  # relabelled

    served = exposed_names(exporter.metrics()) | {"up"}
    served |= exposed_names(generate_latest(metrics.registry_for_exposition()).decode())
    served |= {
        "evc_store_up",
        "evc_devices",
        "evc_queue_length",
        "evc_device_up",
        "evc_device_level",
        "evc_device_info",
    }

    problems: list[str] = []
    checked = 0
    for name, dash in dashboards().items():
        for title, raw in panel_exprs(dash):
            expr = substitute(raw, device)
            checked += 1
            try:
                result = prom.query(expr)
            except PrometheusAPIError as exc:
                problems.append(f"{name} / {title}: {exc}")
                continue
            wanted = metric_names_in(expr)
            if wanted <= served and not result:
                problems.append(f"{name} / {title}: no data for {expr}")
        for var, query in variable_queries(dash):
            raw_selector, label = label_values_parts(query)
            selector = substitute(raw_selector, device)
            values = {r["metric"].get(label) for r in prom.query(f"group by ({label}) ({selector})")}
            if not values - {None, ""}:
                problems.append(f"{name}: variable {var} has no values ({query})")
            if var == "device" and device not in values:
                problems.append(f"{name}: variable device lacks {device}: {values}")
    for rule in rule_docs():
        try:
            prom.query(rule["expr"])
        except PrometheusAPIError as exc:
            problems.append(f"alert {rule['alert']}: {exc}")
    assert not problems, "\n".join(problems)
    assert checked >= 40

    # Prometheus evaluates every rule without error
    def evaluated() -> list[dict[str, Any]]:
        rules_now = prom.rules()
        return rules_now if all(r["lastEvaluation"] > "2000" for r in rules_now) else []

    loaded = wait_until(evaluated, 20, "every rule evaluated")
    assert {r["name"] for r in loaded} == ALERTS
    assert all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]

    # the device is up: EVCDeviceDown is quiet; then the exporter stops and it fires
    assert not prom.firing("EVCDeviceDown")
    assert exporter.stop() == 0
    firing = wait_until(lambda: prom.firing("EVCDeviceDown", device=device), 30, "EVCDeviceDown to fire")
    assert firing[0]["labels"]["cluster"] == "c1" and firing[0]["labels"]["severity"] == "critical"
    assert not prom.firing("EVCDeviceHot")
