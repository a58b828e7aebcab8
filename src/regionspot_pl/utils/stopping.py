"""Stopping a run on SIGTERM or SIGINT: what clusters send (SLURM, Kubernetes) and what Ctrl-C sends.

``extract`` and ``test`` run inside :func:`stop_on_signals`: the signal raises :class:`Stopped` in
the main thread, so ``finally`` blocks clean up (half-written shards are removed, the folder lock
is released) and the CLI exits with 128 + the signal number. ``fit`` uses
:class:`regionspot_pl.train.graceful_stop.GracefulStop`, which goes through Lightning's own SIGTERM
handling: the step under way finishes, ``last.ckpt`` is saved at that boundary, and the run can be
continued with ``--resume last``. This module needs only the standard library, so that every
command can stop cleanly without loading Lightning.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):  # noqa: N818 - a stop, not an error
    """A run stopped by a signal.

    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on the way
    swallows it.
    """

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum = int(signum)
        self.detail = detail
        super().__init__(f"stopped by {signal.Signals(self.signum).name}" + (f": {detail}" if detail else ""))

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Stopped` in this process's main thread.

    A forked child (a DataLoader worker) inherits the handler; there it exits at once and
    quietly, leaving the report to the main process. The previous handlers are restored after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
