"""WSGI entry point: ``gunicorn 'evc.api.wsgi:app'`` (settings from EVC_* variables)."""

from evc.api.app import create_app

app = create_app()
