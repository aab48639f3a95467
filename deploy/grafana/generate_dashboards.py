"""Generate EVC's Grafana dashboards (deploy/grafana/dashboards/*.json) from one description.

Run ``python deploy/grafana/generate_dashboards.py`` after changing a panel; the tests check the
JSON files are what this script writes, and evaluate every query against a real Prometheus.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # grafana_kit beside this script
from grafana_kit import (  # noqa: E402
    OUT,
    Json,
    dashboard,
    panel,
    query_var,
    stat,
    target,
)

# --- the dashboards ---------------------------------------------------------------------------

C = 'cluster=~"$cluster"'
D = 'device="$device"'
RI = "$__rate_interval"
TEMPERATURES = "evc_edge_thermal_zone_temperature_celsius|evc_edge_jetson_temperature_celsius"


def fleet() -> Json:
    return dashboard(
        "evc-fleet",
        "EVC / Fleet overview",
        [*_fleet_stats(), *_fleet_states(), *_fleet_hardware(), *_fleet_table()],
        [query_var("cluster", "label_values(evc_device_up, cluster)", "Cluster")],
    )


def _fleet_stats() -> list[Json]:
    """The fleet at a glance: devices, exporters, the store."""
    return [
        stat("Registered devices", "sum(evc_devices)"),
        stat("Devices up", f"sum(evc_device_up{{{C}}})"),
        stat("Edge exporters answering", f'sum(up{{job="evc-edge", {C}}})'),
        stat("Store reachable", "min(evc_store_up)"),
    ]


def _fleet_states() -> list[Json]:
    """Devices by state, cluster and function level."""
    return [
        panel(
            "Devices by state",
            [target("sum by (state) (evc_devices)", "{{state}}")],
            stack=True,
        ),
        panel(
            "Devices by cluster",
            [
                target(f"sum by (cluster) (evc_device_up{{{C}}})", "{{cluster}} up"),
                target(f"count by (cluster) (evc_device_up{{{C}}})", "{{cluster}} registered"),
            ],
        ),
        panel(
            "Device state changes (per hour)",
            [
                target(
                    "sum by (from_state, to_state) (increase(evc_device_state_changes_total[1h]))",
                    "{{from_state}} → {{to_state}}",
                )
            ],
        ),
        panel(
            "Devices by function level",
            [target(f'count_values("level", evc_device_level{{{C}}})', "L{{level}}")],
            kind="bargauge",
        ),
    ]


def _fleet_hardware() -> list[Json]:
    """The hottest devices and the busiest GPUs."""
    return [
        panel(
            "Hottest devices",
            [
                target(
                    f'topk(10, max by (device) ({{__name__=~"{TEMPERATURES}", {C}}}))',
                    "{{device}}",
                )
            ],
            unit="celsius",
        ),
        panel(
            "Busiest GPUs",
            [
                target(
                    f"topk(10, max by (device) (evc_edge_gpu_utilization_ratio{{{C}}}))",
                    "{{device}}",
                ),
                target(
                    f"topk(10, evc_edge_jetson_gpu_utilization_ratio{{{C}}})",
                    "{{device}} (Jetson)",
                ),
            ],
            unit="percentunit",
            minimum=0,
            maximum=1,
        ),
    ]


def _fleet_table() -> list[Json]:
    """Every device, each row linking to its detail dashboard."""
    device_link = [
        {
            "title": "Device detail",
            "url": "/d/evc-device?var-device=${__data.fields.device}&${datasource:queryparam}",
        }
    ]
    return [
        panel(
            "Devices",
            [target(f"evc_device_info{{{C}}}", table=True)],
            kind="table",
            w=24,
            h=10,
            links=device_link,
        ),
    ]


def device_detail() -> Json:
    return dashboard(
        "evc-device",
        "EVC / Device detail",
        [*_device_stats(), *_device_host(), *_device_memory(), *_device_hardware(), *_device_activity()],
        [
            query_var("cluster", "label_values(evc_device_up, cluster)", "Cluster"),
            query_var(
                "device",
                f'label_values(up{{job="evc-edge", {C}}}, device)',
                "Device",
                multi=False,
            ),
        ],
    )


def _device_stats() -> list[Json]:
    """The device at a glance."""
    return [
        stat("Exporter up", f'up{{job="evc-edge", {D}}}'),
        stat("Uptime", f"evc_edge_uptime_seconds{{{D}}}", "s"),
        stat("CPUs", f"evc_edge_cpus{{{D}}}"),
        stat("Memory", f"evc_edge_memory_total_bytes{{{D}}}", "bytes"),
    ]


def _device_host() -> list[Json]:
    """CPU and load."""
    cpu_busy = (
        f'1 - sum(rate(evc_edge_cpu_seconds_total{{{D}, mode=~"idle|iowait"}}[{RI}]))'
        f" / sum(rate(evc_edge_cpu_seconds_total{{{D}}}[{RI}]))"
    )
    return [
        panel(
            "CPU busy",
            [
                target(cpu_busy, "all CPUs"),
                target(f"evc_edge_jetson_cpu_utilization_ratio{{{D}}}", "core {{core}}"),
            ],
            unit="percentunit",
            minimum=0,
            maximum=1,
        ),
        panel(
            "Load",
            [
                target(f"evc_edge_load1{{{D}}}", "1m"),
                target(f"evc_edge_load5{{{D}}}", "5m"),
                target(f"evc_edge_load15{{{D}}}", "15m"),
                target(f"evc_edge_cpus{{{D}}}", "CPUs"),
            ],
        ),
    ]


def _device_memory() -> list[Json]:
    """Memory, swap and disk."""
    return [
        panel(
            "Memory",
            [
                target(
                    f"evc_edge_memory_total_bytes{{{D}}} - evc_edge_memory_available_bytes{{{D}}}",
                    "used",
                ),
                target(f"evc_edge_memory_total_bytes{{{D}}}", "total"),
                target(
                    f"evc_edge_swap_total_bytes{{{D}}} - evc_edge_swap_free_bytes{{{D}}}",
                    "swap used",
                ),
            ],
            unit="bytes",
        ),
        panel(
            "Disk used",
            [
                target(
                    f"1 - evc_edge_filesystem_avail_bytes{{{D}}} / evc_edge_filesystem_size_bytes{{{D}}}",
                    "{{mountpoint}}",
                )
            ],
            unit="percentunit",
            minimum=0,
            maximum=1,
        ),
    ]


def _device_hardware() -> list[Json]:
    """Temperatures, GPUs and power."""
    return [
        panel(
            "Temperatures",
            [
                target(f"evc_edge_thermal_zone_temperature_celsius{{{D}}}", "{{type}}"),
                target(f"evc_edge_jetson_temperature_celsius{{{D}}}", "{{sensor}}"),
                target(f"evc_edge_gpu_temperature_celsius{{{D}}}", "GPU {{gpu}}"),
            ],
            unit="celsius",
        ),
        panel(
            "GPU busy",
            [
                target(f"evc_edge_gpu_utilization_ratio{{{D}}}", "GPU {{gpu}}"),
                target(f"evc_edge_jetson_gpu_utilization_ratio{{{D}}}", "GR3D"),
            ],
            unit="percentunit",
            minimum=0,
            maximum=1,
        ),
        panel(
            "GPU memory",
            [
                target(f"evc_edge_gpu_memory_used_bytes{{{D}}}", "GPU {{gpu}} used"),
                target(f"evc_edge_gpu_memory_total_bytes{{{D}}}", "GPU {{gpu}} total"),
            ],
            unit="bytes",
        ),
        panel(
            "Power",
            [
                target(f"evc_edge_gpu_power_watts{{{D}}}", "GPU {{gpu}}"),
                target(f"evc_edge_jetson_power_watts{{{D}}}", "{{rail}}"),
            ],
            unit="watt",
        ),
    ]


def _device_activity() -> list[Json]:
    """Network, watched processes and the exporter's own collectors."""
    return [
        panel(
            "Network",
            [
                target(
                    f"rate(evc_edge_network_receive_bytes_total{{{D}}}[{RI}])",
                    "{{interface}} in",
                ),
                target(
                    f"-rate(evc_edge_network_transmit_bytes_total{{{D}}}[{RI}])",
                    "{{interface}} out",
                ),
            ],
            unit="Bps",
        ),
        panel(
            "Processes",
            [target(f"evc_edge_process_up{{{D}}}", "{{name}}")],
            kind="state-timeline",
            w=12,
        ),
        panel(
            "Exporter collectors",
            [target(f"evc_edge_collector_up{{{D}}}", "{{collector}}")],
            kind="state-timeline",
            w=24,
        ),
    ]


