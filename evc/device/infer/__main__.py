"""``python -m evc.device.infer``: run the edge inference server."""

from .cli import main

raise SystemExit(main())
