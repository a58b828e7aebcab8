"""``python -m regionspot_pl.serve``."""

import sys

from .cli import main

sys.exit(main())
