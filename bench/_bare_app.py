"""The baseline of the submission benchmark: a bare Flask endpoint calling apply_async."""

from __future__ import annotations

import os

from celery import Celery
from flask import Flask, jsonify

celery = Celery("bare", broker=os.environ["EVC_REDIS_URL"])
celery.conf.task_serializer = "json"
app = Flask("bare")


@app.post("/api/v1/jobs")
def submit():
    r = celery.send_task("bare.noop", args=["x"], queue="bare")
    return jsonify({"id": r.id}), 202
