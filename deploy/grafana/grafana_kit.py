"""The building blocks of EVC's Grafana dashboards (panels, targets, variables, layout), for
generate_dashboards.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
#: Prometheus data source uid from provisioning/datasources/prometheus.yml
DATASOURCE_UID = "evc-prometheus"

Json = dict[str, Any]


def target(expr: str, legend: str = "", *, instant: bool = False, table: bool = False) -> Json:
    t: Json = {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto"}
    if table:
        t.update(format="table", instant=True, range=False)
    else:
        t.update(instant=instant, range=not instant)
    return t


def panel(
    title: str,
    targets: list[Json],
    *,
    kind: str = "timeseries",
    unit: str = "short",
    w: int = 12,
    h: int = 8,
    description: str = "",
    stack: bool = False,
    links: list[Json] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Json:
    defaults: Json = {"unit": unit}
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    if links:
        defaults["links"] = links
    if kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "fillOpacity": 30 if stack else 10,
            "lineWidth": 1,
            "showPoints": "never",
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        }
    p: Json = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
    }
    if kind == "timeseries":
        p["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif kind == "stat":
        p["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        }
    return p


def stat(title: str, expr: str, unit: str = "short", legend: str = "") -> Json:
    return panel(title, [target(expr, legend)], kind="stat", unit=unit, w=6, h=4)


def layout(panels: list[Json]) -> list[Json]:
    """Give each panel an id and a place, filling rows of 24 columns left to right."""
    x = y = row_h = 0
    for i, p in enumerate(panels, start=1):
        g = p["gridPos"]
        if x + g["w"] > 24:
            x, y, row_h = 0, y + row_h, 0
        g.update(x=x, y=y)
        x += g["w"]
        row_h = max(row_h, g["h"])
        p["id"] = i
    return panels


def datasource_var() -> Json:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {"text": "Prometheus", "value": DATASOURCE_UID},
        "hide": 0,
        "refresh": 1,
    }


def query_var(name: str, query: str, label: str, *, multi: bool = True) -> Json:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-var"},
        "refresh": 2,
        "sort": 1,
        "includeAll": multi,
        "multi": multi,
        "allValue": ".*" if multi else None,
        "current": {},
        "hide": 0,
    }


def dashboard(uid: str, title: str, panels: list[Json], variables: list[Json]) -> Json:
    return {
        "uid": uid,
        "title": title,
        "tags": ["evc"],
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "",
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": ["evc"], "asDropdown": True, "title": "EVC dashboards"}],
        "templating": {"list": [datasource_var(), *variables]},
        "panels": layout(panels),
    }
