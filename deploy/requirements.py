"""Print EVC's requirements, one per line, from pyproject.toml alone: its dependencies, what
building its wheel needs, and the extras named in argv[1] (comma separated, e.g. "flower").
What `pip install "/src[EXTRAS]"` would install; deploy/Dockerfile installs them in a layer of
their own and scripts/build-image downloads them into its wheelhouse.

    python deploy/requirements.py flower [pyproject.toml]
"""

import sys
import tomllib

meta = tomllib.load(open(sys.argv[2] if len(sys.argv) > 2 else "pyproject.toml", "rb"))  # noqa: SIM115
reqs = list(meta["project"]["dependencies"]) + list(meta["build-system"]["requires"])
for extra in filter(None, (e.strip() for e in (sys.argv[1] if len(sys.argv) > 1 else "").split(","))):
    reqs += meta["project"]["optional-dependencies"][extra]
print("\n".join(reqs))
