"""EVC, the Edge Vision Cluster control plane: provision, monitor, deploy to and train on edge devices over SSH."""

__version__ = "0.1.0"
