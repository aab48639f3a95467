"""The HTTP API: a thin flask-smorest layer over EVC's core services."""

from evc.api.app import create_app

__all__ = ["create_app"]
