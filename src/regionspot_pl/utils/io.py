"""Small helpers every stage shares: JSON files read with a clear error, files written atomically
(:class:`AtomicFile`, :func:`write_json_atomic`) and locked (:class:`FolderLock`), masks as COCO
RLEs, and a stream cut into batches. (Images are read in one place too:
:func:`regionspot_pl.backbones.image.read_image`.)"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ..errors import RegionSpotError

T = TypeVar("T")


class JsonFileError(RegionSpotError):
    """A JSON file is missing or not valid JSON."""


class OutputError(RegionSpotError):
    """An output file or folder cannot be written (permissions, a full disk, a file in the way)."""


class FolderLockError(RegionSpotError, RuntimeError):
    """Another live process is writing the same folder."""


def read_json(path: str | Path, what: str, error: type[RegionSpotError] = JsonFileError) -> Any:
    """The content of a JSON file; ``error`` (naming ``what`` and the path) when it is missing or
    not JSON."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{what} {path} is not valid JSON: {err}") from None


class AtomicFile:
    """A file written under a temporary name beside ``path``, then renamed onto it: a reader never
    sees half a file, and a crash leaves the old file (and at most a ``*.tmp``) behind.

    The temporary name (``{name}.{pid}-{thread}-{random}.tmp``) is unique to each AtomicFile, so
    two writers of one path never rename each other's file away. Used as a context manager it
    yields the temporary path and commits when the block ends without an error (deletes the
    temporary file otherwise); a writer that fills the file over time calls :meth:`commit` or
    :meth:`abort` itself. Unlike ``tempfile.mkstemp``'s private (0600) files, the file gets the
    umask's permissions.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(
            f"{self.path.name}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}.tmp"
        )

    def commit(self) -> Path:
        """Rename the temporary file onto the path; returns the path."""
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Delete the temporary file (nothing to do after a commit)."""
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.abort()


def array_mismatch(array: np.ndarray, dtype: type, ndim: int) -> str | None:
    """None when ``array`` read from disk has this dtype and number of dims, else what it is and
    what was expected (for the caller's error, which names the file and the member)."""
    if array.dtype == dtype and array.ndim == ndim:
        return None
    return f"is {array.dtype} {array.shape}, expected {np.dtype(dtype)} with {ndim} dims"


def write_json_atomic(path: str | Path, obj: object, indent: int | None = 1) -> Path:
    """Write JSON through an :class:`AtomicFile`. ``indent=None`` writes it compact."""
    separators = (",", ":") if indent is None else None
    with AtomicFile(path) as tmp, open(tmp, "x") as f:
        json.dump(obj, f, indent=indent, separators=separators)
    return Path(path)


class FolderLock:
    """An exclusive lock on a folder's output (``fcntl.flock`` on a file holding the owner's pid and host).

    The kernel drops a flock when its process dies, so the lock file of a killed run is taken over
    by the next one. A live owner is an error naming it; with ``wait=True`` it is waited for
    instead, and the lock file stays after a release (waiters hold it open). Where flock is
    unavailable (some network file systems), the pid in the file decides: a dead process's lock on
    this host is taken over; with ``wait=True`` nothing is locked there, so the writers it
    serializes must be safe on their own too (e.g. through :class:`AtomicFile`).
    """

    def __init__(self, path: str | Path, what: str, wait: bool = False) -> None:
        self.path, self.what, self.wait = Path(path), what, wait
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        for _ in range(5):  # retried only when a finishing owner deleted the file under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._flock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                owner = self._owner()
                os.close(fd)
                raise FolderLockError(self._busy(owner))
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                self._fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
                return self
            os.close(fd)
        raise FolderLockError(f"could not take the lock {self.path}: it keeps being replaced; is another run starting?")

    def _flock(self, fd: int) -> bool:
        """True when this process now holds the lock, False when a live process does."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        if self.wait:
            return True
        owner = self._owner()  # no flock here: decide by the recorded pid
        return not (owner.get("host") == socket.gethostname() and _alive(owner.get("pid")))

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def _busy(self, owner: dict) -> str:
        who = f"process {owner.get('pid', '?')} on host {owner.get('host', '?')}"
        return (
            f"{self.what} is being written by {who} (lock file {self.path}): wait for it to finish, or stop it; "
            "two runs writing one folder would overwrite each other's files"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        if not self.wait:
            self.path.unlink(missing_ok=True)  # still holding the flock: no one took it in between
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def masks_to_rle(masks: torch.Tensor | np.ndarray) -> list[dict]:
    """[N, H, W] bool masks -> N COCO RLEs ``{"size": [H, W], "counts": str}`` (JSON-safe)."""
    if len(masks) == 0:
        return []
    array = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    fortran = np.asfortranarray(array.transpose(1, 2, 0).astype(np.uint8))
    return [rle_to_json(r) for r in mask_utils.encode(fortran)]


def rle_to_json(rle: dict[str, Any]) -> dict[str, Any]:
    """pycocotools encodes counts as bytes; JSON (and the results format) wants str."""
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(v) for v in rle["size"]], "counts": counts}


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
