"""Shared fixtures: real Redis, real Celery workers, simulated devices, a real sshd."""

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.sim",
    "tests.fixtures.prometheus",
]
