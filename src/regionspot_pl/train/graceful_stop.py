"""Stopping ``fit`` on SIGTERM or SIGINT at a step boundary, with a resumable ``last.ckpt``
(Lightning's SIGTERM path; the other commands stop through :mod:`regionspot_pl.utils.stopping`)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L

from ..utils.stopping import STOP_SIGNALS, Stopped

log = logging.getLogger("regionspot_pl.stopping")


class GracefulStop(L.Callback):
    """Stops ``fit`` on SIGTERM or SIGINT at a step boundary with a resumable ``last.ckpt``.

    Lightning's SIGTERM handler marks the trainer, which then raises ``SIGTERMException`` after
    the step (or validation batch) under way; this callback

    - routes SIGINT into that same path (Ctrl-C would otherwise interrupt a step half-done),
    - saves ``last`` when the stop reaches a step boundary (not inside validation: the
      checkpoint saved just before it is the one to resume from),
    - bounds the wait: when no boundary comes within ``grace_s`` (a read that never returns),
      the main thread is interrupted; a second signal does the same at once,
    - saves ``last`` before every validation (every ``every`` steps), so a validation that fails
      loses no training.

    Use :meth:`guard` around ``trainer.fit``: it turns the stop into :class:`Stopped` and
    restores the signal handlers.
    """

    def __init__(self, last: str | Path, every: int | None = None, grace_s: float = 20.0) -> None:
        self.last, self.every, self.grace_s = Path(last), every, grace_s
        self.signum: int | None = None
        self.saved_step: int | None = None
        self._in_step = self._forcing = self._forwarded = False
        self._previous: dict = {}
        self._timer: threading.Timer | None = None
        self._pid = os.getpid()

    # ---- signals ----
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its SIGTERM handler after this hook and calls the one found here too.
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            self._previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
            for s in STOP_SIGNALS:
                signal.signal(s, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if os.getpid() != self._pid:  # a forked loader worker: the main process stops the run
            return
        if self._forcing:
            raise KeyboardInterrupt
        if self.signum is not None:
            if signum == signal.SIGTERM and self._forwarded:  # our own forward of a SIGINT
                self._forwarded = False
                return
            raise KeyboardInterrupt  # a second signal: stop now
        self.signum = signum
        log.warning("%s received: stopping after the current step, saving %s", signal.Signals(signum).name, self.last)
        if signum != signal.SIGTERM:
            self._forwarded = True
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's path: stop at the next step boundary
        self._timer = threading.Timer(self.grace_s, self._force)
        self._timer.daemon = True
        self._timer.start()

    def _force(self) -> None:
        """No step boundary came in time: interrupt the main thread (a real signal, so that a
        blocking read returns with EINTR and the handler runs)."""
        self._forcing = True
        log.warning("no step boundary within %.0f s of the stop signal: interrupting", self.grace_s)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def restore(self) -> None:
        """Cancel the watchdog and put back the signal handlers found at fit start."""
        if self._timer is not None:
            self._timer.cancel()
        if threading.current_thread() is threading.main_thread():
            for s, h in self._previous.items():
                signal.signal(s, h)
        self._previous = {}

    # ---- checkpoints ----
    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.last, weights_only=False)  # with optimizer state: resumable
        self.saved_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_step = False
        if self.every and trainer.global_step % self.every == 0:  # validation comes next in this step
            self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.signum is None or trainer.validating or trainer.sanity_checking or not self._at_boundary(trainer):
            return  # an error, or no consistent state to save: the last saved checkpoint stands
        self._save(trainer)

    def _at_boundary(self, trainer: L.Trainer) -> bool:
        """Between two steps: no step under way, and every per-step schedule stepped as often as
        the optimizer (Lightning steps them after the step's end hooks)."""
        schedules = [c.scheduler for c in trainer.lr_scheduler_configs if c.interval == "step"]
        return not self._in_step and all(
            getattr(s, "last_epoch", trainer.global_step) == trainer.global_step for s in schedules
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.restore()

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Around ``trainer.fit``: a stop (Lightning's SIGTERMException, or the SystemExit it
        turns a KeyboardInterrupt into) becomes :class:`Stopped`; handlers are restored."""
        try:
            yield
        except (SystemExit, KeyboardInterrupt):
            if self.signum is None:
                raise
            raise Stopped(self.signum, self.describe()) from None
        finally:
            self.restore()

    def describe(self) -> str:
        if self.saved_step is None and not self.last.is_file():
            return "no checkpoint had been saved yet; rerun from the start"
        step = f" (step {self.saved_step})" if self.saved_step is not None else ""
        return f"{self.last}{step} is saved; continue with --resume last"
