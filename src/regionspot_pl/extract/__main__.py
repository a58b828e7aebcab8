"""``python -m regionspot_pl.extract``."""

import sys

from .run import main

sys.exit(main())