def jobs() -> Json:
    return dashboard(
        "evc-jobs",
        "EVC / Jobs and queues",
        [*_job_panels(), *_control_plane_panels()],
        [],
    )


def _job_panels() -> list[Json]:
    """Jobs finished, failing and how long they take; the queues."""
    return [
        panel(
            "Jobs finished (per 5 minutes)",
            [target("sum by (kind, state) (increase(evc_jobs_total[5m]))", "{{kind}} {{state}}")],
            stack=True,
        ),
        panel(
            "Job failure ratio (15 minutes)",
            [
                target(
                    'sum by (kind) (rate(evc_jobs_total{state="failed"}[15m]))'
                    " / sum by (kind) (rate(evc_jobs_total[15m]))",
                    "{{kind}}",
                )
            ],
            unit="percentunit",
            minimum=0,
            maximum=1,
        ),
        panel(
            "Job duration",
            [
                target(
                    f"histogram_quantile(0.5, sum by (kind, le) (rate(evc_job_duration_seconds_bucket[{RI}])))",
                    "{{kind}} p50",
                ),
                target(
                    f"histogram_quantile(0.95, sum by (kind, le) (rate(evc_job_duration_seconds_bucket[{RI}])))",
                    "{{kind}} p95",
                ),
            ],
            unit="s",
        ),
        panel("Queue length", [target("max by (queue) (evc_queue_length)", "{{queue}}")]),
    ]


