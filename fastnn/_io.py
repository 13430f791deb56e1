"""Atomic file writes: the one home of the temp-file / fsync / rename sequence.

Used by checkpoints (:mod:`fastnn.checkpoint`), the training metrics JSON
(:mod:`fastnn.training`) and MNIST downloads (:mod:`fastnn.data.download`).
A reader never sees a half-written file under the real name: the content goes
to a temporary file in the destination directory (same filesystem, so the
rename is atomic), which is fsynced and moved over the target with
:func:`os.replace`; the directory is then fsynced so the rename is durable.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["default_file_mode", "write_atomic"]


def default_file_mode() -> int:
    """0o666 minus the umask: what ``open()`` would give, unlike mkstemp's 0o600."""
    # os.umask can only be read by setting it; done once at import (below), as
    # flipping it per write would race with other threads creating files.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = default_file_mode()


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every OS/filesystem.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(
    path: str | os.PathLike,
    content: bytes | Callable[[BinaryIO], object],
    *,
    mode: int | None = None,
    suffix: str = ".tmp",
) -> Path:
    """Create or replace ``path`` atomically and return it as a :class:`Path`.

    ``content``: the bytes to write, or a callable ``write(f)`` that fills the
    binary file object ``f``. ``mode``: permission bits of the new file (default:
    what ``open()`` would create under the process umask). ``suffix``: of the
    temporary file ``.<name>.<random><suffix>`` created next to ``path``.
    Missing parent directories are created. If anything fails (including
    KeyboardInterrupt) the temporary file is removed and an existing ``path``
    is left untouched.
    """
    if not isinstance(content, (bytes, bytearray, memoryview)) and not callable(content):
        raise TypeError(
            f"content must be bytes or a callable write(f), got {type(content).__name__}"
        )
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=suffix)
    try:
        os.fchmod(fd, _FILE_MODE if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)
    return path
