"""EVC, the Edge Vision Cluster control plane: provision, monitor, deploy to and train on edge devices over SSH."""

__version__ = "0.1.0"

import warnings

# asyncssh and ansible-core import cryptography's DSA classes, which cryptography 51 deprecates
# on import: the warning is theirs, printed on every start, and says nothing to EVC's users
# (EVC never makes or accepts DSA keys). evc_sim imports evc first for this filter.
_DSA = "DSA is deprecated"
#: the same filter for the ansible-playbook processes EVC starts, in PYTHONWARNINGS (evc.provisioning.runner)
QUIET_WARNINGS = f"ignore:{_DSA}"
warnings.filterwarnings("ignore", message=_DSA, category=Warning)
