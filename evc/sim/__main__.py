"""``python -m evc.sim``: run simulated devices until SIGTERM/SIGINT."""

import sys

from evc.sim.runner import main

sys.exit(main())
