"""``python -m regionspot_pl.extract``."""

import sys

from .cli import main

sys.exit(main())
