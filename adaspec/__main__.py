"""``python -m adaspec``: the same command line as ``adaspec``."""

import sys

from .cli import main

sys.exit(main())
