"""`python -m monkeytrain ...`: the `monkeytrain` command, for an environment whose scripts are not on PATH."""

from monkeytrain.cli import main

main()
