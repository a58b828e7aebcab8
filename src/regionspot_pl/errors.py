"""The one base class of every error a user can cause and fix.

Library code raises a subclass of :class:`RegionSpotError` for bad input: a missing or malformed
file, a flag out of range, shards that do not fit a head, an unreadable image, a bad box, an
empty vocabulary. The message names the input and says what to do. Only a command's ``main()``
turns one into a single ``error: ...`` line on stderr and exit code 2
(:func:`regionspot_pl.config.run_command`); anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class RegionSpotError(Exception):
    """Bad input a user can fix; the message names the file or flag and the fix."""