def _control_plane_panels() -> list[Json]:
    """Registration, health sweeps, SSH pools, Celery workers, scrape targets."""
    return [
        panel(
            "Registration failures (per hour)",
            [
                target(
                    "sum by (reason) (increase(evc_registration_failures_total[1h]))",
                    "{{reason}}",
                )
            ],
        ),
        panel(
            "Health sweep duration",
            [
                target(
                    f"histogram_quantile(0.95, sum by (le) (rate(evc_health_sweep_duration_seconds_bucket[{RI}])))",
                    "p95",
                ),
                target(
                    f"sum(rate(evc_health_sweep_duration_seconds_sum[{RI}]))"
                    f" / sum(rate(evc_health_sweep_duration_seconds_count[{RI}]))",
                    "mean",
                ),
            ],
            unit="s",
        ),
        panel("SSH pool connections", [target("sum(evc_ssh_pool_connections)", "connections")]),
        panel(
            "Celery workers (Flower)",
            [
                target("sum(flower_worker_online)", "online"),
                target(
                    "sum by (worker) (flower_worker_number_of_currently_executing_tasks)",
                    "{{worker}} executing",
                ),
            ],
        ),
        panel(
            "Control plane scrape targets",
            [target('up{job=~"evc-api|evc-workers|flower"}', "{{job}}")],
            kind="state-timeline",
            w=24,
        ),
    ]


def federated() -> Json:
    J = 'fl_job=~"$fl_job"'
    return dashboard(
        "evc-fl",
        "EVC / Federated training",
        [
            stat("Latest round", f"max(evc_fl_round{{{J}}})"),
            stat("Participants", f"sum(evc_fl_round_participants{{{J}}})"),
            stat("Accuracy", f"max(evc_fl_round_accuracy{{{J}}})", "percentunit"),
            stat("Round duration", f"max(evc_fl_round_duration_seconds{{{J}}})", "s"),
            panel("Round", [target(f"evc_fl_round{{{J}}}", "{{fl_job}}")]),
            panel(
                "Round duration",
                [target(f"evc_fl_round_duration_seconds{{{J}}}", "{{fl_job}}")],
                unit="s",
            ),
            panel(
                "Participants per round",
                [target(f"evc_fl_round_participants{{{J}}}", "{{fl_job}}")],
            ),
            panel(
                "Accuracy",
                [target(f"evc_fl_round_accuracy{{{J}}}", "{{fl_job}}")],
                unit="percentunit",
                minimum=0,
                maximum=1,
            ),
        ],
        [query_var("fl_job", "label_values(evc_fl_round, fl_job)", "Training job")],
    )


