"""Imported first by the package: cryptography 51 deprecates DSA on import and asyncssh imports
it; the warning is not the simulator's to print (the same filter as evc/__init__.py)."""

import warnings

warnings.filterwarnings("ignore", message="DSA is deprecated", category=Warning)
