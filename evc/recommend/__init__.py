"""Model recommendation for each edge device, from measurements (issue 15).

- :mod:`evc.recommend.features`: per-operator cost features of an ONNX graph (pure);
- :mod:`evc.recommend.calibration`: the calibration micro-benchmark graphs, per-device costs;
- :mod:`evc.recommend.predictor`: the latency predictor and its held-out error (pure);
- :mod:`evc.recommend.choose`: the variant per device, and why the others lost (pure);
- :mod:`evc.recommend.remote`: the one-shot runner over SSH (:mod:`evc.device.profile_runner`);
- :mod:`evc.recommend.service`: the ``model-profile`` and ``device-calibrate`` jobs;
- :mod:`evc.recommend.advise`: recommendations, ``variant: recommended``, the fleet follower;
- :mod:`evc.recommend.events`, :mod:`evc.recommend.metrics`: webhook events, Prometheus series.
"""
