"""Name image regions on a web page: ``python -m regionspot_pl.app --head H --sam_type T
--sam_checkpoint S --clip_model C [--port 7860]`` (:mod:`regionspot_pl.serve.page`; the flags are
the server's, see ``--help``)."""

import sys

from .serve.cli import APP_COMMAND as COMMAND
from .serve.cli import app_main as main

__all__ = ["COMMAND", "main"]

if __name__ == "__main__":
    sys.exit(main())
