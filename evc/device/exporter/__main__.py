"""``python -m evc.device.exporter``: run the edge exporter."""

from .cli import main

raise SystemExit(main())
