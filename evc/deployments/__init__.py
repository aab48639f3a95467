"""Deployments: a registered model version (or variant) onto devices, served by EVC's edge
inference server (issue 13, point 3). First slice: runtime ``process`` over SSH.

- :mod:`evc.deployments.service`: submit, list, show, remove; the ``deploy`` and
  ``deploy-remove`` job bodies
- :mod:`evc.deployments.remote`: what runs on one device (ship, verify, start, health-gate, stop)
- :mod:`evc.deployments.rollout`: update in place and rollback (a ``deploy`` job with
  ``params.rollout``: at most ``max_unavailable`` devices at a time, automatic rollback)
- :mod:`evc.deployments.switch`: one device of a rollout (ship beside, restart on it, gate)
"""