def inference() -> Json:  # the edge servers of deployments (evc_infer_*), per deployment and device
    i, by, dd = f'job="evc-infer", {C}', "deployment, device", "{{deployment}} {{device}}"
    req, err, bs = "evc_infer_requests_total", "evc_infer_errors_total", "evc_infer_batch_size"

    def rate(metric: str, extra: str = "") -> str:
        return f"sum by ({by}{extra}) (rate({metric}{{{i}}}[{RI}]))"

    def quantile(q: float, m: str) -> Json:
        return target(f"histogram_quantile({q}, {rate(f'evc_infer_{m}_bucket', ', le')})", f"p{round(q * 100)} {dd}")

    panels = [
        stat("Servers up", f"sum(up{{{i}}}) or vector(0)"),
        stat("Requests/s", f"sum(rate({req}{{{i}}}[{RI}]))", "reqps"),
        stat("Error ratio", f"sum(rate({err}{{{i}}}[{RI}])) / sum(rate({req}{{{i}}}[{RI}]))", "percentunit"),
        stat("Versions not ready", f"count(evc_infer_model_ready{{{i}}} == 0) or vector(0)"),
        panel("Requests by status", [target(rate(req, ", status"), dd + " {{status}}")], unit="reqps", stack=True),
        panel("Errors by reason", [target(rate(err, ", reason"), dd + " {{reason}}")], unit="reqps"),
        panel("Request latency p50 / p99", [quantile(q, "request_duration_seconds") for q in (0.5, 0.99)], unit="s"),
        panel("ONNX Runtime time p99", [quantile(0.99, "compute_duration_seconds")], unit="s"),
        panel("Mean batch size", [target(f"{rate(bs + '_sum')} / {rate(bs + '_count')}", dd)]),
        panel("Versions served", [target(f"evc_infer_model_ready{{{i}}}", f"{dd} {{{{model}}}}:{{{{version}}}}")]),
    ]  # fmt: skip
    cluster = query_var("cluster", "label_values(evc_device_up, cluster)", "Cluster")
    return dashboard("evc-infer", "EVC / Inference", panels, [cluster])


def recommendation() -> Json:
    M = 'model=~"$model"'
    lat = "evc_recommend_latency_ms"
    ratio = f'{lat}{{{M}, source="measured"}} / ignoring(source) {lat}{{{M}, source="predicted"}}'
    latency = target(f"evc_recommend_latency_ms{{{M}}}", "{{device}} {{variant}} {{source}}")
    panels = [
        stat("Devices with a recommendation", f"count(evc_recommend_chosen{{{M}}})"),
        stat("Worst measured / predicted p50", f"max({ratio})"),
        panel("Recommended variant per device", [target(f"evc_recommend_chosen{{{M}}}", table=True)], kind="table"),
        panel("p50 of the recommended variant: measured vs predicted", [latency], unit="ms"),
        panel("Measured / predicted p50 (1 = exact)", [target(ratio, "{{device}} {{variant}}")], w=24),
    ]  # fmt: skip
    return dashboard("evc-recommend", "EVC / Model recommendation", panels,
                     [query_var("model", "label_values(evc_recommend_chosen, model)", "Model")])  # fmt: skip


DASHBOARDS = {
    "evc-fleet.json": fleet,
    "evc-device.json": device_detail,
    "evc-jobs.json": jobs,
    "evc-federated.json": federated,
    "evc-infer.json": inference,
    "evc-recommend.json": recommendation,
}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        sys.stdout.write(f"wrote {OUT / name}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
