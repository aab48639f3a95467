"""The model registry, EVF's integration point: model versions registered by upload,
content-addressed and immutable, their variants, the metadata EVC reads from the graph, EVC's
own int8 variant, and the hardware view EVF adapts models to.

- :mod:`evc.models.storage`: the storage backends (embedded, the default; an OCI registry);
- :mod:`evc.models.blobs`: the embedded content-addressed blob storage in the data directory;
- :mod:`evc.models.oci`: an OCI distribution client for model artifacts (ORAS conventions);
- :mod:`evc.models.metadata`: inputs/outputs, opsets, parameters, operations, FLOPs (pure);
- :mod:`evc.models.registry`: register, variants, list, show, delete (the service);
- :mod:`evc.models.quantize`: the ``model-quantize`` job's body (ONNX Runtime int8 + accuracy);
- :mod:`evc.models.hardware`: ``GET /clusters/{id}/hardware``, from facts and health records.
"""
