"""EVC's edge exporter: GPU, Jetson, thermal, host and process metrics for Prometheus.

Standalone on purpose: it needs only the Python standard library (3.8+) and prometheus_client,
imports nothing else from EVC, and uses relative imports only, so the ``evc/device/exporter``
directory can be copied to a device under any package name and run with ``python -m``::

    python -m evc.device.exporter --port 9110 --listen 0.0.0.0 --process infer.py --mount / --mount /data

Metrics (all ``evc_edge_*``; a missing source gives ``evc_edge_collector_up{collector} 0``):

- every collector: ``collector_up{collector}``, ``collector_duration_seconds{collector}``,
  ``exporter_build_info{version}``
- loadavg: ``load1``, ``load5``, ``load15``; cpu: ``cpus``, ``cpu_seconds_total{mode}``;
  uptime: ``uptime_seconds``
- meminfo: ``memory_total_bytes``, ``memory_available_bytes``, ``memory_free_bytes``,
  ``swap_total_bytes``, ``swap_free_bytes``
- filesystem (``--mount``): ``filesystem_size_bytes``, ``_free_bytes``, ``_avail_bytes``,
  ``_readonly``, ``_error``, all ``{mountpoint}``
- netdev: ``network_{receive,transmit}_{bytes,packets,errors}_total{interface}``
- thermal: ``thermal_zone_temperature_celsius{zone,type}``
- nvidia (NVML or nvidia-smi): ``gpu_info{gpu,name,uuid}``, ``gpu_utilization_ratio``,
  ``gpu_memory_used_bytes``, ``gpu_memory_total_bytes``, ``gpu_temperature_celsius``,
  ``gpu_power_watts``, all ``{gpu}``
- tegrastats (Jetson): ``jetson_ram_{used,total}_bytes``, ``jetson_swap_{used,total}_bytes``,
  ``jetson_cpu_{online,utilization_ratio,frequency_hertz}{core}``,
  ``jetson_gpu_utilization_ratio``, ``jetson_gpu_frequency_hertz``,
  ``jetson_emc_utilization_ratio``, ``jetson_temperature_celsius{sensor}``,
  ``jetson_power_watts{rail}``, ``jetson_power_average_watts{rail}``
- process (``--process NAME``): ``process_up{name}``, ``processes{name}``
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
