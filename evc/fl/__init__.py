"""Federated learning core: models, aggregation, strategies, data, checkpoints, client protocol.

Everything here is broker-free and pure; the Celery orchestration builds on it.
``evc.device.fl_client`` is the self-contained device runtime (numpy only).
"""
