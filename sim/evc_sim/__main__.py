"""``python -m evc_sim``: run simulated devices until SIGTERM/SIGINT."""

import sys

from evc_sim.runner import main

sys.exit(main())
