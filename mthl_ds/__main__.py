"""``python -m mthl_ds``: the ``mthl-ds`` command; the deepspeed launcher runs it as ``--module mthl_ds``."""
import sys

from mthl_ds.cli import main

sys.exit(main())
