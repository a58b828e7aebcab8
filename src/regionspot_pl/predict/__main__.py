"""``python -m regionspot_pl.predict``."""

import sys

from .cli import main

sys.exit(main())
