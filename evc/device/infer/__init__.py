"""EVC's edge inference server: ONNX models over the Open Inference Protocol (KServe v2 REST).

Standalone on purpose, like the edge exporter: it needs the Python standard library (3.8+),
numpy and onnxruntime (prometheus_client if it is there, else built-in metrics), imports nothing
else from EVC and uses relative imports only, so the ``evc/device/infer`` directory can be
copied to a device under any package name and run with ``python -m``::

    python -m evc.device.infer --models-dir /var/lib/evc/models --host 0.0.0.0 --port 8000

The models folder holds ``<name>/<version>/model.onnx``, each beside a ``model.json`` pinning
its digest (``{"sha256": "<hex>"}``): a version whose bytes do not match is not served. SIGHUP
rescans the folder; SIGTERM (or SIGINT) stops accepting, lets requests in progress finish and
exits 0. Standard clients work against it (``tritonclient.http``, KServe's ``InferenceRESTClient``).

- :mod:`.tensors`: the protocol's tensors (JSON and binary) to and from numpy
- :mod:`.repository`: the models folder, digest checks, ONNX Runtime sessions
- :mod:`.server`: the routes; :mod:`.httpd`: the HTTP/1.1 server; :mod:`.metrics`: ``/metrics``
- :mod:`.cli`: the command line
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
