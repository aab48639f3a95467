"""`python -m evc.cli`: the `evc` command."""

from evc.cli import main

main()
