"""Running out of disk space: say where, and how much room the work needs, instead of a bare OSError.

Two halves. `require_free_space` checks up front where the size of what will be written is known (an export, a
converted model, a checkpoint), so nothing is started that cannot finish. `disk_space_errors` turns the OSError a
write raises when the disk fills anyway (another program filled it meanwhile, or the size was unknown) into a
`DiskFullError` naming the place. Callers write into temporary files or folders that they remove on failure, so a
full disk never leaves a partial file where a finished one is expected.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from app.core.errors import TailorError

# ENOSPC: the filesystem is full; EDQUOT: the user's quota on it is.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_NO_SPACE_MESSAGES = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
# A margin on top of an estimate: metadata, JSON side files and the filesystem's own blocks.
_MARGIN_BYTES = 1 << 20


class DiskFullError(TailorError):
    """Not enough free space where Tailor had to write; `place` is that folder, `needed_bytes` the size if known."""

    def __init__(self, message: str, place: Path, needed_bytes: int | None, free: int | None):
        super().__init__(message, "Free some space on that disk, or choose a folder on another disk, and try again.")
        self.place = place
        self.needed_bytes = needed_bytes
        self.free_bytes = free


def is_disk_full(error: BaseException, place: str | os.PathLike | None = None) -> bool:
    """True for the OSError of a full disk or quota, and for the same failure reported by a library written in
    another language (safetensors says 'os error 28'; torch.save only 'file write failed', so that counts when the
    disk at `place` is indeed out of room)."""
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return True
    text = str(error)
    if any(marker in text for marker in _NO_SPACE_MESSAGES):
        return True
    free = free_bytes(place) if place is not None and "file write failed" in text else None
    return free is not None and free < _MARGIN_BYTES


def free_bytes(place: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem that holds `place` (or would, once created); None if that cannot be told."""
    path = Path(place).expanduser().absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def size_text(num_bytes: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= size:
            return f"{num_bytes / size:.1f} {unit}"
    return f"{num_bytes} bytes"


def require_free_space(place: str | os.PathLike, needed_bytes: int, what: str) -> None:
    """Raise DiskFullError unless the disk holding `place` has room for `needed_bytes` (plus a small margin).

    `what` completes "Not enough disk space to …", e.g. "save a checkpoint".
    """
    free = free_bytes(place)
    if free is not None and free < needed_bytes + _MARGIN_BYTES:
        raise DiskFullError(f"Not enough disk space to {what} in {place}: it needs about {size_text(needed_bytes)}, "
                            f"and only {size_text(free)} is free.", Path(place), needed_bytes, free)


def disk_full_error(error: Exception, place: str | os.PathLike, what: str,
                    needed_bytes: int | None = None) -> DiskFullError:
    """The DiskFullError for an ENOSPC/EDQUOT that `error` reports while writing into `place`."""
    free = free_bytes(place)
    need = f"it needs about {size_text(needed_bytes)}" if needed_bytes else "the disk filled up while writing"
    have = f", with {size_text(free)} free" if free is not None else ""
    quota = " (your disk quota is used up)" if getattr(error, "errno", None) == errno.EDQUOT else ""
    return DiskFullError(f"Not enough disk space to {what} in {place}{quota}: {need}{have}. "
                         "The unfinished copy was removed; nothing that was there before was changed.",
                         Path(place), needed_bytes, free)


@contextmanager
def disk_space_errors(place: str | os.PathLike, what: str, needed_bytes: int | None = None) -> Iterator[None]:
    """Turn a full disk inside the block into a DiskFullError naming `place`; every other error passes unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:  # safetensors and torch report a full disk as their own exception types
        if is_disk_full(error, place):
            raise disk_full_error(error, place, what, needed_bytes) from error
        raise
