"""EVC, the Edge Vision Cluster control plane: provision, monitor, deploy to and train on edge devices over SSH."""

__version__ = "0.1.0"

import warnings

#: what the ansible-playbook processes EVC starts get in PYTHONWARNINGS too (evc.provisioning.runner)
QUIET_WARNINGS = "ignore:DSA is deprecated"
# asyncssh and ansible-core import cryptography's DSA classes, which cryptography 51 deprecates
# on import: the warning is theirs, printed on every start, and says nothing to EVC's users
# (EVC never makes or accepts DSA keys)
warnings.filterwarnings("ignore", message="DSA is deprecated", category=Warning)
