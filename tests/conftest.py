"""Shared fixtures: real Redis, real Celery workers, simulated devices, a real sshd.

Every test that uses one of the real-service fixtures below (directly or through another
fixture) is marked ``integration``: ``pytest -m "not integration"`` runs the fast unit tests,
``pytest -m integration`` the rest (``scripts/test`` runs both, in that order).
"""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.sim",
    "tests.fixtures.prometheus",
    "tests.fixtures.cli",
]

#: fixtures that start real services or heavy subprocesses; a test using any is ``integration``
INTEGRATION_FIXTURES = frozenset(
    {
        # tests/fixtures/services.py: a redis-server (settings, store, api, flush ... use it),
        # Celery worker processes
        "redis_server",
        "worker",
        # tests/fixtures/sim.py: the SSH device simulator, a real OpenSSH sshd
        "simulator",
        "sim_devices",
        "sshd",
        # tests/fixtures/prometheus.py: Prometheus servers, promtool, edge exporter processes
        "start_prometheus",
        "promtool",
        "edge_exporter",
        # fixtures of single test modules
        "clients",  # test_fl_client: FL client processes
        "checkout",  # test_layout: builds the wheel and the sdist
        "evc_up",  # test_readme: an `evc up` stack
        "evc_metrics_endpoint",  # test_monitoring_config: EVC's /metrics served for Prometheus
    }
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
