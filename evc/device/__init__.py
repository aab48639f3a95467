"""Device-side code: runs on the devices, stdlib + numpy/prometheus_client only, Python 3.8+.

- :mod:`evc.device.exporter`: the edge exporter (stdlib and prometheus_client), shipped by the
  ``exporter`` playbook as a zip application (:func:`evc.monitoring.exporter_bundle`).
- :mod:`evc.device.fl_client`: the federated-learning client (numpy), shipped by the
  ``fl-client`` playbook and :func:`evc.fl.channels.install_client` as ``~/.evc/fl/client.py``.

Nothing here imports the rest of EVC (the controller imports from here, never the reverse), and
``ruff.toml`` in this folder lints it for Python 3.8.
"""
