"""`python -m handgrad [COMMAND] [options]`: the same as `python train.py ...` (see :mod:`handgrad.cli`)."""

from handgrad.cli import main

main()
