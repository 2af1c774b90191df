"""File operations of the traffic log: open for appending, and size-based rotation."""

from __future__ import annotations

import contextlib
import os

__all__ = ["open_append", "rotate"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC


def open_append(path: str, *, truncate: bool = False) -> int:
    """Open ``path`` write-only for appending, creating it with mode 0600; return the fd.

    An existing file keeps its mode (and, unless ``truncate``, its content). Raises
    :class:`OSError`.
    """
    return os.open(path, _FLAGS | (os.O_TRUNC if truncate else 0), 0o600)


def rotate(path: str, keep: int) -> int:
    """Rotate ``path`` -> ``path.1`` -> ... -> ``path.<keep>``; return an fd of a fresh file.

    The oldest copy is deleted (with ``keep == 0`` the current file itself goes). The new
    0600 file is first created as ``path.new`` and moved over ``path`` with one rename, so
    ``path`` always exists for a reader that reopens it; the current file gets the name
    ``path.1`` by a hard link first (by a rename where links are not supported). Files are
    only renamed, never copied, so a reader holding the old file open sees it whole.

    Raises :class:`OSError` with ``path`` still naming the current file (unless a
    fallback rename was interrupted) and no ``path.new`` left behind; the caller keeps
    writing to the fd it has.
    """
    tmp = f"{path}.new"
    new_fd = open_append(tmp, truncate=True)
    try:
        if keep == 0:
            os.replace(tmp, path)
            return new_fd
        # Shift the run path.1 .. path.n that exists (one stat per file, not per `keep`);
        # a file past a hole, or past `keep`, is not touched.
        n = 0
        while n < keep - 1 and os.path.lexists(f"{path}.{n + 1}"):
            n += 1
        for i in range(n, 0, -1):
            os.replace(f"{path}.{i}", f"{path}.{i + 1}")
        first = f"{path}.1"
        if os.path.lexists(first):  # keep == 1: the only copy is the oldest
            os.unlink(first)
        try:
            os.link(path, first)
        except OSError:
            os.replace(path, first)
            os.replace(tmp, path)
            return new_fd
        try:
            os.replace(tmp, path)
        except OSError:
            os.unlink(first)
            raise
        return new_fd
    except OSError:
        os.close(new_fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
